"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

The quadratic penalty of ``regularization.py`` with the diagonal Fisher information as the
importance of each parameter:

    L = L_task + sum_k (lambda / 2) * sum_i F_k,i (theta_i - theta*_k,i)^2

- ``ewc``:        one (F_k, theta*_k) pair per finished experience k.
- ``online_ewc``: one pair, F <- gamma F + F_new and theta* <- the latest parameters.

Fisher estimate (option ``fisher``), over ``fisher_batches`` batches of the experience's
training data, one gradient per batch (the batch's mean token log-likelihood), squared and
averaged over the batches:

- ``empirical`` (default): the gradient of the log-likelihood of the observed tokens (the
  training labels).
- ``sampled``: the "true" Fisher's Monte-Carlo estimate: at every labelled position one token
  is drawn from the model's own distribution, and the gradient of its log-likelihood is used
  (one sample per position).

Anchor (option ``anchor``):

- ``experience`` (default): one term per finished experience, as above.
- ``base``: one term only, computed in ``setup`` before the first experience: the Fisher on
  ``anchor_batches`` windows of background text (``background_text.jsonl``: the model folder's, else the
  shipped sample of general text; ``background_file`` overrides it), anchored at the base model's
  parameters. Training then stays near the pretrained model, weighted by what general text needs;
  nothing is added after an experience.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.batches import lm_batch
from ..models.folder import eval_file, load_background_ids
from .base import lm_loss_masked
from .regularization import (
    QuadraticRegularizer,
    mean_gradient_statistic,
    quadratic_penalty,
)

__all__ = ["EWC", "OnlineEWC", "empirical_fisher", "sampled_fisher", "quadratic_penalty"]


def empirical_fisher(model: nn.Module, loss_fn, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of each batch's mean token NLL."""
    return mean_gradient_statistic(model, loss_fn, batches, torch.square)


def sampled_fisher(model: nn.Module, batches: list[dict], seed: int = 0) -> dict[str, torch.Tensor]:
    """Like ``empirical_fisher``, but the labels are drawn from the model's own predictions."""
    g = torch.Generator().manual_seed(seed)
    sampled = []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            draw = torch.multinomial(logits.softmax(-1).reshape(-1, logits.shape[-1]).cpu(), 1, generator=g)
            labels = b["labels"].clone()
            keep = labels[:, 1:] != -100
            labels[:, 1:] = torch.where(keep, draw.view(keep.shape).to(labels.device), labels[:, 1:])
            sampled.append({**b, "labels": labels})
    return mean_gradient_statistic(model, lm_loss_masked, sampled, torch.square)


class EWC(QuadraticRegularizer):
    name = "ewc"
    needs_stream = True

    @dataclass
    class Options(QuadraticRegularizer.Options):
        fisher_batches: int = 8  # training batches of the experience the Fisher is estimated on
        fisher: str = "empirical"  # empirical | sampled
        anchor: str = "experience"  # experience | base (one term: the base's Fisher on background text)
        anchor_batches: int = 8  # anchor: base: background windows the Fisher is estimated on
        anchor_seq_len: int = 128
        anchor_batch_size: int = 4
        background_file: str | None = None  # anchor: base: JSONL of {"text": ...} (default background_text.jsonl)

        def validate(self) -> None:
            super().validate()
            self.positive("fisher_batches", integer=True)
            self.one_of("fisher", ("empirical", "sampled"))
            self.one_of("anchor", ("experience", "base"))
            for key in ("anchor_batches", "anchor_seq_len", "anchor_batch_size"):
                self.positive(key, integer=True)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.fisher_batches, self.fisher = self.options.fisher_batches, self.options.fisher
        self.anchor = self.options.anchor

    def setup(self, model: nn.Module, context) -> nn.Module:
        model = super().setup(model, context)
        o = self.options
        if self.anchor == "base" and not self.terms:  # before the first experience: the base's Fisher on general text
            path = o.background_file or eval_file(context.model_dir, "background_text.jsonl", "ewc anchor: base")
            ids = load_background_ids(path, context.tokenizer)
            device = next(model.parameters()).device
            seq = min(o.anchor_seq_len, ids.numel() - 2)
            batches = [{k: v.to(device) for k, v in lm_batch(ids, seq, o.anchor_batch_size, 4242 + i).items()}
                       for i in range(o.anchor_batches)]
            omega = (sampled_fisher(model, batches) if self.fisher == "sampled"
                     else empirical_fisher(model, self.task_loss, batches))
            self.terms = [(omega, {n: p.detach().clone() for n, p in model.named_parameters() if n in omega})]
        return model

    def after_experience(self, model: nn.Module, experience) -> None:
        if self.anchor != "base":  # anchored at the base: the one term from setup stays
            super().after_experience(model, experience)

    def importance(self, model: nn.Module, experience) -> dict[str, torch.Tensor]:
        batches = [experience.train_batch(i) for i in range(min(self.fisher_batches, experience.steps))]
        if self.fisher == "sampled":
            return sampled_fisher(model, batches)
        return empirical_fisher(model, self.task_loss, batches)


class OnlineEWC(EWC):
    name = "online_ewc"

    @dataclass
    class Options(EWC.Options):
        online: bool = field(default=True, init=False)  # always online
        gamma: float = 0.9
