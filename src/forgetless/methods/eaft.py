"""Entropy-adaptive fine-tuning (EAFT, arXiv 2601.02151): full fine-tuning whose token loss is
weighted by the model's own normalised top-K entropy at that position, under stop-gradient:

    L = sum_t w_t * (-log p(y_t)) / sum_t 1,    w_t = H_K(p_t) / ln K  in [0, 1]

where H_K is the entropy of the softmax renormalised over the K largest logits (K = 20).
Tokens the model is already confident about (low entropy: a strong prior, e.g. general
knowledge) get small weights, so the update concentrates on uncertain tokens and
overwrites less of what the model knew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .full import FullFinetune


def eaft_weights(logits: torch.Tensor, top_k: int = 20) -> torch.Tensor:
    """Normalised top-K entropy of each position's distribution, in [0, 1], without gradient."""
    with torch.no_grad():
        k = min(top_k, logits.shape[-1])
        p = logits.float().topk(k, dim=-1).values.softmax(-1)
        h = -(p * p.clamp_min(1e-12).log()).sum(-1)
        return (h / math.log(k)).clamp(0.0, 1.0)


class EAFT(FullFinetune):
    name = "eaft"

    @dataclass
    class Options(FullFinetune.Options):
        top_k: int = 20  # K of the top-K entropy

        def validate(self) -> None:
            super().validate()
            self.require(self.top_k >= 2, "top_k", "an integer >= 2")

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.top_k = self.options.top_k

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp_min(0),
                              reduction="none").view_as(labels)
        w = eaft_weights(logits, self.top_k)
        return (w * nll * mask).sum() / mask.sum().clamp_min(1)
