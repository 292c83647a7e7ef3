"""Continual backprop (Dohare et al., Nature 2024): an option any method can turn on to keep
a network plastic over long streams, by re-initialising its least useful hidden units.

For every gated MLP of the decoder (``gate_proj``, ``up_proj`` -> hidden units -> ``down_proj``)
with trainable weights, each hidden unit i keeps

- a *utility*  u_i <- eta * u_i + (1 - eta) * mean_tokens |h_i| * sum_j |W_down[j, i]|
  (its mean activation magnitude times the magnitude of its outgoing weights), and
- an *age*     a_i <- a_i + 1 (steps since it was last re-initialised).

After every optimizer step, each MLP accrues ``rate`` x (number of mature units, age >
``maturity``) replacements; whenever that reaches 1, the mature unit of lowest utility is
re-initialised: its incoming rows of ``gate_proj`` and ``up_proj`` are drawn afresh from a
normal distribution with the current standard deviation of those weights, its outgoing
column of ``down_proj`` is set to zero (so the network's function does not jump), its utility
and age are reset, and the optimizer's moment estimates for those entries are cleared.

Left out of the paper's algorithm: the bias-correction of the utility by the unit's mean
activation (Llama MLPs have no biases to absorb it). It is a plugin (``methods.base.Plugin``):
turn it on for any method with ``plugins: [{name: continual_backprop, rate: 1e-4, maturity: 100,
decay: 0.99}]`` in the method's entry of a run config (``continual_backprop: {...}`` or ``true``
is the same, written shorter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import Plugin, PluginOptions, nest, unnest


def gated_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """The Llama-style MLPs (with gate_proj, up_proj and down_proj linears) of a model, by name."""
    return {n: m for n, m in model.named_modules()
            if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj"))}


class ContinualBackprop(Plugin):
    name = "continual_backprop"

    @dataclass
    class Options(PluginOptions):
        rate: float = 1e-4  # replacements per mature unit and step
        maturity: int = 100  # steps before a unit may be replaced
        decay: float = 0.99  # eta of the utility's running average
        seed: int = 0

        def validate(self) -> None:
            super().validate()
            self.between("rate", 0, 1)
            self.at_least("maturity", 0)
            self.between("decay", 0, 1, high_open=True)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self.rate, self.maturity, self.decay, self.seed = o.rate, o.maturity, o.decay, o.seed
        self.utility: dict[str, torch.Tensor] = {}
        self.age: dict[str, torch.Tensor] = {}
        self.pending: dict[str, float] = {}
        self.replaced = 0
        self._act: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        self._mlps: dict[str, nn.Module] = {}
        self._method = None

    # plugin hooks (training.lifecycle.fit_experience)
    def setup(self, model: nn.Module, context, method) -> None:
        self._method = method
        self.attach(model)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.replace_units(self._method.optimizers(), step)

    def teardown(self) -> None:
        self.detach()

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self._mlps = {n: m for n, m in gated_mlps(model).items() if m.down_proj.weight.requires_grad}
        for name, mlp in self._mlps.items():
            units = mlp.down_proj.in_features
            if name not in self.utility:
                self.utility[name] = torch.zeros(units)
                self.age[name] = torch.zeros(units, dtype=torch.long)
                self.pending[name] = 0.0

            def capture(module, args, name=name):
                self._act[name] = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).mean(0).cpu()

            self._hooks.append(mlp.down_proj.register_forward_pre_hook(capture))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._act = [], {}

    @torch.no_grad()
    def replace_units(self, optimizers: list[torch.optim.Optimizer], step: int) -> int:
        """Update utilities and ages; re-initialise the due units. Returns how many were replaced."""
        done = 0
        for name, mlp in self._mlps.items():
            if name not in self._act:
                continue
            out_mag = mlp.down_proj.weight.detach().abs().sum(0).float().cpu()
            u = self.utility[name]
            u.mul_(self.decay).add_((1 - self.decay) * self._act[name] * out_mag)
            self.age[name] += 1
            mature = self.age[name] > self.maturity
            self.pending[name] += self.rate * int(mature.sum())
            n = min(int(self.pending[name]), int(mature.sum()))
            if n < 1:
                continue
            self.pending[name] -= n
            cand = torch.where(mature, u, torch.full_like(u, float("inf")))
            units = cand.topk(n, largest=False).indices
            self._reinit(mlp, units, optimizers, step)
            u[units] = 0.0
            self.age[name][units] = 0
            done += n
        self.replaced += done
        return done

    def _reinit(self, mlp: nn.Module, units: torch.Tensor, optimizers, step: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 131 + self.replaced)
        for lin in (mlp.gate_proj, mlp.up_proj):
            w = lin.weight
            std = float(w.std())
            fresh = torch.randn((len(units), w.shape[1]), generator=g) * std
            w[units.to(w.device)] = fresh.to(w.dtype).to(w.device)
            _clear_optimizer_rows(optimizers, w, units, dim=0)
        w = mlp.down_proj.weight
        w[:, units.to(w.device)] = 0
        _clear_optimizer_rows(optimizers, w, units, dim=1)

    # state kept across experiences and saved with a run
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"replaced": torch.tensor([self.replaced]), **nest("utility", self.utility), **nest("age", self.age)}
        out.update(nest("pending", {n: torch.tensor([p], dtype=torch.float64) for n, p in self.pending.items()}))
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.utility.update({n: v.clone() for n, v in unnest("utility", state).items()})
        self.age.update({n: v.clone() for n, v in unnest("age", state).items()})
        self.pending.update({n: float(v[0]) for n, v in unnest("pending", state).items()})
        if "replaced" in state:
            self.replaced = int(state["replaced"][0])


def _clear_optimizer_rows(optimizers, param: torch.Tensor, units: torch.Tensor, dim: int) -> None:
    for opt in optimizers:
        st = opt.state.get(param)
        if not st:
            continue
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            t = st.get(key)
            if isinstance(t, torch.Tensor) and t.shape == param.shape:
                t.index_fill_(dim, units.to(t.device), 0.0)


def make_plasticity(option) -> ContinualBackprop | None:
    """The ``continual_backprop`` shorthand of a method entry: false/None, true, or a dict of settings."""
    if option in (None, False):
        return None
    if option is True:
        return ContinualBackprop()
    if isinstance(option, dict):
        return ContinualBackprop(**option)
    raise ConfigError(f"continual_backprop must be true, false or a mapping of settings, got {option!r}.")
