"""The shared machinery of the quadratic-penalty family (EWC, online EWC, SI, MAS).

Every member is full fine-tuning plus a penalty that holds each parameter near its value
after earlier experiences, in proportion to an importance weight Omega_i:

    L = L_task + (lambda / 2) * sum_k sum_i Omega_k,i (theta_i - theta*_k,i)^2

Members differ only in how Omega is estimated after (or during) an experience:

- EWC  (``ewc.py``): the diagonal Fisher information.
- SI   (``si.py``):  the path integral of gradient x update over the experience.
- MAS  (``mas.py``): the sensitivity of the squared output norm to each parameter.

Anchors: ``online = False`` keeps one (Omega_k, theta*_k) pair per finished experience;
``online = True`` keeps one pair, Omega <- gamma * Omega + Omega_new and theta* <- the latest
parameters. Terms are kept by ``state_tensors()``, so a resumed run has the same penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import nest, unnest_list
from .full import FullFinetune

Importance = dict[str, torch.Tensor]


def quadratic_penalty(model: nn.Module, terms: list[tuple[Importance, Importance]], lam: float) -> torch.Tensor:
    """(lam / 2) * sum over (importance, anchor) terms of sum_i importance_i (theta_i - anchor_i)^2."""
    total = torch.zeros((), device=next(model.parameters()).device)
    params = dict(model.named_parameters())
    for importance, anchor in terms:
        for n, w in importance.items():
            total = total + (w * (params[n] - anchor[n]) ** 2).sum()
    return 0.5 * lam * total


def mean_gradient_statistic(model: nn.Module, objective, batches: list[dict], stat) -> Importance:
    """Mean over batches of ``stat(gradient)`` of ``objective(model, batch)``, per trainable
    parameter (EWC: the squared gradient of the NLL; MAS: the absolute gradient of the output norm)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    was = model.training
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        objective(model, batch).backward()
        for n, p in params.items():
            if p.grad is not None:
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                total[n] += stat(g.detach())
    model.zero_grad(set_to_none=True)
    model.train(was)
    return {n: t / max(len(batches), 1) for n, t in total.items()}


class QuadraticRegularizer(FullFinetune):
    """Base class: subclasses implement ``importance(model, experience)``."""

    name = "quadratic"

    @dataclass
    class Options(FullFinetune.Options):
        lam: float = 100.0  # lambda, the weight of the penalty
        online: bool = False  # one running (importance, anchor) pair instead of one per experience
        gamma: float = 1.0  # online: decay of the old importance

        def validate(self) -> None:
            super().validate()
            self.at_least("lam", 0)
            self.between("gamma", 0, 1)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.lam, self.online, self.gamma = self.options.lam, self.options.online, self.options.gamma
        self.terms: list[tuple[Importance, Importance]] = []

    def importance(self, model: nn.Module, experience) -> Importance:
        raise NotImplementedError

    def task_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return super().loss(model, batch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        task = self.task_loss(model, batch)
        return task + quadratic_penalty(model, self.terms, self.lam) if self.terms else task

    def after_experience(self, model: nn.Module, experience) -> None:
        omega = self.importance(model, experience)
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in omega}
        if self.online and self.terms:
            old, _ = self.terms[0]
            omega = {n: self.gamma * old[n] + w for n, w in omega.items()}
            self.terms = [(omega, anchor)]
        else:
            self.terms.append((omega, anchor))

    def importance_summary(self) -> dict[str, float]:
        """Total and mean importance of the latest term (to choose lambda: see the configs)."""
        if not self.terms:
            return {}
        omega = self.terms[-1][0]
        total = sum(float(w.sum()) for w in omega.values())
        return {"importance_sum": total, "importance_mean": total / max(sum(w.numel() for w in omega.values()), 1)}

    def describe(self) -> dict:
        """Options plus the size of the latest importance term (empty before the first experience)."""
        return {**super().describe(), **self.importance_summary(), "importance_terms": len(self.terms)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, (f, a) in enumerate(self.terms):
            out.update(nest(f"fisher.{k}", f))
            out.update(nest(f"anchor.{k}", a))
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.terms = list(zip(unnest_list("fisher", state), unnest_list("anchor", state)))
