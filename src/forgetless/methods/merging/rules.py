"""Model merging of task vectors: pure functions on dicts of tensors.

A *task vector* is the change of an expert fine-tuned from a shared base:
``tau_k = theta_k - theta_0`` (per parameter name). A merge turns ``tau_1..tau_K`` into one
delta ``d`` and the merged model is ``theta_0 + d``. Implemented rules (each per tensor of a
parameter name, unless said otherwise), with ``w_k`` the per-task weights:

- task arithmetic (Ilharco et al. 2023):  d = sum_k w_k tau_k
- TIES (Yadav et al. 2023):  trim each tau_k to its top-``density`` entries by |value| (per
  tensor, as ``peft`` does; the paper trims over the whole flattened vector), elect the sign
  of every entry by total mass ``sign(sum_k trimmed tau_k)`` (0 counts as +; "frequency"
  counts signs instead), then the *disjoint mean*: d = sum_{k agrees} w_k tau_k / #agreeing
  (0 where no task agrees).
- DARE (Yu et al. 2024):  drop each entry of tau_k with probability p = 1 - density and rescale
  the kept ones by 1/(1-p), then sum with the weights (``dare_linear``) or, with the TIES sign
  option, elect the sign and take the disjoint mean (``dare_ties``). The drops come from the
  torch RNG seeded with ``seed`` inside ``torch.random.fork_rng`` (the caller's RNG state is
  left untouched), so a merge is a deterministic function of the task vectors and the seed.
- Localize-and-Stitch (He et al. 2024):
    * dataless masks: m_k = 1 on the top-``density`` entries of |tau_k|, over the *whole*
      flattened task vector (``scope="global"``, the paper's choice) or per tensor
      (``scope="tensor"``); exactly round(density * n) entries are kept (ties at the cut go to the
      lower position);
    * learned masks: real-valued logits s_k, initialised to +c on the dataless mask and -c off
      it, trained with Adam on ``task_loss(theta_0 + sigmoid(s_k) * tau_k) + l1 * mean(sigmoid(s_k))``
      (the L1 sparsity term normalised by the number of entries), then binarised by keeping the
      top-``density`` logits (same scope; ties at the cut go to the larger |tau_k|), so the
      learned mask has exactly the requested density;
    * stitching: d = sum_k m_k tau_k / max(1, sum_k m_k), i.e. entries covered by several
      masks get the mean of those tasks' values, entries covered by none stay at the base.

Task arithmetic and DARE call ``peft.utils.merge_utils`` (``task_arithmetic``, ``dare_linear``,
``dare_ties``) tensor by tensor; TIES uses peft's sign election and disjoint merge
(``calculate_majority_sign_mask``, ``disjoint_merge``) after a magnitude trim of its own
(``trim``: the same rule as peft's ``magnitude_based_pruning``, found with ``kthvalue`` instead of
a full ``topk``, several times faster on the memory value table). Left out: DELLA,
breadcrumbs and other pruning rules, per-task weight search (``forgetless.methods.merge.Merge`` searches one common
scale), and the paper's mask-training schedule (optimizer, learning rate and number of epochs
are options here).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from ...errors import ConfigError

State = dict[str, torch.Tensor]
SIGN_METHODS = ("total", "frequency")
MASK_SCOPES = ("global", "tensor")


# --------------------------------------------------------------------------- helpers
def task_vector(expert_state: State, base_state: State) -> State:
    """tau = expert - base for every name of ``base_state`` (float32)."""
    missing = sorted(set(base_state) - set(expert_state))
    if missing:
        raise ConfigError(f"the expert lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}.")
    return {n: expert_state[n].detach().float() - b.detach().float() for n, b in base_state.items()}


def _check(taus: Sequence[State], weights: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    if not taus:
        raise ConfigError("merging needs at least one task vector.")
    names = set(taus[0])
    if any(set(t) != names for t in taus[1:]):
        raise ConfigError("all task vectors must have the same tensor names.")
    w = torch.ones(len(taus)) if weights is None else torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != len(taus):
        raise ConfigError(f"got {w.numel()} merge weights for {len(taus)} task vectors.")
    return w


def _density(density: float) -> float:
    if not 0.0 < float(density) <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}.")
    return float(density)


@contextlib.contextmanager
def _quiet_full_density():
    """peft warns 'no pruning will be performed' at density 1; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        yield


def _per_tensor(taus: Sequence[State], fn: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
                weights: torch.Tensor) -> State:
    out = {}
    for n in taus[0]:
        ts = [t[n].float() for t in taus]
        out[n] = fn(ts, weights.to(ts[0].device))
    return out


# --------------------------------------------------------------------------- merges
def task_arithmetic(taus: Sequence[State], weights: Sequence[float] | torch.Tensor | None = None) -> State:
    """d = sum_k w_k tau_k (``peft.utils.merge_utils.task_arithmetic``)."""
    from peft.utils import merge_utils as mu

    w = _check(taus, weights)
    return _per_tensor(taus, mu.task_arithmetic, w)


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top-``density`` entries of ``tensor`` by magnitude (k = int(density * numel), as
    peft's ``magnitude_based_pruning``), zero the rest. The k-th largest |value| is found with
    ``kthvalue`` (several times faster than peft's full ``topk`` on a large value table); entries
    tied with it are all kept."""
    d = _density(density)
    if d >= 1.0:
        return tensor
    k = int(d * tensor.numel())
    if k == 0:
        return torch.zeros_like(tensor)
    mag = tensor.abs()
    thr = mag.reshape(-1).float().kthvalue(tensor.numel() - k + 1).values
    return torch.where(mag >= thr, tensor, torch.zeros_like(tensor))


def magnitude_prune(taus: Sequence[State], weights: Sequence[float] | torch.Tensor | None, density: float) -> State:
    """d = sum_k w_k trim(tau_k): top-``density`` entries by magnitude, per tensor, no sign election."""
    from peft.utils import merge_utils as mu

    w, d = _check(taus, weights), _density(density)
    return _per_tensor(taus, lambda ts, ww: mu.task_arithmetic([trim(t, d) for t in ts], ww), w)


def ties(taus: Sequence[State], weights: Sequence[float] | torch.Tensor | None, density: float,
         sign: str = "total") -> State:
    """TIES: trim to top-``density`` (per tensor, ``trim``), elect the sign by ``sign`` ("total"
    mass or "frequency") on the unweighted trimmed vectors, then the disjoint mean of the weighted
    agreeing entries (peft's ``calculate_majority_sign_mask`` and ``disjoint_merge``; the same
    steps as peft's ``ties``, whose ``topk`` trimming is slow on a large value table)."""
    from peft.utils import merge_utils as mu

    if sign not in SIGN_METHODS:
        raise ConfigError(f"sign must be one of {SIGN_METHODS}, got {sign!r}.")
    w, d = _check(taus, weights), _density(density)

    def fn(ts: list[torch.Tensor], ww: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([trim(t, d) for t in ts])
        elected = mu.calculate_majority_sign_mask(stacked, method=sign)
        return mu.disjoint_merge(stacked * mu.reshape_weight_task_tensors(stacked, ww), elected)

    return _per_tensor(taus, fn, w)


def dare(taus: Sequence[State], weights: Sequence[float] | torch.Tensor | None, density: float, seed: int = 0,
         ties_sign: str | None = None) -> State:
    """DARE: keep each entry with probability ``density`` and rescale it by 1/density, then sum
    with the weights (``ties_sign=None``, peft ``dare_linear``) or elect the sign ("total" or
    "frequency") and take the disjoint mean (peft ``dare_ties``). Deterministic given ``seed``:
    the drops use a forked, seeded RNG, so the caller's global RNG state does not change."""
    from peft.utils import merge_utils as mu

    if ties_sign is not None and ties_sign not in SIGN_METHODS:
        raise ConfigError(f"ties_sign must be None or one of {SIGN_METHODS}, got {ties_sign!r}.")
    w, d = _check(taus, weights), _density(density)
    devices = sorted({t.device for tau in taus for t in tau.values() if t.device.type == "cuda"}, key=str)
    if ties_sign is None:
        def fn(ts, ww):
            return mu.dare_linear(ts, ww, d)
    else:
        def fn(ts, ww):
            return mu.dare_ties(ts, ww, d, majority_sign_method=ties_sign)
    with torch.random.fork_rng(devices=devices), _quiet_full_density():
        torch.manual_seed(seed)
        return _per_tensor(taus, fn, w)


# --------------------------------------------------------------------------- Localize-and-Stitch
def _select_top(primary: torch.Tensor, k: int, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries of a flat tensor: the largest ``primary``; ties at the
    cut go to the largest ``secondary``, then to the lowest index (deterministic, unlike topk)."""
    n = primary.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=primary.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=primary.device)
    cut = primary.kthvalue(n - k + 1).values  # the k-th largest
    out = primary > cut
    need = k - int(out.sum())
    tied = (primary == cut).nonzero().squeeze(1)
    if secondary is not None:
        tied = tied[_select_top(secondary[tied], need)]
    out[tied[:need]] = True
    return out


def _top_masks(scores: State, density: float, scope: str, tiebreak: State | None = None) -> State:
    """Boolean masks of the top ``round(density * n)`` entries of ``scores``, over all tensors at
    once (``scope="global"``) or per tensor; ties at the cut are resolved by ``tiebreak`` (larger
    first), then by position."""
    if scope not in MASK_SCOPES:
        raise ConfigError(f"mask scope must be one of {MASK_SCOPES}, got {scope!r}.")
    d = _density(density)
    names = list(scores)
    groups = [[n] for n in names] if scope == "tensor" else [names]
    out = {}
    for group in groups:
        flat = torch.cat([scores[n].reshape(-1).float() for n in group])
        second = None if tiebreak is None else torch.cat([tiebreak[n].reshape(-1).float() for n in group])
        keep, i = _select_top(flat, int(round(d * flat.numel())), second), 0
        for n in group:
            out[n] = keep[i:i + scores[n].numel()].view(scores[n].shape)
            i += scores[n].numel()
    return out


def dataless_masks(taus: Sequence[State], density: float, scope: str = "global") -> list[State]:
    """Localize without data: m_k = top-``density`` entries of |tau_k| (scope "global" or "tensor")."""
    return [_top_masks({n: t.abs() for n, t in tau.items()}, density, scope) for tau in taus]


def stitch_delta(taus: Sequence[State], masks: Sequence[State]) -> State:
    """sum_k m_k tau_k / max(1, sum_k m_k): overlapping entries get the mean of the covering tasks."""
    _check(taus, None)
    if len(masks) != len(taus):
        raise ConfigError(f"got {len(masks)} masks for {len(taus)} task vectors.")
    out = {}
    for n in taus[0]:
        m = torch.stack([mk[n].to(taus[0][n].device).float() for mk in masks])
        t = torch.stack([tk[n].float() for tk in taus])
        out[n] = (m * t).sum(0) / m.sum(0).clamp_min(1.0)
    return out


def stitch(base: State, taus: Sequence[State], masks: Sequence[State]) -> State:
    """theta_0 + sum_k m_k tau_k / (number of masks covering each entry, at least 1)."""
    return apply_delta(base, stitch_delta(taus, masks))


def apply_delta(base: State, delta: State, scale: float = 1.0) -> State:
    """theta_0 + scale * d, in the base's dtypes; names absent from ``delta`` keep the base value."""
    return {n: (b.float() + scale * delta[n].to(b.device)).to(b.dtype) if n in delta else b.clone()
            for n, b in base.items()}


def learn_mask(model: nn.Module, base: State, tau: State, init_mask: State, batches: Sequence[dict],
               loss_fn: Callable[[Callable, dict], torch.Tensor], density: float, steps: int = 10, lr: float = 0.5,
               l1: float = 1.0, init_logit: float = 1.0, scope: str = "global") -> State:
    """Localize with data: learn a mask for one task vector, then binarise it.

    Logits s start at +init_logit on ``init_mask`` and -init_logit elsewhere; for ``steps`` Adam
    steps (batches cycled) the model runs with ``base + sigmoid(s) * tau`` on the names of
    ``tau`` (``torch.func.functional_call``; the model's own parameters are not changed) and
    minimises ``loss_fn(fmodel, batch) + l1 * mean(sigmoid(s))``. The returned mask keeps the top
    ``round(density * n)`` logits (``scope`` "global" or "tensor"); Adam moves most logits by the
    same step, so ties are common: they go to the larger |tau|, then to the lower position. ``loss_fn`` receives a callable
    that behaves like the model (e.g. ``methods.base.lm_loss_masked``)."""
    from torch.func import functional_call

    if steps < 0 or lr <= 0 or l1 < 0:
        raise ConfigError("mask learning needs steps >= 0, lr > 0 and l1 >= 0.")
    logits = {n: torch.where(init_mask[n].to(t.device), init_logit, -init_logit).float().requires_grad_(True)
              for n, t in tau.items()}
    if steps and batches:
        n_entries = sum(t.numel() for t in tau.values())
        opt = torch.optim.Adam(list(logits.values()), lr=lr)
        was = model.training
        model.eval()
        try:
            for step in range(steps):
                masks = {n: torch.sigmoid(s) for n, s in logits.items()}
                params = {n: (base[n].float() + masks[n] * tau[n]).to(base[n].dtype) for n in tau}

                def fmodel(*args, params=params, **kwargs):
                    return functional_call(model, params, args, kwargs)

                loss = loss_fn(fmodel, batches[step % len(batches)])
                loss = loss + l1 * sum(m.sum() for m in masks.values()) / n_entries
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            model.train(was)
    return _top_masks({n: s.detach() for n, s in logits.items()}, density, scope,
                      tiebreak={n: t.abs() for n, t in tau.items()})
