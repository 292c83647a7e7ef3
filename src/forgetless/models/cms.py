"""Continuum memory system (CMS) blocks, after Nested Learning (Behrouz et al. 2025).

A CMS block replaces the single MLP of a decoder layer by a chain of L MLPs, level l having
its own update period C_l (in optimizer steps). The paper writes the chain as a plain
composition y = MLP_L(...MLP_1(x)); here every level has a residual connection so that the
block can start as the pretrained MLP exactly:

    h_0 = x
    o_l = MLP_l(h_{l-1}),   h_l = h_{l-1} + o_l          l = 1..L
    y   = o_1 + o_2 + ... + o_L   ( = h_L - x )

``y`` is the block's output, which the decoder layer adds to its own residual stream as it
would the output of the MLP it replaces (``x`` is the post-attention RMSNorm output).

Each new level is a SwiGLU MLP like Llama's, ``down(silu(gate(h)) * up(h))``, with no bias.
``add_cms`` keeps the layer's existing MLP module as level 1 (its weights untouched) and
adds levels 2..L with random ``gate``/``up`` (normal, std = the config's
``initializer_range``) and a zero ``down`` projection: their output is exactly 0 at
initialisation, so the model computes the same function as before. The levels take the
un-normalised h_{l-1} as input (no extra norm: fewer moving parts, but the input scale of a
level is not controlled).

The *periods* are only recorded here (``ContinuumMLP.periods``, ``cms_levels``); the update
rule itself (accumulate level l's gradient, step it every C_l steps with the mean) lives in
``LevelSchedule`` (below; the ``cms`` method in ``forgetless.methods.cms``); ``forgetless pretrain`` applies it to a
base built with a ``model.cms`` section (``configs/smoke-cms.yaml``), and the method ``cms``
applies it while learning a stream. Without the schedule all levels would train every step,
i.e. the block would be a deeper residual MLP.

What of HOPE is left out: the self-modifying Titans memory and any test-time (in-context)
update of the levels; levels update only during training, per optimizer step, not per token
chunk. A layer whose MLP slot holds a product-key memory (``mode: replace``) cannot take a
CMS block; with ``mode: parallel`` the memory's companion MLP is a plain MLP and can.

The placement is stored in ``model.config`` under ``forgetless_cms`` so that
``models.checkpoint.load_model`` rebuilds the blocks (after the memory layers) before it
loads the weights strictly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .memory import ParallelMemory, ProductKeyMemory, decoder_layers

CMS_CONFIG_KEY = "forgetless_cms"


@dataclass
class CMSConfig:
    """Where CMS blocks sit and their shape.

    ``layers``: decoder layers whose MLP becomes a CMS block (None: every layer with a plain MLP).
    ``periods``: C_1..C_L, one per level; level 1 is the layer's existing MLP.
    ``hidden``: width of the new levels' SwiGLU (None: the model's ``intermediate_size``).
    """

    layers: list[int] | None = None
    periods: list[int] | None = None
    hidden: int | None = None

    def __post_init__(self) -> None:
        if self.periods is None:
            self.periods = [1, 4, 16]
        self.periods = list(self.periods)
        if not self.periods:
            raise ConfigError("cms.periods must list at least one period (level 1 is the existing MLP).")
        for c in self.periods:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ConfigError(f"cms.periods must be positive integers (steps), got {self.periods}.")
        if self.layers is not None:
            self.layers = list(self.layers)
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"cms.layers lists a layer twice: {self.layers}.")
        if self.hidden is not None and (isinstance(self.hidden, bool) or not isinstance(self.hidden, int)
                                        or self.hidden < 1):
            raise ConfigError(f"cms.hidden must be a positive integer, got {self.hidden!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CMSConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"unknown cms option(s) {bad}; expected some of {sorted(known)}.")
        return cls(**d)


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ContinuumMLP(nn.Module):
    """A chain of L residual MLP levels; level l has update period ``periods[l]`` (see module doc).

    ``first``: the module to use as level 1 (e.g. a pretrained Llama MLP); None makes a fresh
    SwiGLU of width ``hidden``. Levels 2..L are fresh SwiGLUs of width ``hidden`` with zero
    output (zero ``down_proj``).
    """

    def __init__(self, dim: int, hidden: int, periods: list[int], first: nn.Module | None = None,
                 init_std: float = 0.02):
        super().__init__()
        if not periods:
            raise ConfigError("a ContinuumMLP needs at least one level period.")
        self.periods = [int(c) for c in periods]
        levels = [first if first is not None else SwiGLU(dim, hidden)]
        for _ in self.periods[1:]:
            lvl = SwiGLU(dim, hidden)
            nn.init.normal_(lvl.gate_proj.weight, std=init_std)
            nn.init.normal_(lvl.up_proj.weight, std=init_std)
            nn.init.zeros_(lvl.down_proj.weight)
            levels.append(lvl)
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, out = x, None
        for level in self.levels:
            o = level(h)
            out = o if out is None else out + o
            h = h + o
        return out

    def extra_repr(self) -> str:
        return f"periods={self.periods}"


def _plain_mlp_layers(blocks: nn.ModuleList) -> list[int]:
    return [i for i, b in enumerate(blocks)
            if not isinstance(b.mlp, (ProductKeyMemory, ParallelMemory, ContinuumMLP))]


def add_cms(model: nn.Module, layers: list[int] | None = None, periods: list[int] | None = None,
            hidden: int | None = None, config: CMSConfig | None = None) -> nn.Module:
    """Make the MLP of the given decoder layers of an HF Llama-style decoder the first level of a
    ``ContinuumMLP`` (in place); the other levels start with zero output, so the model's function
    is unchanged. The placement is recorded in ``model.config`` for ``save_model``/``load_model``."""
    cfg = config or CMSConfig(layers=layers, periods=periods, hidden=hidden)
    if getattr(model.config, CMS_CONFIG_KEY, None):
        raise ConfigError("this model already has CMS blocks; add all of them in one add_cms call.")
    blocks = decoder_layers(model)
    n = len(blocks)
    chosen = _plain_mlp_layers(blocks) if cfg.layers is None else [i % n if -n <= i < n else i for i in cfg.layers]
    if not chosen:
        raise ConfigError("no decoder layer with a plain MLP to turn into a CMS block.")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"cms.layers names a layer twice: {cfg.layers}.")
    width = cfg.hidden or int(getattr(model.config, "intermediate_size", 0) or 4 * model.config.hidden_size)
    std = float(getattr(model.config, "initializer_range", 0.02))
    for i in chosen:
        if not 0 <= i < n:
            raise ConfigError(f"CMS layer {i} does not exist: the model has {n} decoder layers.")
        old = blocks[i].mlp
        if isinstance(old, (ProductKeyMemory, ParallelMemory)):
            raise ConfigError(f"decoder layer {i} holds a product-key memory; put the CMS block in another layer.")
        if isinstance(old, ContinuumMLP):
            raise ConfigError(f"decoder layer {i} already holds a CMS block.")
        ref = next(old.parameters())
        blocks[i].mlp = ContinuumMLP(model.config.hidden_size, width, cfg.periods, first=old, init_std=std).to(
            device=ref.device, dtype=ref.dtype)
    setattr(model.config, CMS_CONFIG_KEY, CMSConfig(layers=sorted(chosen), periods=cfg.periods, hidden=width).to_dict())
    return model


def cms_blocks(model: nn.Module) -> dict[str, ContinuumMLP]:
    """Module name -> CMS block, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ContinuumMLP)}


def cms_named_levels(model: nn.Module) -> list[tuple[int, list[tuple[str, nn.Parameter]]]]:
    """(period, [(parameter name, parameter)]) of every level of every CMS block, in model order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(c, [(names[id(p)], p) for p in level.parameters()]) for block in cms_blocks(model).values()
            for c, level in zip(block.periods, block.levels)]


def cms_levels(model: nn.Module) -> list[tuple[int, list[nn.Parameter]]]:
    """(period, parameters) of every level of every CMS block, in model order."""
    return [(c, [p for _, p in named]) for c, named in cms_named_levels(model)]


NamedParams = list[tuple[str, nn.Parameter]]


class LevelSchedule:
    """The CMS update rule on (period, [(name, parameter)]) groups; see the module doc.

    Call ``after_backward()`` once per step after ``loss.backward()`` and before the optimizer
    step. ``step`` (the counter t) and ``buffers`` (pending sums A_l, by parameter name) persist
    when ``set_levels`` rebinds the groups to new parameter objects (e.g. after a resume).
    """

    def __init__(self, levels: list[tuple[int, NamedParams]] | None = None, step: int = 0):
        self.step = step
        self.buffers: dict[str, torch.Tensor] = {}
        self.levels: list[tuple[int, NamedParams]] = []
        self.set_levels(levels or [])

    def set_levels(self, levels: list[tuple[int, NamedParams]]) -> None:
        for period, _ in levels:
            if period < 1:
                raise ConfigError(f"a level period must be a positive number of steps, got {period}.")
        self.levels = [(int(c), list(named)) for c, named in levels]
        names = {n for c, named in self.levels if c > 1 for n, _ in named}
        stale = sorted(set(self.buffers) - names)
        if stale:
            raise ConfigError(f"the saved CMS state holds pending gradients of {stale[:3]}, which are not in this "
                              f"model's levels; resume with the same model and periods.")

    @torch.no_grad()
    def after_backward(self) -> None:
        t = self.step
        for period, named in self.levels:
            if period == 1:
                continue  # its own gradient, every step
            due = (t + 1) % period == 0
            for name, p in named:
                buf = self.buffers.pop(name, None)
                g = p.grad
                if g is not None:
                    g = (g.to_dense() if g.is_sparse else g).detach()
                    acc = torch.promote_types(g.dtype, torch.float32)
                    buf = g.to(acc).clone() if buf is None else buf.add_(g.to(acc))
                if due:
                    p.grad = None if buf is None else (buf / period).to(p.dtype)
                else:
                    p.grad = None
                    if buf is not None:
                        self.buffers[name] = buf
        self.step = t + 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"step": torch.tensor([self.step], dtype=torch.long)}
        out.update({f"buf.{n}": b for n, b in self.buffers.items()})
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.step = int(state["step"].reshape(-1)[0]) if "step" in state else 0
        self.buffers = {k[len("buf."):]: v.clone() for k, v in state.items() if k.startswith("buf.")}
