"""The one fact evaluation, used by ``forgetless learn``, ``bench facts`` and the fact stream of
``forgetless run`` alike.

- learned          exact match (and token F1) of the greedy answer to each taught fact's
                   held-out question probe (never trained on), over the facts taught so far
- statement_acc    the same for completing a *trained* statement up to its answer: memorisation,
                   as opposed to retrievable knowledge
- retained         question-probe exact match on the model's *known* facts (a fixed sample of
                   ``retained_sample`` along the way; every known fact for the base and final
                   scores when ``final_all_known``)
- heldout_nll      next-token NLL (nats/token) on held-out pretraining text (``heldout_tokens``
                   along the way, 4x that for the base and final scores)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..data.facts import Fact, portability_probe, reliability_prompt
from .answers import greedy_answers, heldout_nll, score_answers


@dataclass
class FactScores:
    """One evaluation of a model on taught facts, known facts and held-out text."""

    facts_seen: int = 0  # facts taught when it was taken
    learned: float = 0.0  # exact match on the taught facts' held-out question probes
    learned_f1: float = 0.0  # token F1 of the same answers
    statement_acc: float = 0.0  # trained statements completed with their answer
    retained: float = 0.0  # exact match on the known facts' question probes
    heldout_nll: float = 0.0  # nats/token on held-out pretraining text
    seconds: float = 0.0  # time the evaluation took
    step: int | None = None  # global optimizer step (None: not part of a stream's curve)
    reliability: float = 0.0  # EasyEdit: exact match on each taught fact's first training question
    portability: float = 0.0  # EasyEdit: two-hop questions (data.facts.portability_probe)
    portability_n: int = 0  # taught facts that have a two-hop question
    learned_contains: float = 0.0  # the answer stated in the first sentence (evaluate.answers.contains_match)
    retained_contains: float = 0.0  # the same rule on the known facts (chat models answer in sentences)


HELDOUT_WINDOW = 128  # tokens per window of the held-out NLL the fact evaluation scores


class FactEvalConfig(Protocol):  # the fields of experiments.streams.StreamConfig the evaluator reads
    retained_sample: int
    heldout_tokens: int
    final_all_known: bool
    seed: int


def statement_prompt(fact: Fact) -> str | None:
    """A trained statement cut just before its answer (the answer must end the sentence)."""
    for s in [fact.statement, *fact.paraphrases]:
        core = s.rstrip(".").rstrip()
        if core.endswith(fact.answer) and len(core) > len(fact.answer):
            return core[: -len(fact.answer)].rstrip()
    return None


def probe_exact_match(model: nn.Module, tok, facts: list[Fact]) -> float:
    """Exact match of the greedy answers to the facts' question probes."""
    return score_answers(greedy_answers(model, tok, [f.question for f in facts]), [f.answer for f in facts])["exact_match"]


class FactEvaluator:
    """Evaluates a model on taught facts, known facts and held-out text (fixed samples).

    ``known_sample`` is ``retained_sample`` known facts drawn with ``Random(seed + 17)`` (all of
    them when there are fewer): the ``retained`` of the curves and of a fact stream's extra column."""

    def __init__(self, tok, known: list[Fact], heldout: torch.Tensor, cfg: FactEvalConfig):
        self.tok, self.cfg = tok, cfg
        self.known_all = known
        rng = random.Random(cfg.seed + 17)
        self.known_sample = known if len(known) <= cfg.retained_sample else rng.sample(known, cfg.retained_sample)
        self.heldout = heldout

    def retained(self, model: nn.Module) -> float:
        """Exact match on the sample of known facts."""
        return probe_exact_match(model, self.tok, self.known_sample)

    def __call__(self, model: nn.Module, taught: list[Fact], facts_seen: int, final: bool = False) -> FactScores:
        t0 = time.time()
        learned = score_answers(greedy_answers(model, self.tok, [f.question for f in taught]),
                                [f.answer for f in taught]) if taught else {"exact_match": 0.0, "f1": 0.0,
                                                                            "contains": 0.0}
        st = [(statement_prompt(f), f.answer) for f in taught]
        st = [(p, a) for p, a in st if p]
        stmt = score_answers(greedy_answers(model, self.tok, [p for p, _ in st], chat=False),
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
        nll = heldout_nll(model, self.heldout[: n_tok + 1], seq_len=HELDOUT_WINDOW, batch_size=32)["nll"]
        return FactScores(facts_seen=facts_seen, learned=learned["exact_match"], learned_f1=learned["f1"],
                          learned_contains=learned.get("contains", 0.0), retained_contains=ret["contains"],
                          statement_acc=stmt, retained=ret["exact_match"], heldout_nll=nll,
                          seconds=time.time() - t0, reliability=rel_em, portability=port_em, portability_n=len(port))
