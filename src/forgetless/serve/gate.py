"""The forgetting gate: a candidate version is promoted only if it learned and did not forget.

Figures of a model (``measure``):

- ``learned``   exact match of the greedy answer to the update's own held-out probes (the taught
                facts' ``question``; never trained on);
- ``retained``  exact match on the retention set: a fixed sample of the model folder's known facts
                that the *base* answers correctly (so the base scores 1.0);
- ``heldout_nll`` next-token NLL (nats/token) on a fixed slice of the folder's held-out text.

The decision compares the candidate with its parent: ``learned >= min_learned`` (when the update
taught facts), ``parent.retained - retained <= max_retention_drop`` and
``heldout_nll - parent.heldout_nll <= max_nll_increase``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..data.facts import Fact
from ..errors import ConfigError
from ..evaluate.answers import greedy_answers, heldout_nll, score_answers


@dataclass
class GateThresholds:
    min_learned: float = 1.0  # fraction of the update's probes answered exactly
    max_retention_drop: float = 0.1  # absolute drop on the retention set versus the parent
    max_nll_increase: float = 0.05  # nats/token on held-out text versus the parent

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v != v or v < 0:
                raise ConfigError(f"gate threshold {f.name} must be a number >= 0, got {v!r}.")
        if self.min_learned > 1:
            raise ConfigError(f"gate threshold min_learned must be at most 1, got {self.min_learned}.")

    def tightened(self, overrides: dict | None) -> "GateThresholds":
        """Per-request thresholds: they may only be stricter than the server's."""
        if not overrides:
            return self
        out = GateThresholds(**{**asdict(self), **overrides})
        if out.min_learned < self.min_learned:
            raise ConfigError(f"gate.min_learned may not be below the server's {self.min_learned}.")
        if out.max_retention_drop > self.max_retention_drop:
            raise ConfigError(f"gate.max_retention_drop may not exceed the server's {self.max_retention_drop}.")
        if out.max_nll_increase > self.max_nll_increase:
            raise ConfigError(f"gate.max_nll_increase may not exceed the server's {self.max_nll_increase}.")
        return out


class RetentionSet:
    """The fixed retention facts (answered by the base) and held-out tokens of a model folder."""

    def __init__(self, base: nn.Module, tok, known: list[Fact], heldout_ids: torch.Tensor, size: int, seed: int = 0):
        self.tok = tok
        rng = random.Random(seed)
        pool = list(known)
        rng.shuffle(pool)
        self.facts: list[Fact] = []
        for i in range(0, len(pool), 64):  # probe in chunks until enough facts the base answers are found
            chunk = pool[i:i + 64]
            answers = greedy_answers(base, tok, [f.question for f in chunk])
            self.facts += [f for f, a in zip(chunk, answers) if score_answers([a], [f.answer])["exact_match"] == 1.0]
            if len(self.facts) >= size:
                break
        self.facts = self.facts[:size]
        self.heldout = heldout_ids

    def measure(self, model: nn.Module, probes: list[Fact]) -> dict[str, float]:
        out: dict[str, float] = {}
        if probes:
            ans = greedy_answers(model, self.tok, [f.question for f in probes])
            out["learned"] = score_answers(ans, [f.answer for f in probes])["exact_match"]
            out["answers"] = ans
        if self.facts:
            ans = greedy_answers(model, self.tok, [f.question for f in self.facts])
            out["retained"] = score_answers(ans, [f.answer for f in self.facts])["exact_match"]
        out["heldout_nll"] = heldout_nll(model, self.heldout, seq_len=128, batch_size=16)["nll"]
        return out


def decide(cand: dict, parent: dict, th: GateThresholds, taught_facts: bool) -> dict:
    """The gate decision with its reasons."""
    reasons = []
    if taught_facts and cand.get("learned", 0.0) < th.min_learned:
        reasons.append(f"learned {cand.get('learned', 0.0):.2f} < {th.min_learned:.2f}")
    drop = parent.get("retained", 0.0) - cand.get("retained", 0.0)
    if drop > th.max_retention_drop + 1e-9:
        reasons.append(f"retention drop {drop:.2f} > {th.max_retention_drop:.2f}")
    rise = cand["heldout_nll"] - parent["heldout_nll"]
    if rise > th.max_nll_increase:
        reasons.append(f"held-out NLL +{rise:.3f} > {th.max_nll_increase:.3f}")
    return {"passed": not reasons, "reasons": reasons, "retention_drop": drop, "nll_increase": rise,
            "thresholds": asdict(th)}
