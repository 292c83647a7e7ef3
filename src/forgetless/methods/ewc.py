"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

Full fine-tuning plus a quadratic penalty that holds each parameter near its value after
earlier experiences, in proportion to its estimated importance (the diagonal Fisher):

    L = L_task + sum_k (lambda / 2) * sum_i F_k,i (theta_i - theta*_k,i)^2

- ``ewc``:        one (F_k, theta*_k) pair per finished experience k.
- ``online_ewc``: one pair, F <- gamma F + F_new and theta* <- the latest parameters.

Fisher estimate: the *empirical* diagonal Fisher, i.e. the squared gradient of the
log-likelihood of the observed tokens (the training labels), one gradient per batch of the
experience's training data, averaged over ``fisher_batches`` batches. (Not the sampled-label
Fisher, which draws y from the model instead.)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .full import FullFinetune


def empirical_fisher(model: nn.Module, loss_fn, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of each batch's mean token NLL."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was = model.training
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for n, p in params.items():
            if p.grad is not None:
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                fisher[n] += g.detach() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was)
    return {n: f / max(len(batches), 1) for n, f in fisher.items()}


def quadratic_penalty(model: nn.Module, terms: list[tuple[dict, dict]], lam: float) -> torch.Tensor:
    """(lam / 2) * sum over (importance, anchor) terms of sum_i importance_i (theta_i - anchor_i)^2."""
    total = torch.zeros((), device=next(model.parameters()).device)
    params = dict(model.named_parameters())
    for importance, anchor in terms:
        for n, w in importance.items():
            total = total + (w * (params[n] - anchor[n]) ** 2).sum()
    return 0.5 * lam * total


class EWC(FullFinetune):
    name = "ewc"

    def __init__(self, lr: float = 1e-5, lam: float = 100.0, online: bool = False, gamma: float = 1.0,
                 fisher_batches: int = 8, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)):
        super().__init__(lr=lr, weight_decay=weight_decay, betas=betas)
        if lam < 0 or not 0 <= gamma <= 1:
            raise ConfigError("ewc needs lam >= 0 and 0 <= gamma <= 1.")
        self.hparams.update(lam=lam, online=online, gamma=gamma, fisher_batches=fisher_batches)
        self.lam, self.online, self.gamma, self.fisher_batches = lam, online, gamma, fisher_batches
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        task = super().loss(model, batch)
        return task + quadratic_penalty(model, self.terms, self.lam) if self.terms else task

    def after_experience(self, model: nn.Module, experience) -> None:
        batches = [experience.train_batch(i) for i in range(min(self.fisher_batches, experience.steps))]
        fisher = empirical_fisher(model, super().loss, batches)
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher}
        if self.online and self.terms:
            old_f, _ = self.terms[0]
            fisher = {n: self.gamma * old_f[n] + f for n, f in fisher.items()}
            self.terms = [(fisher, anchor)]
        else:
            self.terms.append((fisher, anchor))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, (f, a) in enumerate(self.terms):
            out.update({f"fisher.{k}.{n}": v for n, v in f.items()})
            out.update({f"anchor.{k}.{n}": v for n, v in a.items()})
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        ks = sorted({int(key.split(".", 2)[1]) for key in state})
        self.terms = [({key.split(".", 2)[2]: v for key, v in state.items() if key.startswith(f"fisher.{k}.")},
                       {key.split(".", 2)[2]: v for key, v in state.items() if key.startswith(f"anchor.{k}.")})
                      for k in ks]


class OnlineEWC(EWC):
    name = "online_ewc"

    def __init__(self, lr: float = 1e-5, lam: float = 100.0, gamma: float = 0.9, **kw):
        super().__init__(lr=lr, lam=lam, online=True, gamma=gamma, **kw)
