"""Continuum-memory updates ("cms"): MLP levels that step at their own periods (Nested Learning,
Behrouz et al. 2025), as a method on any Llama-style model.

The parameters are split into levels, each with a period C (optimizer steps):

- the plain MLP of each decoder layer, with the period given by ``periods`` (below);
- every level of every ``ContinuumMLP`` block (``models.cms``), with the block's own periods;
- everything else ("others": attention, embeddings, norms, product-key memories) trains every
  step (``others: train``, like C = 1) or not at all (``others: freeze``).

The rule (``LevelSchedule``), with t the method's step counter (0, 1, 2, ... over the *whole*
stream: it does not restart at an experience, and it is saved with the run's state):

    every step:          A_l += g_l(t)                     (g_l: the level's gradient this step)
    if (t + 1) % C_l == 0:  grad_l := A_l / C_l,  A_l := 0  (the optimizer steps level l with the mean)
    otherwise:           grad_l := None                     (AdamW neither steps nor decays level l)

A level with C = 1 is stepped with its own gradient every step. Within a chunk the level's
weights are fixed, so A_l / C_l is the mean gradient of C_l batches at the same weights
(a C_l-times larger batch), while faster levels move in between. The rule runs in
``after_backward``, before the engine clips the dense gradients: on a step the clip sees the
accumulated *mean* (the scale of one step's gradient, not C_l times it) together with the
fresh gradients of the levels that step then; skipped levels have no gradient and are not
part of the norm. Pending sums carry over experience boundaries (a period longer than an
experience still updates), and over an interrupted run through ``state_tensors``.

Each level keeps its own AdamW moments, which advance only on its own steps (a fresh
optimizer per experience, as in every method here).

``periods`` (the plain MLPs), YAML-friendly, either
- a list with one entry per decoder layer: an integer period (0 freezes that MLP), or null
  for a layer without a plain MLP of its own (a CMS block or a product-key memory), e.g.
  ``[1, 4, null, 16]`` on the shipped base (layer 2 holds the memory); null on a plain MLP
  means 1;
- a mapping period -> layers, e.g. ``{4: [1], 16: [3]}``; plain MLPs not named get period 1;
- null (default): the plain MLPs get 1, 4, 16, ... by depth (a factor 4 per plain-MLP layer),
  unless the model has CMS blocks, in which case they get 1 and only the blocks' levels are
  slow.

What is left out of Nested Learning / HOPE: the self-modifying Titans memory, per-token
(in-context) updates of the levels at test time, per-level learning rates (all levels share
``lr``), and the paper's *sum* of the chunk's gradients (here the mean; with Adam the two
differ only through epsilon, clipping and weight decay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.cms import ContinuumMLP, LevelSchedule, NamedParams, cms_named_levels
from ..models.memory import (
    ParallelMemory,
    ProductKeyMemory,
    decoder_layers,
    memory_layers,
)
from ..training.optim import adamw
from .base import Method, MethodContext, MethodOptions


def _check_period(c: Any, where: str) -> int:
    if isinstance(c, bool) or not isinstance(c, int) or c < 0:
        raise ConfigError(f"cms {where} must be a period in steps (an integer >= 0; 0 freezes), got {c!r}.")
    return c


def _normalise_periods(periods: Any) -> list[int | None] | dict[int, list[int]] | None:
    """Validate the ``periods`` option (layer indices are checked against the model in setup)."""
    if periods is None:
        return None
    if isinstance(periods, (list, tuple)):
        return [None if c is None else _check_period(c, "periods entries") for c in periods]
    if isinstance(periods, dict):
        out: dict[int, list[int]] = {}
        seen: set[int] = set()
        for key, layers in periods.items():
            try:
                c = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"cms periods keys must be periods (integers), got {key!r}.") from None
            _check_period(c, "periods keys")
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = [layers]
            if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                for i in layers):
                raise ConfigError(f"cms periods[{key}] must be a list of decoder layer indices, got {layers!r}.")
            if seen & set(layers):
                raise ConfigError(f"cms periods names layer(s) {sorted(seen & set(layers))} twice.")
            seen |= set(layers)
            out.setdefault(c, []).extend(layers)
        return out
    raise ConfigError(f"cms periods must be a list (one per layer), a mapping period -> layers or null, "
                      f"got {periods!r}.")


class ContinuumUpdates(Method):
    name = "cms"

    @dataclass
    class Options(MethodOptions):
        lr: float = 1e-5
        periods: Any = None  # null | a period per decoder layer | {period: [layer indices]}
        others: str = "train"  # train | freeze: the parameters outside every level
        weight_decay: float = 0.1
        betas: tuple[float, float] = (0.9, 0.95)
        optimizer: str = "adamw"  # adamw | sgd
        grad_clip: float | None = 1.0  # max gradient norm (null: no clipping)

        def validate(self) -> None:
            super().validate()
            self.one_of("others", ("train", "freeze"))
            self.one_of("optimizer", ("adamw", "sgd"))
            self.at_least("weight_decay", 0)
            if self.grad_clip is not None:
                self.positive("grad_clip")
            _normalise_periods(self.periods)
            self.betas = tuple(self.betas)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.periods = _normalise_periods(o.periods)
        self.others, self.weight_decay, self.betas, self.optimizer = o.others, o.weight_decay, tuple(o.betas), o.optimizer
        self.grad_clip = o.grad_clip
        self.schedule = LevelSchedule()

    # ------------------------------------------------------------------ levels
    def _mlp_periods(self, blocks: nn.ModuleList, has_cms: bool) -> dict[int, tuple[int, nn.Module]]:
        """Layer -> (period, plain MLP module) for the layers that hold a plain MLP."""
        plain: dict[int, nn.Module] = {}
        for i, b in enumerate(blocks):
            m = b.mlp
            if isinstance(m, ParallelMemory):
                plain[i] = m.mlp
            elif not isinstance(m, (ProductKeyMemory, ContinuumMLP)):
                plain[i] = m
        n, spec = len(blocks), self.periods
        if spec is None:
            return {i: (1 if has_cms else 4 ** r, m) for r, (i, m) in enumerate(sorted(plain.items()))}
        if isinstance(spec, list):
            if len(spec) != n:
                raise ConfigError(f"cms periods lists {len(spec)} entries, but the model has {n} decoder layers.")
            for i, c in enumerate(spec):
                if c is not None and i not in plain:
                    raise ConfigError(f"cms periods[{i}] = {c}, but decoder layer {i} holds no plain MLP "
                                      f"(a CMS block or a memory); give null there.")
            return {i: (1 if spec[i] is None else spec[i], m) for i, m in plain.items()}
        out = {i: (1, m) for i, m in plain.items()}
        for c, layers in spec.items():
            for i in layers:
                j = i % n if -n <= i < n else i
                if j not in plain:
                    raise ConfigError(f"cms periods names decoder layer {i}, which holds no plain MLP "
                                      f"(the model has {n} layers).")
                out[j] = (c, plain[j])
        return out

    def levels(self, model: nn.Module) -> list[tuple[int, NamedParams]]:
        """(period, [(name, parameter)]) of every level; period 0 = frozen. Others are not included."""
        names = {id(p): n for n, p in model.named_parameters()}
        blocks = decoder_layers(model)
        has_cms = any(isinstance(m, ContinuumMLP) for m in model.modules())
        out = [(c, [(names[id(p)], p) for p in m.parameters()]) for _, (c, m) in
               sorted(self._mlp_periods(blocks, has_cms).items())]
        return out + cms_named_levels(model)

    # ------------------------------------------------------------------ hooks
    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        levels = self.levels(model)
        in_level = {id(p) for _, named in levels for _, p in named}
        for p in model.parameters():
            if id(p) not in in_level:
                p.requires_grad_(self.others == "train")
        for c, named in levels:
            for _, p in named:
                p.requires_grad_(c > 0)
        if self.others == "train":
            for mem in memory_layers(model):
                mem.config.sparse_values = False  # AdamW needs dense gradients on the value table
        self.schedule.set_levels([(c, named) for c, named in levels if c > 0])
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("cms trains nothing: every level is frozen and others is 'freeze'.")
        if self.optimizer == "adamw":
            opt = adamw(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        self._optimizers = [opt]
        return model

    def after_backward(self, model: nn.Module, step: int) -> None:
        self.schedule.after_backward()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.schedule.state_tensors()

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.schedule.load_state_tensors(state)
