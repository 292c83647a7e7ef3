"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017): importance from the training path.

While an experience trains, every parameter accumulates its contribution to the fall of the
loss along the path actually taken:

    omega_i += -g_i(t) * (theta_i(t+1) - theta_i(t))        at every optimizer step t

where g is the gradient of the loss that drove the step (the task loss plus the current
penalty, before clipping). At the end of the experience it becomes an importance, normalised
by how far the parameter moved over the whole experience:

    Omega_i = max(omega_i, 0) / (Delta_i^2 + xi),      Delta_i = theta_i(end) - theta_i(start)

Negative path contributions (noise) are clipped to zero. Importances of successive
experiences add up (the paper's cumulative Omega: ``online`` with gamma = 1), with the anchor
at the latest parameters; the penalty is the shared quadratic one of ``regularization.py``.
Cost: two extra copies of the trainable parameters (the previous step and the start) and
one of the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import MethodContext
from .regularization import QuadraticRegularizer


def si_importance(omega: dict[str, torch.Tensor], start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                  xi: float) -> dict[str, torch.Tensor]:
    """Omega = max(omega, 0) / ((end - start)^2 + xi)."""
    return {n: w.clamp_min(0) / ((end[n] - start[n]) ** 2 + xi) for n, w in omega.items()}


class SynapticIntelligence(QuadraticRegularizer):
    name = "si"
    needs_stream = True

    @dataclass
    class Options(QuadraticRegularizer.Options):
        lam: float = 1.0
        online: bool = field(default=True, init=False)  # cumulative importance, always online
        xi: float = 1e-3  # damping of the normalisation

        def validate(self) -> None:
            super().validate()
            self.positive("xi")

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.xi = self.options.xi
        self._start: dict[str, torch.Tensor] = {}
        self._prev: dict[str, torch.Tensor] = {}
        self._grad: dict[str, torch.Tensor] = {}
        self._omega: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        model = super().setup(model, context)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._start = {n: p.detach().clone() for n, p in params.items()}
        self._prev = {n: p.detach().clone() for n, p in params.items()}
        self._omega = {n: torch.zeros_like(p) for n, p in params.items()}
        return model

    def after_backward(self, model: nn.Module, step: int) -> None:
        self._grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if n in self._omega and p.grad is not None}

    def after_step(self, model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self._grad:
                    self._omega[n] -= self._grad[n] * (p - self._prev[n])
                    self._prev[n].copy_(p)
        self._grad = {}

    def importance(self, model: nn.Module, experience) -> dict[str, torch.Tensor]:
        end = {n: p.detach() for n, p in model.named_parameters() if n in self._omega}
        return si_importance(self._omega, self._start, end, self.xi)
