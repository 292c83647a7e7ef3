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

Cost: the rows are chosen when the backward reaches the memory layer (scores on the slots
read, not on all N), and that backward computes the gradient of those rows only; all other
parameters are frozen, so autograd computes nothing below the memory layer and no weight
gradient above it.
"""

from __future__ import annotations

import weakref
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


def select_read_slots(indices: torch.Tensor, ranking: str, top_t: int, doc_freq: torch.Tensor | None = None,
                      n_docs: int = 0) -> torch.Tensor:
    """The rows SMF trains for one batch, scored on the slots the batch read only (not all N).

    ``indices``: the batch's reads (padding masked). Same result as ranking all N slots with
    ``tfidf_scores`` / ``select_top_slots`` (slots never read score 0 and are never chosen):
    sorted row ids, ties broken towards the lower index."""
    rows, counts = torch.unique(indices.reshape(-1).cpu(), return_counts=True)  # sorted
    if ranking == "all" or rows.numel() <= top_t:
        return rows
    if ranking == "tfidf":
        scores = tfidf_scores(counts, doc_freq[rows], n_docs)
    else:
        scores = counts.double()
    order = torch.argsort(scores, descending=True, stable=True)
    return rows[order[:top_t]].sort().values


def keep_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A sparse gradient restricted to the given rows (dense gradients are masked too)."""
    if grad.is_sparse:
        g = grad if grad.is_coalesced() else grad.coalesce()
        idx, val = g.indices(), g.values()
        keep = torch.isin(idx[0], rows.to(idx.device))
        if bool(keep.all()):
            return g
        # a subset of sorted unique rows stays sorted and unique: no second coalesce
        return torch.sparse_coo_tensor(idx[:, keep], val[keep], g.shape, is_coalesced=True, check_invariants=False)
    mask = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
    mask[rows] = True
    return grad * mask[:, None]


class _BackwardRows:
    """The memory layer's ``value_grad_rows`` while SMF trains: asks the method for the rows of
    the batch just read. Holds the method weakly, and a copy of the model does not inherit it
    (a deep copy gets None: the copy computes the gradient of every row read, as by default)."""

    def __init__(self, method: "SparseMemoryFinetune", name: str, mem: nn.Module):
        self.method, self.name, self.mem = weakref.ref(method), name, weakref.ref(mem)

    def __call__(self) -> torch.Tensor | None:
        method, mem = self.method(), self.mem()
        return None if method is None or mem is None else method._rows_for_backward(self.name, mem)

    def __deepcopy__(self, memo) -> None:
        return None


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
        self._pending: dict[str, torch.Tensor] = {}  # chosen in the backward, applied in after_backward()

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
        for name, m in self.mems.items():
            m.config.sparse_values = True
            m.values.requires_grad_(True)
            m.access_log = AccessLog(m.n_slots, keep_last=True)
            m.value_grad_rows = _BackwardRows(self, name, m)
            values.append(m.values)
        self._optimizers = [torch.optim.SGD(values, lr=self.lr)]
        return model

    def _rows_for_backward(self, name: str, m) -> torch.Tensor:
        """Called by the memory layer's backward (``value_grad_rows``): the rows to train for the
        batch just read, which are the only rows whose gradient is then computed."""
        rows = self.last_selected[name] = self._pending[name] = self._select(name, m)
        return rows

    def _select(self, name: str, m) -> torch.Tensor:
        doc_freq, n_docs = self.idf_stats[name] if self.ranking == "tfidf" else (None, 0)
        return select_read_slots(m.access_log.last_indices, self.ranking, self.top_t, doc_freq, n_docs)

    def after_backward(self, model: nn.Module, step: int) -> None:
        for name, m in self.mems.items():
            if m.values.grad is None:
                continue
            rows = self._pending.pop(name, None)
            if rows is None:  # the backward did not choose (value_grad_rows replaced): choose now
                rows = self.last_selected[name] = self._select(name, m)
            m.values.grad = keep_rows(m.values.grad, rows)

    def export(self, model: nn.Module) -> nn.Module:
        for m in self.mems.values():
            m.access_log = None
            m.value_grad_rows = None
        return model

    def trainable_params_per_step(self) -> int:
        if self.ranking == "all":
            # every row read by a batch: measured from the last step when available
            rows = sum(r.numel() for r in self.last_selected.values())
            return rows * next(iter(self.mems.values())).v_dim if rows else sum(m.values.numel() for m in self.mems.values())
        return sum(min(self.top_t, m.n_slots) * m.v_dim for m in self.mems.values())
