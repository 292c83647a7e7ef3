"""Slot-usage diagnostics of product-key memories: background statistics and memory health.

Background statistics are gathered over batches of the pretraining distribution; the IDF
*document* is one sequence (not one batch): with T tokens, H heads and k slots per head, a
perfectly uniform memory of N slots reads a given slot in ``1 - exp(-T*H*k/N)`` of the
documents, which is reported next to every "read in fewer than half of the documents"
figure as ``uniform_doc_rate``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..models.checkpoint import MIX_PREFIX
from ..models.memory import AccessLog, memory_layers


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


@torch.no_grad()
def collect_background(model: nn.Module, batches: Iterable[torch.Tensor], progress: bool = False) -> dict[str, torch.Tensor]:
    """Run ``batches`` (B, T) of token ids through the model and return, for each memory layer
    ``L``, tensors ``L.counts``, ``L.doc_freq`` and scalars ``L.n_docs``, ``L.n_batches``,
    ``L.tokens_per_doc`` (as 0-dim tensors, ready for safetensors)."""
    mems = memory_layers(model)
    names = _names(model)
    was = model.training
    model.eval()
    logs = []
    for m in mems:
        m.access_log = AccessLog(m.n_slots, per_doc=True)
        logs.append(m.access_log)
    device = next(model.parameters()).device
    tokens = 0
    it = batches
    if progress:
        from tqdm import tqdm
        it = tqdm(batches, desc="background statistics", unit="batch")
    try:
        for x in it:
            model(input_ids=x.to(device))
            tokens += x.numel()
    finally:
        for m in mems:
            m.access_log = None
        model.train(was)
    out: dict[str, torch.Tensor] = {}
    for m, log in zip(mems, logs):
        n = names[id(m)]
        out[f"{n}.counts"] = log.counts
        out[f"{n}.doc_freq"] = log.doc_freq
        out[f"{n}.n_docs"] = torch.tensor(log.n_docs)
        out[f"{n}.n_batches"] = torch.tensor(log.n_batches)
        out[f"{n}.tokens_per_doc"] = torch.tensor(tokens / max(log.n_docs, 1))
    return out




def layer_names(stats: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Memory layers in a statistics dict; ``prefix`` selects another background (MIX_PREFIX)."""
    names = set()
    for k in stats:
        if k.endswith(".counts") and k.startswith(prefix) and (prefix or not k.startswith(MIX_PREFIX)):
            names.add(k[len(prefix):-len(".counts")])
    return sorted(names)


def usage_summary(stats: dict[str, torch.Tensor], name: str, heads: int, knn: int) -> dict[str, float]:
    counts = stats[f"{name}.counts"].double()
    n = counts.numel()
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    n_docs = int(stats[f"{name}.n_docs"])
    doc_rate = stats[f"{name}.doc_freq"].double() / max(n_docs, 1)
    reads_per_doc = float(stats[f"{name}.tokens_per_doc"]) * heads * knn
    return {
        "slots": n,
        "background_batches": int(stats[f"{name}.n_batches"]),
        "background_docs": n_docs,
        "read_share": float((counts > 0).double().mean()),
        "usage_entropy_ratio": entropy / math.log(n),
        "effective_slots": math.exp(entropy),
        "hub_slots_read_in_every_doc": int((doc_rate >= 1.0).sum()),
        "slots_read_in_half_of_docs": int((doc_rate >= 0.5).sum()),
        "uniform_doc_rate": 1.0 - math.exp(-reads_per_doc / n),
    }


def specific_weight_share(stats: dict[str, torch.Tensor], name: str, indices: torch.Tensor,
                          weights: torch.Tensor, threshold: float = 0.5) -> float:
    """Share of lookup weight (indices/weights: (..., H, k)) on slots read in fewer than
    ``threshold`` of the background documents."""
    doc_rate = stats[f"{name}.doc_freq"].double() / max(int(stats[f"{name}.n_docs"]), 1)
    specific = (doc_rate < threshold)[indices.cpu()]
    w = weights.double().cpu()
    return float((w * specific).sum() / w.sum().clamp_min(1e-12))


@torch.no_grad()
def fact_token_lookups(model: nn.Module, tokenizer, sentences: list[str], spans: list[list[str]],
                       batch_size: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Lookups (indices, weights), each (n_tokens, H, k), of every memory layer at the tokens
    that overlap any of the given substrings (e.g. subject and answer) of each sentence."""
    mems = memory_layers(model)
    names = _names(model)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    got: dict[str, list] = {names[id(m)]: [] for m in mems}
    for m in mems:
        m.access_log = AccessLog(m.n_slots, keep_last=True)
    try:
        for i in range(0, len(sentences), batch_size):
            sents, sp = sentences[i:i + batch_size], spans[i:i + batch_size]
            enc = tokenizer(sents, return_tensors="pt", padding=True, return_offsets_mapping=True)
            offsets = enc.pop("offset_mapping")
            model(**{k: v.to(device) for k, v in enc.items()})
            sel = torch.zeros(enc["input_ids"].shape, dtype=torch.bool)
            for b, (s, subs) in enumerate(zip(sents, sp)):
                for sub in subs:
                    start = s.find(sub)
                    if start < 0:
                        continue
                    end = start + len(sub)
                    o = offsets[b]
                    sel[b] |= (o[:, 0] < end) & (o[:, 1] > start) & enc["attention_mask"][b].bool()
            for m in mems:
                idx, w = m.access_log.last_full
                got[names[id(m)]].append((idx[sel.to(idx.device)].cpu(), w[sel.to(w.device)].cpu()))
    finally:
        for m in mems:
            m.access_log = None
        model.train(was)
    return {n: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for n, v in got.items()}
