"""Sparse memory finetuning (Lin et al. 2025): train only the memory slots a batch uses
*specifically*, compared with how often they are used on background (pretraining) data.

For each batch and memory layer:

    c(i)     = reads of slot i in the batch (tokens x heads x k, padding masked)
    tf(i)    = c(i) / sum_j c(j)
    idf(i)   = log((|B| + 1) / (df(i) + 1))      df(i): background documents that read slot i,
                                                  |B|: number of background documents
    score(i) = tf(i) * idf(i)

The values of the top-t slots (by score, among the slots read) get an SGD update; every
other parameter (keys, query, gates, all other layers, the other rows) is frozen and stays
bit-for-bit unchanged. SGD, not AdamW: momentum and weight decay would move masked rows.
The background statistics are the ones stored with the model (``memory_stats.safetensors``):
by default those of the pretraining mixture (general text and fact lines, as trained), or
``background="general"`` for general text only.

Ablations: ``ranking="tf"`` (no IDF) and ``ranking="all"`` (every slot the batch read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models.checkpoint import MIX_PREFIX
from ..models.memory import AccessLog, named_memory_layers
from .base import Method, MethodContext, MethodOptions, freeze_all

RANKINGS = ("tfidf", "tf", "all")
# "mix": the pretraining mixture (general text + fact lines), "general": general text only
BACKGROUNDS = {"mix": MIX_PREFIX, "general": ""}


def tfidf_scores(counts: torch.Tensor, doc_freq: torch.Tensor, n_docs: int) -> torch.Tensor:
    """score(i) = c(i)/sum(c) * log((n_docs + 1) / (doc_freq(i) + 1))."""
    counts = counts.double()
    tf = counts / counts.sum().clamp_min(1.0)
    idf = torch.log((n_docs + 1.0) / (doc_freq.double() + 1.0))
    return tf * idf


def select_top_slots(scores: torch.Tensor, counts: torch.Tensor, t: int) -> torch.Tensor:
    """Indices of the top-t slots by score among the slots that were read (ties: lower index)."""
    read = (counts > 0).nonzero().flatten()
    if read.numel() <= t:
        return read
    order = torch.argsort(scores[read], descending=True, stable=True)
    return read[order[:t]].sort().values


def keep_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A sparse gradient restricted to the given rows (dense gradients are masked too)."""
    if grad.is_sparse:
        g = grad.coalesce()
        idx, val = g.indices(), g.values()
        keep = torch.isin(idx[0], rows.to(idx.device))
        return torch.sparse_coo_tensor(idx[:, keep], val[keep], g.shape, check_invariants=False).coalesce()
    mask = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
    mask[rows] = True
    return grad * mask[:, None]


class SparseMemoryFinetune(Method):
    name = "smf"
    grad_clip = None  # plain SGD on the selected rows, as in the paper

    @dataclass
    class Options(MethodOptions):
        lr: float = 3.0
        top_t: int = 500  # value rows trained per step and memory layer
        ranking: str = "tfidf"  # tfidf | tf | all (ablations)
        background: str = "mix"  # the IDF background: mix (pretraining mixture) | general

        def validate(self) -> None:
            super().validate()
            self.positive("top_t", integer=True)
            self.one_of("ranking", RANKINGS)
            self.one_of("background", BACKGROUNDS)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.top_t, self.ranking, self.background = self.options.top_t, self.options.ranking, self.options.background
        self.last_selected: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        self.mems = named_memory_layers(model)
        if not self.mems:
            raise ConfigError("sparse memory finetuning needs a model with a product-key memory layer.")
        stats = context.memory_stats
        if self.ranking == "tfidf":
            if not stats:
                raise CheckpointError("the model folder has no memory_stats.safetensors: TF-IDF slot selection "
                                      "needs background statistics (use ranking: tf, or re-collect them).")
            pre = BACKGROUNDS[self.background]
            if f"{pre}{next(iter(self.mems))}.doc_freq" not in stats:
                raise CheckpointError(f"the model's memory statistics have no '{self.background}' background.")
            self.idf_stats = {n: (stats[f"{pre}{n}.doc_freq"], int(stats[f"{pre}{n}.n_docs"])) for n in self.mems}
        freeze_all(model)
        values = []
        for m in self.mems.values():
            m.config.sparse_values = True
            m.values.requires_grad_(True)
            m.access_log = AccessLog(m.n_slots, keep_last=True)
            values.append(m.values)
        self._optimizers = [torch.optim.SGD(values, lr=self.lr)]
        return model

    def after_backward(self, model: nn.Module, step: int) -> None:
        for name, m in self.mems.items():
            if m.values.grad is None:
                continue
            counts = torch.bincount(m.access_log.last_indices.cpu(), minlength=m.n_slots)
            if self.ranking == "all":
                rows = (counts > 0).nonzero().flatten()
            else:
                if self.ranking == "tfidf":
                    doc_freq, n_docs = self.idf_stats[name]
                    scores = tfidf_scores(counts, doc_freq, n_docs)
                else:
                    scores = counts.double()
                rows = select_top_slots(scores, counts, self.top_t)
            self.last_selected[name] = rows
            m.values.grad = keep_rows(m.values.grad, rows)

    def export(self, model: nn.Module) -> nn.Module:
        for m in self.mems.values():
            m.access_log = None
        return model

    def trainable_params_per_step(self) -> int:
        if self.ranking == "all":
            # every row read by a batch: measured from the last step when available
            rows = sum(r.numel() for r in self.last_selected.values())
            return rows * next(iter(self.mems.values())).v_dim if rows else sum(m.values.numel() for m in self.mems.values())
        return sum(min(self.top_t, m.n_slots) * m.v_dim for m in self.mems.values())
