"""Averaged gradient episodic memory (A-GEM, Chaudhry et al. 2019).

Full fine-tuning whose update never increases the loss on an episodic memory of earlier
experiences, to first order. At every step, with g the gradient of the current batch and
g_ref the gradient of a batch of ``ref_size`` sequences sampled from the memory:

    g~ = g - (g . g_ref / g_ref . g_ref) g_ref     if g . g_ref < 0
    g~ = g                                         otherwise

over all trainable parameters as one vector. The memory is a reservoir buffer
(``buffer_size`` sequences) of the training sequences of *finished* experiences only: the
current experience's sequences are collected in a reservoir of their own and join the
memory when the experience ends, so the reference gradient always stands for the past.
The memory and its random state are saved with a run's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.batches import batch_rows, pad_rows
from .base import MethodContext
from .full import FullFinetune
from .replay import ReservoirBuffer


def agem_project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's projection of a flat gradient: unchanged when g . g_ref >= 0."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - (dot / torch.dot(g_ref, g_ref).clamp_min(1e-30)) * g_ref


class AGEM(FullFinetune):
    name = "agem"
    needs_stream = True

    @dataclass
    class Options(FullFinetune.Options):
        buffer_size: int = 512  # sequences of finished experiences kept
        ref_size: int = 16  # sequences of the reference gradient
        seed: int = 0

        def validate(self) -> None:
            super().validate()
            self.positive("buffer_size", integer=True)
            self.positive("ref_size", integer=True)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.memory = ReservoirBuffer(o.buffer_size, o.seed)
        self._current = ReservoirBuffer(o.buffer_size, o.seed + 1)
        self.ref_size = o.ref_size
        self.projected = 0  # steps whose gradient was projected (over the whole stream)
        self.steps = 0

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        self._current = ReservoirBuffer(self.memory.capacity, self.options.seed + 1 + self.memory.seen)
        return super().setup(model, context)

    def before_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        for r in batch_rows(batch):  # the current experience's reservoir (memory for later experiences)
            self._current.add(r)
        return batch

    def after_backward(self, model: nn.Module, step: int) -> None:
        self.steps += 1
        ref_rows = self.memory.sample(self.ref_size)
        if not ref_rows:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        g = torch.cat([p.grad.reshape(-1) for p in params])
        pad = int(getattr(model.config, "pad_token_id", None) or 0)
        device = params[0].device
        ref = {k: v.to(device) for k, v in pad_rows(ref_rows, pad).items()}
        g_ref = torch.autograd.grad(super().loss(model, ref), params, allow_unused=True)
        g_ref = torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(g_ref, params)])
        new = agem_project(g, g_ref)
        if new is not g:
            self.projected += 1
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(new[offset:offset + n].view_as(p))
                offset += n

    def after_experience(self, model: nn.Module, experience) -> None:
        for r in self._current.items:  # the next setup starts a fresh reservoir for the next experience
            self.memory.add(r)

    def describe(self) -> dict:
        return {**super().describe(), "projected_steps": self.projected, "steps": self.steps}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.memory.state_tensors(), "counts": torch.tensor([self.projected, self.steps])}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.memory.load_state_tensors(state)
        if "counts" in state:
            self.projected, self.steps = (int(v) for v in state["counts"].tolist())
