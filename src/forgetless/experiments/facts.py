"""Fact injection: teach a stream of facts one at a time and measure learning and forgetting.

Each step teaches one fact with a batch of N differently-worded statements of it (Lin et al.
2025); ``steps_per_fact`` steps per fact, one fact after another. Every ``eval_every`` facts,
and at the end, the model is evaluated:

- learned          exact match (and token F1) of the greedy answer to each taught fact's
                   held-out question probe (never trained on), over the facts taught so far
- statement_acc    the same for completing a *trained* statement up to its answer: memorisation,
                   as opposed to retrievable knowledge
- retained         question-probe exact match on the model's *known* facts
- heldout_nll      next-token NLL (nats/token) on held-out pretraining text
- retained_drop    (retained_base - retained) / retained_base, the paper's relative "% drop"

EasyEdit's four measures sit beside these (``summary()["easyedit"]``): reliability = exact
match on each taught fact's first *training* question (the edit prompt), generalization =
``learned`` (the unseen probe), locality = ``retained``, portability = exact match on a two-hop
question needing the taught fact and another one (``data.facts.portability_probe``: the
continent of a taught city's country or of a taught capital; over the taught facts that have one).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data.batches import fact_batch
from ..data.facts import Fact, portability_probe, reliability_prompt
from ..errors import ConfigError, DataSourceError
from ..evaluate.answers import greedy_answers, heldout_nll, score_answers
from ..methods import Method
from ..models.checkpoint import load_memory_stats, save_model
from ..models.folder import CARRY_FILES
from ..models.memory import freeze_query_stats
from ..training.lifecycle import Experience, MethodContext, fit_experience


@dataclass
class StreamConfig:
    batch_size: int = 16  # differently-worded statements per step
    steps_per_fact: int = 4
    eval_every: int = 25  # facts; 0 = only at the end
    loss_on: str = "all"  # "all" tokens of the statement, or only the "answer" tokens
    questions: bool = False  # mix question/answer lines (training templates, never the probes) into each batch
    retained_sample: int = 200  # known facts probed during the stream (all of them at the end)
    heldout_tokens: int = 16_384  # held-out text scored during the stream (4x at the end)
    final_all_known: bool = True  # the base and final evaluations probe every known fact
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss_on not in ("all", "answer"):
            raise ConfigError(f"loss_on must be 'all' or 'answer', got {self.loss_on!r}.")
        if self.batch_size < 1 or self.steps_per_fact < 1:
            raise ConfigError("batch_size and steps_per_fact must be positive.")


@dataclass
class Evaluation:
    facts_seen: int
    learned: float
    learned_f1: float
    statement_acc: float
    retained: float
    heldout_nll: float
    seconds: float = 0.0
    reliability: float = 0.0  # EasyEdit: the training question of each taught fact
    portability: float = 0.0  # EasyEdit: two-hop questions (over the taught facts that have one)
    portability_n: int = 0


@dataclass
class StreamResult:
    base: Evaluation
    final: Evaluation
    curve: list[Evaluation] = field(default_factory=list)
    seconds_per_step: float = 0.0
    trainable_params_per_step: int = 0
    steps: int = 0
    setup_seconds: float = 0.0  # the method's setup (for rome/memit: the edits themselves)

    def summary(self) -> dict:
        b, f = self.base, self.final
        return {
            "learned": f.learned, "learned_f1": f.learned_f1, "statement_acc": f.statement_acc,
            "retained": f.retained, "retained_base": b.retained,
            "retained_drop": (b.retained - f.retained) / b.retained if b.retained > 0 else 0.0,
            "heldout_nll": f.heldout_nll, "heldout_nll_delta": f.heldout_nll - b.heldout_nll,
            "easyedit": {"reliability": f.reliability, "generalization": f.learned, "locality": f.retained,
                         "portability": f.portability, "portability_n": f.portability_n,
                         "base": {"reliability": b.reliability, "generalization": b.learned,
                                  "locality": b.retained, "portability": b.portability}},
            "trainable_params_per_step": self.trainable_params_per_step,
            "seconds_per_step": self.seconds_per_step, "steps": self.steps, "setup_seconds": self.setup_seconds,
            "curve": [asdict(e) for e in self.curve],
        }


# --------------------------------------------------------------------------- evaluation
def statement_prompt(fact: Fact) -> str | None:
    """A trained statement cut just before its answer (the answer must end the sentence)."""
    for s in [fact.statement, *fact.paraphrases]:
        core = s.rstrip(".").rstrip()
        if core.endswith(fact.answer) and len(core) > len(fact.answer):
            return core[: -len(fact.answer)].rstrip()
    return None


class FactEvaluator:
    """Evaluates a model on taught facts, known facts and held-out text (fixed samples)."""

    def __init__(self, tok, known: list[Fact], heldout: torch.Tensor, cfg: StreamConfig):
        self.tok, self.cfg = tok, cfg
        self.known_all = known
        rng = random.Random(cfg.seed + 17)
        self.known_sample = known if len(known) <= cfg.retained_sample else rng.sample(known, cfg.retained_sample)
        self.heldout = heldout

    def __call__(self, model: nn.Module, taught: list[Fact], facts_seen: int, final: bool = False) -> Evaluation:
        t0 = time.time()
        learned = score_answers(greedy_answers(model, self.tok, [f.question for f in taught]),
                                [f.answer for f in taught]) if taught else {"exact_match": 0.0, "f1": 0.0}
        st = [(statement_prompt(f), f.answer) for f in taught]
        st = [(p, a) for p, a in st if p]
        stmt = score_answers(greedy_answers(model, self.tok, [p for p, _ in st]),
                             [a for _, a in st])["exact_match"] if st else 0.0
        rel = [p for p in map(reliability_prompt, taught) if p]
        rel_em = score_answers(greedy_answers(model, self.tok, [p for p, _ in rel]),
                               [a for _, a in rel])["exact_match"] if rel else 0.0
        port = [p for p in map(portability_probe, taught) if p]
        port_em = score_answers(greedy_answers(model, self.tok, [p for p, _ in port]),
                                [a for _, a in port])["exact_match"] if port else 0.0
        full = final and self.cfg.final_all_known
        known = self.known_all if full else self.known_sample
        ret = score_answers(greedy_answers(model, self.tok, [f.question for f in known]), [f.answer for f in known])
        n_tok = self.heldout.numel() - 1 if full else min(self.cfg.heldout_tokens, self.heldout.numel() - 1)
        nll = heldout_nll(model, self.heldout[: n_tok + 1], seq_len=128, batch_size=32)["nll"]
        return Evaluation(facts_seen=facts_seen, learned=learned["exact_match"], learned_f1=learned["f1"],
                          statement_acc=stmt, retained=ret["exact_match"], heldout_nll=nll,
                          seconds=time.time() - t0, reliability=rel_em, portability=port_em, portability_n=len(port))


# --------------------------------------------------------------------------- the stream
def evaluate_before(model: nn.Module, facts: list[Fact], evaluator: FactEvaluator) -> Evaluation:
    """The model before teaching: what it already knows of the facts to teach, and of its known facts."""
    freeze_query_stats(model)
    return evaluator(model, facts, 0, final=True)  # same known facts and held-out text as the final evaluation


def learn_facts(model: nn.Module, tok, facts: list[Fact], method: Method, evaluator: FactEvaluator,
                cfg: StreamConfig, context: MethodContext, progress: bool = True,
                log: Callable[[str], None] = print, base: Evaluation | None = None) -> tuple[nn.Module, StreamResult]:
    """Teach ``facts`` in order with ``method``; returns the updated (exported) model and the record.
    ``base`` (from ``evaluate_before``) saves re-evaluating the unchanged model."""
    if not facts:
        raise DataSourceError("there are no facts to teach.")
    device = next(model.parameters()).device
    base = base or evaluate_before(model, facts, evaluator)  # also freezes the memory's query statistics
    log(f"before: learned {base.learned:.1%} (of {len(facts)} facts), retained {base.retained:.1%}, "
        f"held-out NLL {base.heldout_nll:.3f}")
    steps = len(facts) * cfg.steps_per_fact
    batches = [fact_batch(tok, f, cfg.batch_size, cfg.loss_on, device, cfg.questions) for f in facts]
    experience = Experience("facts", lambda s: batches[s // cfg.steps_per_fact], steps, test=facts,
                            info={"fact_ids": [f.id for f in facts]}, valid_batch=lambda i: batches[i % len(batches)],
                            facts=list(facts))  # for methods that edit facts directly (rome, memit)
    curve: list[Evaluation] = []
    if cfg.eval_every:  # the curve starts at the base, on the same known-fact sample as its other points
        curve.append(evaluator(model, [], 0))

    def on_eval(m: nn.Module, step: int) -> None:  # curve points within the stream (the final one: below)
        seen = step // cfg.steps_per_fact
        if step < steps and cfg.eval_every and seen % cfg.eval_every == 0 and step % cfg.steps_per_fact == 0:
            ev = evaluator(m, facts[:seen], seen)
            curve.append(ev)
            log(f"after {seen} facts: learned {ev.learned:.1%}, retained {ev.retained:.1%}, "
                f"held-out NLL {ev.heldout_nll:.3f}")

    fit = fit_experience(method, model, context, experience, on_eval=on_eval, eval_every=cfg.steps_per_fact,
                         progress=progress, desc=f"teaching ({method.name})")
    model = fit.model  # exported (e.g. LoRA merged, a retrieval front end): the model that is evaluated
    ev = evaluator(model, facts, len(facts))
    curve.append(ev)
    # the final figures use every known fact, like the base evaluation
    final = evaluator(model, facts, len(facts), final=True) if cfg.final_all_known else ev
    log(f"after {len(facts)} facts: learned {ev.learned:.1%}, retained {ev.retained:.1%}, "
        f"held-out NLL {ev.heldout_nll:.3f}")
    result = StreamResult(base=base, final=final, curve=curve,
                          seconds_per_step=fit.train_seconds / max(fit.steps, 1),
                          trainable_params_per_step=fit.trainable_params, steps=fit.steps,
                          setup_seconds=fit.setup_seconds)
    return model, result


def save_learned(model: nn.Module, tok, source_dir: Path, out_dir: Path, facts: list[Fact], record: dict) -> Path:
    """Save an updated model as a complete model folder (atomic): weights, tokenizer, the source's
    data files and background statistics, plus the taught facts and the learning record."""
    extra = {n: Path(source_dir) / n for n in CARRY_FILES if (Path(source_dir) / n).is_file() and n != "memory_stats.safetensors"}
    stats = load_memory_stats(source_dir)
    (out_tmp := Path(out_dir).parent).mkdir(parents=True, exist_ok=True)
    taught = out_tmp / f".{Path(out_dir).name}.taught.jsonl"
    taught.write_text("".join(json.dumps(asdict(f)) + "\n" for f in facts))
    try:
        return save_model(model, out_dir, tokenizer=tok, memory_stats=stats,
                          extra_json={"learn_record.json": {**record, "source_model": str(source_dir)}},
                          extra_files={**extra, "taught_facts.jsonl": taught})
    finally:
        taught.unlink(missing_ok=True)
