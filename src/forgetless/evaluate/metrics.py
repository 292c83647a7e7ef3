"""Continual-learning metrics over the accuracy matrix, as pure functions.

Inputs
------
``R`` is a T x T matrix (a list of lists or a numpy array), T >= 1::

    R[i][j] = score on experience j after training through experience i

(0-based indices in code; the formulas below use 1-based indices, R[i,j] = ``R[i-1][j-1]``).
``b`` is a length-T vector: ``b[j]`` = score on experience j before any training (the base
model). ``joint`` is the joint-training baseline (a model trained on all experiences seen so far,
multi-task): either its own T x T matrix, of which only the diagonal is used, or that diagonal
as a length-T vector, a*_k = ``joint[k][k]`` (matrix) or ``joint[k]`` (vector).

Only the lower triangle of ``R`` (j <= i) is used by ACC, BWT, forgetting, learning accuracy and
intransigence; FWT also uses the first superdiagonal ``R[i-1][i]`` (the score on an experience
just before it is trained). Every other entry is ignored and may be anything, NaN included. The
used entries must be finite numbers (the superdiagonal only when FWT is computed), otherwise
``ValueError`` is raised, as it is for a non-square ``R``, T = 0, or a ``b``/``joint`` of the wrong
length.

Formulas (scores higher-is-better, e.g. accuracy)
-------------------------------------------------
- Average accuracy (Lopez-Paz & Ranzato 2017), the last row::

      ACC = (1/T) sum_{i=1..T} R[T,i]

- Backward transfer (Lopez-Paz & Ranzato 2017, the paper's T-1 denominator)::

      BWT = 1/(T-1) sum_{i=1..T-1} (R[T,i] - R[i,i])

  BWT > 0: later training improved earlier experiences; BWT < 0: it hurt them.

- Forward transfer (Lopez-Paz & Ranzato 2017)::

      FWT = 1/(T-1) sum_{i=2..T} (R[i-1,i] - b_i)

  FWT > 0: training on earlier experiences helped a not-yet-seen experience.

- Forgetting after the last experience (Chaudhry et al. 2018)::

      f_j = max_{l in j..T-1} R[l,j] - R[T,j]        for j = 1..T-1
      F   = (1/(T-1)) sum_{j=1..T-1} f_j

  F > 0: something was forgotten (f_j is not clamped, so it can be negative when the final
  score beats every earlier one). Chaudhry et al. write the max over l in 1..T-1; rows l < j are
  scores before experience j was trained (upper triangle), which carry no learned knowledge and
  are excluded here, which is why the upper triangle is never needed.

- Forgetting curve, F_k for k = 2..T (F_T = F)::

      F_k = (1/(k-1)) sum_{j=1..k-1} ( max_{l in j..k-1} R[l,j] - R[k,j] )

- Learning accuracy (plasticity), the mean of the diagonal::

      LA = (1/T) sum_{k=1..T} R[k,k]

- Intransigence (Chaudhry et al. 2018), against the joint baseline a*::

      I_k = a*_k - R[k,k]        for k = 1..T,    I = (1/T) sum_k I_k

  I_k > 0: the learner reached a worse score on experience k than joint training did (it was
  less able to learn it).

T = 1: BWT, FWT and F are undefined (no earlier experience) and are reported as 0.0; the
per-experience forgetting list and the forgetting curve are empty.

Lower-is-better scores (NLL, perplexity)
----------------------------------------
Every function takes ``higher_is_better: bool = True``. With ``False`` the scores (``R``, ``b``
and ``joint``) are negated internally, s -> -s, before the formulas above are applied, so the
*difference* metrics keep the meaning "positive = good" (forgetting and intransigence: positive =
that much was lost / not reached):

- BWT is the mean *decrease* of NLL on earlier experiences from the end of their own training to
  the end of the sequence: BWT = 1/(T-1) sum_i (R[i,i] - R[T,i]); BWT > 0 means NLL went down.
- FWT is the mean *decrease* of NLL on the next experience relative to the base model:
  FWT = 1/(T-1) sum_{i=2..T} (b_i - R[i-1,i]).
- f_j is the *increase* of NLL from its best (lowest) value: f_j = R[T,j] - min_{l in j..T-1} R[l,j];
  F > 0 means something was forgotten.
- I_k is the *excess* NLL over the joint baseline: I_k = R[k,k] - a*_k.

The *level* metrics, ACC and learning accuracy, are reported in the original units (the mean
final NLL, the mean diagonal NLL), not negated: for them the flag changes nothing, it is accepted
for a uniform signature (lower ACC is better when ``higher_is_better`` is False).

All functions return Python floats (or lists / dicts of them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "forgetting_per_experience",
    "forgetting_curve",
    "intransigence",
    "learning_accuracy",
    "summarize",
]

ArrayLike = Any  # list of lists / sequence / numpy array of numbers


# ----------------------------------------------------------------------------- validation


def _as_float_array(x: ArrayLike, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=float)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be a rectangular array of numbers: {e}") from None
    return arr


def _matrix(R: ArrayLike, higher_is_better: bool, need_superdiagonal: bool = False) -> np.ndarray:
    """Validate ``R`` and return it as a float array, negated when lower is better.

    Checks: 2-D, square T x T with T >= 1, lower triangle (j <= i) finite, and, when
    ``need_superdiagonal``, the entries ``R[i-1][i]`` finite. Other entries are not checked."""
    arr = _as_float_array(R, "R")
    if arr.ndim != 2:
        raise ValueError(f"R must be a 2-D T x T matrix, got an array of shape {arr.shape}")
    T, T2 = arr.shape
    if T != T2:
        raise ValueError(f"R must be square (T x T), got shape {T} x {T2}")
    if T < 1:
        raise ValueError("R must have at least one experience (T >= 1), got an empty matrix")
    low = np.tril_indices(T)
    bad = ~np.isfinite(arr[low])
    if bad.any():
        i, j = low[0][bad][0], low[1][bad][0]
        raise ValueError(
            f"R must hold finite numbers on and below the diagonal (j <= i); R[{i}][{j}] = {arr[i, j]!r}"
        )
    if need_superdiagonal and T > 1:
        sup = np.diagonal(arr, offset=1)
        if not np.isfinite(sup).all():
            k = int(np.flatnonzero(~np.isfinite(sup))[0])
            raise ValueError(
                f"R must hold finite numbers on the first superdiagonal for forward transfer; "
                f"R[{k}][{k + 1}] = {sup[k]!r}"
            )
    return arr if higher_is_better else -arr


def _vector(v: ArrayLike, T: int, name: str, higher_is_better: bool) -> np.ndarray:
    arr = _as_float_array(v, name)
    if arr.ndim != 1 or arr.shape[0] != T:
        raise ValueError(f"{name} must be a vector of length T = {T}, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        k = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must hold finite numbers; {name}[{k}] = {arr[k]!r}")
    return arr if higher_is_better else -arr


def _joint_diagonal(joint: ArrayLike, T: int, higher_is_better: bool) -> np.ndarray:
    arr = _as_float_array(joint, "joint")
    if arr.ndim == 2:
        if arr.shape != (T, T):
            raise ValueError(f"joint given as a matrix must be T x T = {T} x {T}, got shape {arr.shape}")
        return _vector(np.diagonal(arr).copy(), T, "diagonal of joint", higher_is_better)
    if arr.ndim == 1:
        return _vector(arr, T, "joint", higher_is_better)
    raise ValueError(f"joint must be a T x T matrix or a length-T vector, got shape {arr.shape}")


# ----------------------------------------------------------------------------- metrics


def average_accuracy(R: ArrayLike, higher_is_better: bool = True) -> float:
    """ACC = (1/T) sum_{i=1..T} R[T,i]: mean of the last row, in the scores' own units.

    ``higher_is_better`` does not change the value (a level, not a difference); see the module
    docstring."""
    A = _matrix(R, True)
    return float(np.mean(A[-1]))


def learning_accuracy(R: ArrayLike, higher_is_better: bool = True) -> float:
    """LA = (1/T) sum_{k=1..T} R[k,k]: mean of the diagonal (plasticity), in the scores' own units.

    ``higher_is_better`` does not change the value; see the module docstring."""
    A = _matrix(R, True)
    return float(np.mean(np.diagonal(A)))


def backward_transfer(R: ArrayLike, higher_is_better: bool = True) -> float:
    """BWT = 1/(T-1) sum_{i=1..T-1} (R[T,i] - R[i,i]); 0.0 when T = 1 (undefined).

    Positive = later training improved earlier experiences (for NLL: the mean decrease of NLL)."""
    A = _matrix(R, higher_is_better)
    T = A.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(A[-1, :-1] - np.diagonal(A)[:-1]))


def forward_transfer(R: ArrayLike, b: ArrayLike, higher_is_better: bool = True) -> float:
    """FWT = 1/(T-1) sum_{i=2..T} (R[i-1,i] - b_i); 0.0 when T = 1 (undefined).

    ``b`` holds the base model's score on each experience. Positive = training on earlier
    experiences helped a not-yet-seen one (for NLL: the mean decrease of NLL vs the base model).
    Needs the first superdiagonal ``R[i-1][i]`` to be finite."""
    A = _matrix(R, higher_is_better, need_superdiagonal=True)
    T = A.shape[0]
    bv = _vector(b, T, "b", higher_is_better)
    if T == 1:
        return 0.0
    return float(np.mean(np.diagonal(A, offset=1) - bv[1:]))


def _forgetting_at(A: np.ndarray, k: int) -> list[float]:
    """0-based k >= 1: [max_{j <= l <= k-1} A[l,j] - A[k,j] for j in 0..k-1]."""
    return [float(np.max(A[j:k, j]) - A[k, j]) for j in range(k)]


def forgetting_per_experience(R: ArrayLike, higher_is_better: bool = True) -> list[float]:
    """[f_1, ..., f_{T-1}] with f_j = max_{l in j..T-1} R[l,j] - R[T,j] (length T-1; [] when T = 1).

    Positive = experience j was forgotten (for NLL: NLL rose above its best value)."""
    A = _matrix(R, higher_is_better)
    T = A.shape[0]
    if T == 1:
        return []
    return _forgetting_at(A, T - 1)


def forgetting(R: ArrayLike, higher_is_better: bool = True) -> float:
    """F = mean_{j=1..T-1} f_j, average forgetting after the last experience (Chaudhry et al. 2018);
    0.0 when T = 1 (undefined). Positive = something was forgotten."""
    per = forgetting_per_experience(R, higher_is_better)
    return float(np.mean(per)) if per else 0.0


def forgetting_curve(R: ArrayLike, higher_is_better: bool = True) -> list[float]:
    """[F_2, ..., F_T], F_k = (1/(k-1)) sum_{j<k} (max_{l in j..k-1} R[l,j] - R[k,j]).

    Length T-1 ([] when T = 1); the last element equals ``forgetting(R)``."""
    A = _matrix(R, higher_is_better)
    T = A.shape[0]
    return [float(np.mean(_forgetting_at(A, k))) for k in range(1, T)]


def intransigence(R: ArrayLike, joint: ArrayLike, higher_is_better: bool = True) -> dict[str, Any]:
    """I_k = a*_k - R[k,k] for k = 1..T, against the joint baseline a*.

    ``joint`` is the joint baseline's T x T matrix (its diagonal is used, other entries ignored)
    or its diagonal as a length-T vector. Returns ``{"per_experience": [I_1..I_T], "mean": I}``.
    Positive = the learner reached a worse score than joint training (for NLL: excess NLL)."""
    A = _matrix(R, higher_is_better)
    T = A.shape[0]
    a_star = _joint_diagonal(joint, T, higher_is_better)
    per = [float(x) for x in a_star - np.diagonal(A)]
    return {"per_experience": per, "mean": float(np.mean(per))}


def summarize(
    R: ArrayLike,
    b: ArrayLike | None = None,
    joint: ArrayLike | None = None,
    higher_is_better: bool = True,
) -> dict[str, float]:
    """All computable metrics as a flat dict of floats.

    Keys always present: "acc", "bwt", "forgetting", "learning_accuracy"; "fwt" only when ``b``
    is given, "intransigence" (the mean) only when ``joint`` is given."""
    out: dict[str, float] = {
        "acc": average_accuracy(R, higher_is_better),
        "bwt": backward_transfer(R, higher_is_better),
    }
    if b is not None:
        out["fwt"] = forward_transfer(R, b, higher_is_better)
    out["forgetting"] = forgetting(R, higher_is_better)
    out["learning_accuracy"] = learning_accuracy(R, higher_is_better)
    if joint is not None:
        out["intransigence"] = intransigence(R, joint, higher_is_better)["mean"]
    return out

