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

Keeping rows off-limits (ours, see the block at the end): ``max_doc_rate`` never trains a slot
read in more than that share of the background documents; ``protect`` never trains the fewest
slots that carry that share of the lookup weight of the model's *known* facts, read from their
training lines (statements and training-template questions of ``facts_known.jsonl``, never the
evaluation probes); a model folder without ``facts_known.jsonl`` has nothing to protect.
Defaults (lr 30, protect 0.9) were chosen on validation facts (docs/smf.md); ``protect=0`` at
lr 2-5 is the paper's method.

Cost: the rows are chosen when the backward reaches the memory layer (scores on the slots
read, not on all N: read counts by ``bincount``, rows kept off-limits by a mask made once), and
that backward computes the gradient of those rows only; all other
parameters are frozen, so autograd computes nothing below the memory layer and no weight
gradient above it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

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
    per_slot = torch.bincount(indices.reshape(-1).cpu())  # O(reads + highest slot), cheaper than unique's sort
    rows = per_slot.nonzero().flatten()  # sorted
    counts = per_slot[rows]
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
        lr: float = 30.0  # with protect 0.9: chosen on validation facts (docs/smf.md)
        top_t: int = 500  # value rows trained per step and memory layer
        ranking: str = "tfidf"  # tfidf | tf | all (ablations)
        background: str = "mix"  # the IDF background: mix (pretraining mixture) | general
        protect: float = 0.9  # never train the rows carrying this share of the known facts' lookup weight (0: off)
        max_doc_rate: float = 1.0  # never train rows read in more than this share of background documents

        def validate(self) -> None:
            super().validate()
            self.positive("top_t", integer=True)
            self.one_of("ranking", RANKINGS)
            self.one_of("background", BACKGROUNDS)
            self.between("protect", 0.0, 1.0, high_open=True)
            self.between("max_doc_rate", 0.0, 1.0, low_open=True)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.top_t, self.ranking, self.background = self.options.top_t, self.options.ranking, self.options.background
        self.protect, self.max_doc_rate = self.options.protect, self.options.max_doc_rate
        self.excluded: dict[str, torch.Tensor] = {}  # rows never trained (protect, max_doc_rate)
        self.last_selected: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}  # chosen in the backward, applied in after_backward()

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        self.mems = named_memory_layers(model)
        if not self.mems:
            raise ConfigError("sparse memory finetuning needs a model with a product-key memory layer.")
        stats = context.memory_stats
        if self.ranking == "tfidf" or self.max_doc_rate < 1.0:
            if not stats:
                raise CheckpointError("the model folder has no memory_stats.safetensors: TF-IDF slot selection "
                                      "needs background statistics (use ranking: tf, or re-collect them).")
            pre = BACKGROUNDS[self.background]
            if f"{pre}{next(iter(self.mems))}.doc_freq" not in stats:
                raise CheckpointError(f"the model's memory statistics have no '{self.background}' background.")
            self.idf_stats = {n: (stats[f"{pre}{n}.doc_freq"], int(stats[f"{pre}{n}.n_docs"])) for n in self.mems}
        if not self.excluded:  # lookups never change under SMF (keys, query frozen): computed once per method
            self.excluded = excluded_rows(model, context, self.mems, self.protect, self.max_doc_rate,
                                          getattr(self, "idf_stats", {}))
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
        reads = m.access_log.last_indices
        if name in self.excluded:  # rows kept off-limits are never chosen
            reads = reads[self._allowed(name, m, reads.device)[reads]]
        return select_read_slots(reads, self.ranking, self.top_t, doc_freq, n_docs)

    def _allowed(self, name: str, m, device: torch.device) -> torch.Tensor:
        """A (n_slots,) bool mask of the rows that may be trained (not in ``self.excluded``), made
        once: indexing it with the reads is cheaper than ``torch.isin`` against the excluded rows."""
        cache = self.__dict__.setdefault("_allowed_masks", {})
        excluded = self.excluded[name]
        made_from, mask = cache.get(name, (None, None))
        if made_from is not excluded or mask.device != device:  # first use, or the excluded rows changed
            mask = torch.ones(m.n_slots, dtype=torch.bool, device=device)
            mask[excluded.to(device)] = False
            cache[name] = (excluded, mask)
        return mask

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


# --------------------------------------------------------------------------- rows kept off-limits
def known_fact_lines(model_dir, limit: int = 2000) -> list[str]:
    """Training lines of the model's known facts (statements and training-template questions),
    never their evaluation probes."""
    from ..data.facts import QUESTIONS, question_lines, read_builtin_facts

    path = Path(model_dir) / "facts_known.jsonl"
    if not path.is_file():
        raise CheckpointError(f"smf protect needs the model's known facts ({path} is missing).")
    lines: list[str] = []
    for f in read_builtin_facts(path):
        lines += [f.statement, *f.paraphrases[:2]]
        if f.relation in QUESTIONS and f.subject:
            lines += question_lines(f)[:2]
    return lines[:limit]


@torch.no_grad()
def protected_rows(model: nn.Module, tok, lines: list[str], mems: dict, share: float,
                   batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per memory layer: the fewest rows carrying ``share`` of the lookup weight of ``lines``."""
    from ..evaluate.smf_diagnosis import heavy_rows

    weight = {n: torch.zeros(m.n_slots, dtype=torch.float64) for n, m in mems.items()}
    logs = {n: AccessLog(m.n_slots, keep_last=True) for n, m in mems.items()}
    old = {n: m.access_log for n, m in mems.items()}
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for n, m in mems.items():
            m.access_log = logs[n]
        tok.padding_side = "right"
        for i in range(0, len(lines), batch_size):
            enc = tok(lines[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            model(**enc)
            for n in mems:
                weight[n].index_add_(0, logs[n].last_indices.cpu(), logs[n].last_weights.double().cpu())
    finally:
        tok.padding_side = "left"
        for n, m in mems.items():
            m.access_log = old[n]
        model.train(was)
    return {n: heavy_rows(w, share) for n, w in weight.items()}


def excluded_rows(model: nn.Module, context: MethodContext, mems: dict, protect: float, max_doc_rate: float,
                  idf_stats: dict) -> dict[str, torch.Tensor]:
    """Rows SMF never trains, per memory layer (empty when both options are off)."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in mems}
    if max_doc_rate < 1.0:
        for n in mems:
            doc_freq, n_docs = idf_stats[n]
            out[n].append((doc_freq.double() / max(n_docs, 1) > max_doc_rate).nonzero().flatten())
    if protect > 0.0 and context.tokenizer is not None and context.model_dir is not None \
            and (Path(context.model_dir) / "facts_known.jsonl").is_file():
        # a model folder without known facts (e.g. a user's own base) has nothing to protect
        for n, rows in protected_rows(model, context.tokenizer, known_fact_lines(context.model_dir), mems,
                                      protect).items():
            out[n].append(rows)
    return {n: torch.unique(torch.cat(r)) for n, r in out.items() if r}
