"""Why sparse memory finetuning learns or forgets: pure figures over access logs, row sets and tensors.

Everything here is a function of tensors the caller gathered (``scripts/smf_diagnosis.py``
runs a model over a fact stream and calls these); nothing runs a model.

Conventions: a *lookup* is a pair ``(indices, weights)`` of equal shape ``(..., H, k)`` (the
slots each token read, per head, and their softmax weights), as an ``AccessLog`` records it.
Lookup weight sums to H per token (each head's softmax sums to 1).

- ``changed_rows`` / ``union_rows``: the memory rows SMF changed (value-table diff, or the
  union of the per-step selected sets), against the N slots.
- ``weight_per_row`` / ``heavy_rows``: how the lookup weight of a set of tokens (e.g. the
  known-fact probes) spreads over rows, and the fewest rows that carry a given share of it.
- ``row_overlap``: how many of one row set (the heavy rows of the known probes) another
  (the changed rows) hits.
- ``weight_share_on``: the share of a lookup's weight that falls on a row set, e.g. the
  rows SMF selected, at a taught fact's answer tokens.
- ``overlap_vs_forgetting``: per known fact, the share of its probe's lookup weight on
  changed rows, split by whether the fact was kept or lost: how the retained drop tracks
  the overlap.
- ``direct_logit``: the memory output's direct contribution to a token's logit (logit lens
  through the final norm and the unembedding); ``ablation_effect``: the answer log-prob with
  and without the memory output (ablate-and-compare, through the rest of the model).
- ``steps_to_learn``: per-fact learning curves -> the first step at which a fact is answered.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of a value table (N, d) that differ between two snapshots."""
    if before.shape != after.shape:
        raise ValueError(f"the two value tables differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}.")
    return (before != after).any(dim=1).nonzero().flatten()


def union_rows(row_sets: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sorted union of row-index sets (e.g. the rows SMF selected at each step)."""
    sets = [r.flatten().long() for r in row_sets]
    if not sets:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique(torch.cat(sets))


def weight_per_row(indices: torch.Tensor, weights: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Summed lookup weight of every row (n_slots,), float64."""
    return torch.zeros(n_slots, dtype=torch.float64).index_add_(
        0, indices.reshape(-1).long().cpu(), weights.reshape(-1).double().cpu())


def reads_per_row(indices: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Read counts of every row (n_slots,), not weighted (what TF-IDF counts)."""
    return torch.bincount(indices.reshape(-1).long().cpu(), minlength=n_slots)


def heavy_rows(row_weight: torch.Tensor, share: float = 0.5) -> torch.Tensor:
    """The fewest rows that together carry at least ``share`` of the total weight (sorted indices)."""
    if not 0 < share <= 1:
        raise ValueError("share must be in (0, 1].")
    total = float(row_weight.sum())
    if total <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(row_weight, descending=True, stable=True)
    cum = torch.cumsum(row_weight[order], 0)
    n = int(torch.searchsorted(cum, torch.tensor(share * total, dtype=cum.dtype) * (1 - 1e-12)).item()) + 1
    return order[: min(n, int((row_weight > 0).sum()))].sort().values


def row_overlap(rows: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How many of ``reference`` rows are in ``rows``: counts and the share of the reference."""
    both = torch.isin(reference, rows)
    n_ref = int(reference.numel())
    return {"rows": int(rows.numel()), "reference": n_ref, "both": int(both.sum()),
            "share_of_reference": float(both.sum()) / n_ref if n_ref else 0.0}


def weight_share_on(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> float:
    """Share of a lookup's total weight that falls on ``rows``."""
    w = weights.double().cpu()
    hit = torch.isin(indices.cpu(), rows.cpu())
    total = float(w.sum())
    return float((w * hit).sum()) / total if total > 0 else 0.0


def overlap_vs_forgetting(per_fact_lookups: Sequence[tuple[torch.Tensor, torch.Tensor]], kept_before: Sequence[bool],
                          kept_after: Sequence[bool], changed: torch.Tensor) -> dict[str, float]:
    """For the known facts answered before training: the mean share of each probe's lookup weight
    on changed rows, for those still answered afterwards (kept) and those lost, and the drop
    among the facts above / below the median share (does forgetting track the overlap?)."""
    shares, lost = [], []
    for (idx, w), b, a in zip(per_fact_lookups, kept_before, kept_after):
        if not b:
            continue
        shares.append(weight_share_on(idx, w, changed))
        lost.append(not a)
    if not shares:
        return {"facts": 0}
    s = torch.tensor(shares, dtype=torch.float64)
    lo = torch.tensor(lost)
    med = float(s.median())
    hi_mask, lo_mask = s > med, s <= med
    mean = lambda t: float(t.double().mean()) if t.numel() else float("nan")  # noqa: E731
    return {"facts": len(shares), "lost": int(lo.sum()),
            "share_on_changed_kept": mean(s[~lo]), "share_on_changed_lost": mean(s[lo]),
            "median_share": med, "drop_above_median": mean(lo[hi_mask]), "drop_at_or_below_median": mean(lo[lo_mask])}


def direct_logit(memory_out: torch.Tensor, final_resid: torch.Tensor, norm_weight: torch.Tensor,
                 unembed_rows: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Logit lens of the memory output: its direct contribution to the logits of the given
    tokens through the final RMSNorm (scale frozen at the final residual's) and the unembedding.
    memory_out, final_resid: (n, d); norm_weight: (d,); unembed_rows: (n, d) (the row of each
    position's token) -> (n,)."""
    rms = final_resid.double().pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    return ((memory_out.double() / rms) * norm_weight.double() * unembed_rows.double()).sum(-1)


def ablation_effect(logprob_with: torch.Tensor, logprob_without: torch.Tensor) -> dict[str, float]:
    """Answer log-probs with the memory output and with it zeroed: the mean difference (nats)."""
    d = (logprob_with.double() - logprob_without.double())
    return {"mean_with": float(logprob_with.double().mean()), "mean_without": float(logprob_without.double().mean()),
            "mean_effect": float(d.mean()), "n": int(d.numel())}


def steps_to_learn(curves: Sequence[Sequence[bool]]) -> dict[str, float]:
    """curves[f][s]: fact f answered after s+1 steps -> share learned by each step and the mean
    first step (facts never learned count as not learned)."""
    if not curves:
        return {"facts": 0}
    n_steps = max(len(c) for c in curves)
    first = [next((s + 1 for s, ok in enumerate(c) if ok), None) for c in curves]
    by_step = [sum(bool(c[s]) if s < len(c) else bool(c[-1]) for c in curves) / len(curves) for s in range(n_steps)]
    learned = [f for f in first if f is not None]
    return {"facts": len(curves), "learned_by_step": by_step,
            "mean_first_step": sum(learned) / len(learned) if learned else float("nan"),
            "never": sum(f is None for f in first)}
