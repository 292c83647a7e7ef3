"""The typed results schema of every run (``forgetless run``, ``bench facts``, ``learn``), written
as ``results.json``.

A :class:`RunResult` is one experiment: its stream and, per method label, a :class:`MethodResult`
(the accuracy matrix ``R``, the scores before training ``b``, the stream's extra column, the
curve, the metrics of :mod:`forgetless.evaluate.metrics`). On a fact stream each method also
carries a :class:`FactRecord`: the :class:`~forgetless.evaluate.facts.FactScores` of the base and
of the final model (learned, learned F1, statement accuracy, retained, held-out NLL), the fact
curve, and ``retained_drop = (retained_base - retained) / retained_base``.

``RunResult.from_dict`` also reads the schema ``bench facts`` wrote before the two fact pipelines
became one (a ``"runs"`` list with a ``"base"`` row), so the shipped ``docs/bench-facts*``
folders still rebuild with ``forgetless report``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ForgetlessError
from ..evaluate.facts import FactScores
from ..evaluate.metrics import summarize

__all__ = ["FactRecord", "FactScores", "MethodResult", "RunResult", "load_results"]


def _scores(d: dict | None) -> FactScores:
    names = {f.name for f in fields(FactScores)}
    return FactScores(**{k: v for k, v in (d or {}).items() if k in names})


@dataclass
class FactRecord:
    """What one method did on a fact stream: the base and final scores and the curve."""

    base: FactScores
    final: FactScores
    curve: list[FactScores] = field(default_factory=list)
    steps: int = 0  # optimizer steps over the whole stream
    seconds_per_step: float = 0.0  # training time only (evaluation excluded)
    trainable_params_per_step: int = 0

    @property
    def retained_drop(self) -> float:
        b = self.base.retained
        return (b - self.final.retained) / b if b > 0 else 0.0

    @property
    def heldout_nll_delta(self) -> float:
        return self.final.heldout_nll - self.base.heldout_nll

    def summary(self) -> dict:
        """One flat row: the final scores, the base values and the derived figures."""
        f = self.final
        return {"learned": f.learned, "learned_f1": f.learned_f1, "statement_acc": f.statement_acc,
                "retained": f.retained, "retained_base": self.base.retained, "retained_drop": self.retained_drop,
                "heldout_nll": f.heldout_nll, "heldout_nll_delta": self.heldout_nll_delta,
                "learned_base": self.base.learned, "heldout_nll_base": self.base.heldout_nll,
                "learned_contains": f.learned_contains, "retained_contains": f.retained_contains,
                "learned_contains_base": self.base.learned_contains,
                "retained_contains_base": self.base.retained_contains,
                "trainable_params_per_step": self.trainable_params_per_step,
                "seconds_per_step": self.seconds_per_step, "steps": self.steps,
                "easyedit": self.easyedit()}

    def easyedit(self) -> dict:
        """EasyEdit's four measures: reliability (training question), generalization (= learned, the
        unseen probe), locality (= retained), portability (two-hop questions), final and base."""
        f, b = self.final, self.base
        return {"reliability": f.reliability, "generalization": f.learned, "locality": f.retained,
                "portability": f.portability, "portability_n": f.portability_n,
                "base": {"reliability": b.reliability, "generalization": b.learned, "locality": b.retained,
                         "portability": b.portability}}

    def to_dict(self) -> dict:
        return {"base": asdict(self.base), "final": asdict(self.final), "curve": [asdict(c) for c in self.curve],
                "steps": self.steps, "seconds_per_step": self.seconds_per_step,
                "trainable_params_per_step": self.trainable_params_per_step,
                "retained_drop": self.retained_drop, "heldout_nll_delta": self.heldout_nll_delta}

    @classmethod
    def from_dict(cls, d: dict) -> "FactRecord":
        return cls(base=_scores(d.get("base")), final=_scores(d.get("final")),
                   curve=[_scores(c) for c in d.get("curve") or []], steps=int(d.get("steps") or 0),
                   seconds_per_step=float(d.get("seconds_per_step") or 0.0),
                   trainable_params_per_step=int(d.get("trainable_params_per_step") or 0))


@dataclass
class MethodResult:
    """One method (one labelled entry of the config) on one stream."""

    spec: dict  # {"name": config name, "method": registry name, **options} (lr included)
    b: list[float]  # scores before training, one per experience
    R: list[list[float]]  # R[i][j]: score on experience j after training through experience i
    b_extra: float | None = None  # the stream's extra column (facts: retained; else general NLL) before training
    extra: list[float] = field(default_factory=list)  # ... after each experience
    curve: list[dict] = field(default_factory=list)  # {"step", "experience", "scores": [T]}
    boundaries: list[int] = field(default_factory=list)  # global step at the end of each experience
    seconds: float = 0.0
    trainable_params: int = 0
    method: dict = field(default_factory=dict)  # the method's describe() after the last experience
    metrics: dict = field(default_factory=dict)  # evaluate.metrics.summarize + the extra column
    facts: FactRecord | None = None  # fact streams only

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("b", "b_extra", "R", "extra", "curve", "boundaries", "seconds",
                                           "trainable_params", "method", "spec", "metrics")}
        if self.facts is not None:
            d["facts"] = self.facts.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MethodResult":
        return cls(spec=dict(d.get("spec") or {}), b=list(d.get("b") or []), R=list(d.get("R") or []),
                   b_extra=d.get("b_extra"), extra=list(d.get("extra") or []), curve=list(d.get("curve") or []),
                   boundaries=list(d.get("boundaries") or []), seconds=float(d.get("seconds") or 0.0),
                   trainable_params=int(d.get("trainable_params") or 0), method=dict(d.get("method") or {}),
                   metrics=dict(d.get("metrics") or {}),
                   facts=FactRecord.from_dict(d["facts"]) if d.get("facts") else None)


@dataclass
class RunResult:
    """One experiment of a run: the stream and every method's result (``results.json``)."""

    title: str
    stream: dict  # name, kind, metric, higher_is_better, experiences, extra, + the stream's info
    methods: dict[str, MethodResult]
    command: str = ""
    seed: int = 0
    config: dict = field(default_factory=dict)
    model: str = ""
    machine: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"title": self.title, "command": self.command, "seed": self.seed, "config": self.config,
                             "model": self.model, "stream": self.stream,
                             "methods": {k: m.to_dict() for k, m in self.methods.items()}}
        if self.machine:
            d["machine"] = self.machine
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunResult":
        if "methods" not in d and "runs" in d:
            return cls.from_bench_v1(d)
        if not isinstance(d.get("methods"), dict) or not isinstance(d.get("stream"), dict):
            raise ForgetlessError("results.json has neither 'methods' with a 'stream' (a run) nor 'runs' "
                                  "(an older bench facts result).")
        return cls(title=d.get("title") or "", stream=d["stream"],
                   methods={k: MethodResult.from_dict(m) for k, m in d["methods"].items()},
                   command=d.get("command") or "", seed=int(d.get("seed") or 0), config=d.get("config") or {},
                   model=d.get("model") or "", machine=d.get("machine") or {})

    @classmethod
    def from_bench_v1(cls, d: dict) -> "RunResult":
        """The schema ``bench facts`` wrote before the pipelines were one: ``{"base": {...}, "runs":
        [{"method", "lr", "hparams", "label", "learned", ..., "curve": [...]}], "stream": {...}}``.
        Each run becomes a method on a one-experience fact stream (R = [[learned]])."""
        base = _scores(d.get("base"))
        s = d.get("stream") or {}
        methods: dict[str, MethodResult] = {}
        for row in d.get("runs") or []:
            label = row.get("label") or row.get("method", "?")
            final = _scores({**row, "facts_seen": s.get("n_facts", 0)})
            fr = FactRecord(base=base, final=final, curve=[_scores(c) for c in row.get("curve") or []],
                            steps=int(row.get("steps") or 0), seconds_per_step=float(row.get("seconds_per_step") or 0),
                            trainable_params_per_step=int(row.get("trainable_params_per_step") or 0))
            b, R = [base.learned], [[final.learned]]
            metrics = summarize(R, b, None, higher_is_better=True)
            metrics.update(retained=final.retained, retained_base=base.retained)
            methods[label] = MethodResult(
                spec={"name": row.get("method"), "method": row.get("method"), "lr": row.get("lr"),
                      **(row.get("hparams") or {})},
                b=b, R=R, b_extra=base.retained, extra=[final.retained], boundaries=[fr.steps],
                curve=[{"step": 0, "experience": 0, "scores": b}, {"step": fr.steps, "experience": 0, "scores": R[0]}],
                seconds=fr.seconds_per_step * fr.steps, trainable_params=fr.trainable_params_per_step,
                metrics=metrics, facts=fr)
        stream = {"name": "facts", "kind": "facts", "metric": "exact_match", "higher_is_better": True,
                  "experiences": ["facts 1"], "extra": "retained",
                  **{k: v for k, v in s.items() if k not in ("fact_ids",)},
                  "fact_ids": [s.get("fact_ids") or []], "schema": "bench facts v1 (read by results.from_bench_v1)"}
        return cls(title=d.get("title") or "Fact injection: learning vs forgetting", stream=stream, methods=methods,
                   command=d.get("command") or "", seed=int(s.get("seed") or 0), model=d.get("model") or "",
                   machine=d.get("machine") or {})


def load_results(path: str | Path) -> RunResult:
    """``results.json`` of a run folder (either schema), with one clear error when unreadable."""
    p = Path(path)
    try:
        return RunResult.from_dict(json.loads(p.read_text()))
    except OSError as e:
        raise ForgetlessError(f"cannot read {p}: {e.strerror}.") from None
    except json.JSONDecodeError:
        raise ForgetlessError(f"{p} is not valid JSON.") from None
