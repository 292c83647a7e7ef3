"""PackNet (Mallya & Lazebnik 2018): one shared set of weights, split among experiences by
magnitude pruning, with per-experience ownership masks.

What trains: only the ``nn.Linear`` weights of the decoder layers named in ``target_modules``
(default: attention q/k/v/o and MLP gate/up/down). Embeddings, norms, ``lm_head`` and the
product-key memory layers stay frozen for the whole stream, so that an earlier experience's
function can be reproduced exactly.

Bookkeeping: one integer *owner map* per trained weight, ``0`` = free, ``k`` = owned by
experience ``k`` (1-based: the k-th experience of the stream). During experience ``k``:

1. steps ``0 .. P-1`` (``P = ceil((1 - retrain_fraction) * steps)``, at least 1): only the free
   entries train. Gradients of non-free entries are zeroed after the backward *and* every
   non-free entry is copied back from its reference value after every optimizer step (AdamW's
   weight decay and momentum would otherwise move it): owned entries stay bit-for-bit fixed.
2. after step ``P - 1``: prune. Of the entries that were free when the experience began, the
   top ``keep`` fraction per weight matrix (``round(keep * n_free)``, ranked by ``|w|``, or by
   ``|w - w_before|`` with ``criterion: change``) become owned by ``k``; the rest are reset to
   their *free value* and stay free for later experiences.
3. steps ``P .. steps-1``: only the entries owned by ``k`` train (retraining after pruning).

The free value (option ``reset``):

- ``"base"`` (default): the entry's value in the base model before the stream. A pretrained LM
  keeps working on every free entry (PackNet's zeroing would delete ``1 - keep`` of the
  pretrained weights at the first experience). The base values of the trained matrices are
  kept in ``state_tensors`` (one extra copy of them).
- ``"zero"``: the original PackNet rule; pruned entries are set to 0.

Inference (the exported ``PackNetModel``): ``set_experience(j)`` (0-based, as the runner calls
it) gives every entry owned by a later experience (owner > j + 1) its free value, which is
exactly the model as it was at the end of experience j+1 (the PackNet inference mask, with
"zeroed" generalised to "free value" so that ``reset: base`` is exact too). Without an
experience (``None``) all owned weights are used.

Parameter growth: ``growth()`` lists, per finished experience, the entries it owns; it is in
``describe()`` together with the total and the free remainder.

Left out: PackNet's batch-norm handling (no batch norm here), pruning biases (the Llama linears
have none), and a per-experience learned head (the LM head is shared and frozen). If the step
count of the experience is unknown at ``setup`` (no ``context.experience``), pruning
happens at ``export`` without a retraining phase. The ``continual_backprop`` option re-initialises
units after each step and would break the isolation; do not combine it with ``packnet``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..training.optim import adamw
from .base import Method, MethodContext, MethodOptions, freeze_all, nest, unnest
from .lora import LLAMA_LINEAR

RESETS = ("base", "zero")
CRITERIA = ("magnitude", "change")


def decoder_linear_weights(model: nn.Module, targets: list[str]) -> dict[str, nn.Parameter]:
    """``{module name: weight}`` of the ``nn.Linear`` modules inside decoder layers (``.layers.``)
    whose last name component is in ``targets`` (the memory's mem_query/gate/out are not)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in f".{name}" and name.rsplit(".", 1)[-1] in targets:
            out[name] = mod.weight
    return out


def prune_free_entries(owner: torch.Tensor, score: torch.Tensor, owner_id: int, keep: float) -> torch.Tensor:
    """Give ``owner_id`` the ``round(keep * n_free)`` free entries (owner 0) of highest ``score``,
    in place; returns the mask of the free entries that were *not* kept (to be reset)."""
    free = owner == 0
    n_keep = int(round(keep * int(free.sum())))
    if n_keep:
        s = score.detach().float().flatten().masked_fill(~free.flatten(), -math.inf)
        owner.view(-1)[torch.topk(s, n_keep, sorted=False).indices] = owner_id
    return free & (owner != owner_id)


class PackNetModel(nn.Module):
    """The exported model: the plain model plus the owner maps, with the PackNet inference rule.

    ``set_experience(j)`` (0-based j; owners are 1-based) keeps the current weights aside and
    puts the free value into every entry owned by an experience after j + 1;
    ``set_experience(None)`` puts the kept weights back, bit for bit. While a later experience
    trains (``training_owner`` set by ``PackNet.setup``, e.g. for curve points within it), its
    still-unowned entries also count as "after j + 1" for every earlier j."""

    def __init__(self, model: nn.Module, weights: dict[str, nn.Parameter], owners: dict[str, torch.Tensor],
                 free_values: dict[str, torch.Tensor] | None):
        super().__init__()
        self.model = model
        self._weights, self._owners, self._free = weights, owners, free_values
        self._saved: dict[str, torch.Tensor] | None = None
        self.experience: int | None = None
        self.training_owner: int | None = None

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def set_experience(self, j: int | None) -> None:
        if j is None:
            if self._saved is not None:
                for n, w in self._weights.items():
                    w.copy_(self._saved[n])
            self._saved = None
        else:
            if self._saved is None:
                self._saved = {n: w.detach().clone() for n, w in self._weights.items()}
            for n, w in self._weights.items():
                owner = self._owners[n]
                later = owner > j + 1
                if self.training_owner is not None and j + 1 < self.training_owner:
                    later = later | (owner == 0)
                free = self._free[n] if self._free is not None else torch.zeros((), dtype=w.dtype, device=w.device)
                w.copy_(torch.where(later, free, self._saved[n]))
        self.experience = j

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)


class PackNet(Method):
    name = "packnet"
    needs_stream = True

    @dataclass
    class Options(MethodOptions):
        lr: float = 1e-5
        keep: float = 0.5  # fraction of the free entries each experience keeps
        retrain_fraction: float = 0.3  # fraction of the steps that retrain after pruning
        reset: str = "base"  # the free value: base | zero
        criterion: str = "magnitude"  # magnitude | change
        target_modules: list[str] | str | None = field(default_factory=lambda: list(LLAMA_LINEAR))  # null: the same
        weight_decay: float = 0.1
        betas: tuple[float, float] = (0.9, 0.95)

        def validate(self) -> None:
            super().validate()
            self.require(0.0 <= self.keep <= 1.0, "keep", "a fraction in [0, 1]")
            self.between("retrain_fraction", 0, 1, high_open=True)
            self.one_of("reset", RESETS)
            self.one_of("criterion", CRITERIA)
            self.at_least("weight_decay", 0)
            t = self.target_modules
            self.target_modules = [t] if isinstance(t, str) else list(t or LLAMA_LINEAR)
            self.betas = tuple(self.betas)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.keep, self.retrain_fraction, self.reset, self.criterion = o.keep, o.retrain_fraction, o.reset, o.criterion
        self.targets, self.weight_decay, self.betas = o.target_modules, o.weight_decay, tuple(o.betas)
        self.owners: dict[str, torch.Tensor] = {}  # module name -> int16 owner map (0 free, k owned by k)
        self.base: dict[str, torch.Tensor] = {}  # reset "base": the free value of every entry
        self.done = 0  # finished experiences
        self._weights: dict[str, nn.Parameter] = {}
        self._ref: dict[str, torch.Tensor] = {}  # value every non-trainable entry is held at
        self._before: dict[str, torch.Tensor] = {}
        self._trainable: dict[str, torch.Tensor] = {}
        self._prune_at: int | None = None
        self._pruned = False
        self._free_at_start = 0

    # --- hooks -----------------------------------------------------------------------
    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        if isinstance(model, PackNetModel):
            model.set_experience(None)
            model.training_owner = self.done + 1  # the old wrapper may still score curve points
            model = model.model
        weights = decoder_linear_weights(model, self.targets)
        if not weights:
            raise ConfigError(f"packnet target_modules {self.targets} match no linear layer of the decoder layers.")
        if self.owners and set(self.owners) != set(weights):
            raise ConfigError("packnet's saved owner maps do not match this model's linear layers.")
        freeze_all(model)
        self._weights = weights
        for n, w in weights.items():
            w.requires_grad_(True)
            if n not in self.owners:
                self.owners[n] = torch.zeros(w.shape, dtype=torch.int16, device=w.device)
            self.owners[n] = self.owners[n].to(w.device)
            if self.reset == "base":
                self.base[n] = self.base[n].to(w.device) if n in self.base else w.detach().clone()
        self._before = {n: w.detach().clone() for n, w in weights.items()}
        self._ref = {n: b.clone() for n, b in self._before.items()}
        self._trainable = {n: o == 0 for n, o in self.owners.items()}
        self._free_at_start = sum(int(m.sum()) for m in self._trainable.values())
        exp = context.experience if context is not None else None
        steps = getattr(exp, "steps", None)
        self._prune_at = max(1, min(steps, math.ceil((1.0 - self.retrain_fraction) * steps))) if steps else None
        self._pruned = False
        self._optimizers = [adamw(list(weights.values()), lr=self.lr, weight_decay=self.weight_decay,
                                              betas=self.betas)]
        return model

    def after_backward(self, model: nn.Module, step: int) -> None:
        for n, w in self._weights.items():
            if w.grad is not None:
                w.grad.masked_fill_(~self._trainable[n], 0.0)

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        for n, w in self._weights.items():
            w.copy_(torch.where(self._trainable[n], w, self._ref[n]))
        if self._prune_at is not None and step + 1 == self._prune_at and not self._pruned:
            self.prune()

    @torch.no_grad()
    def prune(self) -> None:
        """Step 2 of the module docstring: the kept free entries become owned by this experience."""
        k = self.done + 1
        for n, w in self._weights.items():
            score = w.abs() if self.criterion == "magnitude" else (w - self._before[n]).abs()
            reset = prune_free_entries(self.owners[n], score, k, self.keep)
            if self.reset == "zero":
                self._ref[n] = self._ref[n].masked_fill(reset, 0.0)
            w.copy_(torch.where(reset, self._ref[n], w))
            self._trainable[n] = self.owners[n] == k
            for opt in self._optimizers:  # no stale Adam moments on entries now held fixed
                for key, v in opt.state.get(w, {}).items():
                    if torch.is_tensor(v) and v.shape == w.shape:
                        v.masked_fill_(reset, 0.0)
        self._pruned = True

    def export(self, model: nn.Module) -> nn.Module:
        if isinstance(model, PackNetModel):
            return model
        if not self._pruned:  # step count unknown (or no loop ran): prune now, without retraining
            self.prune()
        self.done += 1
        for w in self._weights.values():
            w.requires_grad_(False)
        free = self.base if self.reset == "base" else None
        return PackNetModel(model, self._weights, self.owners, free)

    def checkpoint_model(self, model: nn.Module) -> nn.Module:
        if isinstance(model, PackNetModel):
            model.set_experience(None)
            return model.model
        return model

    def trainable_params_per_step(self) -> int:
        """Entries the last experience could change (its free entries before pruning)."""
        return self._free_at_start

    # --- state -----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = nest("owner", self.owners)
        out.update(nest("base", self.base))
        out["done"] = torch.tensor([self.done], dtype=torch.int64)
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.owners = {k: v.to(torch.int16) for k, v in unnest("owner", state).items()}
        self.base = unnest("base", state)
        self.done = int(state["done"][0]) if "done" in state else 0

    # --- reporting -------------------------------------------------------------------
    def growth(self) -> list[int]:
        """Entries owned by each finished experience (1, 2, ...): the parameter growth."""
        return [sum(int((o == k).sum()) for o in self.owners.values()) for k in range(1, self.done + 1)]

    def describe(self) -> dict[str, Any]:
        total = sum(o.numel() for o in self.owners.values())
        free = sum(int((o == 0).sum()) for o in self.owners.values())
        return {**super().describe(), "growth": self.growth(), "linear_params": total, "free_params": free}
