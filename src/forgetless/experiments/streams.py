"""Streams of experiences built from the real offline data shipped with a model.

A *stream* is an ordered list of *experiences*; each experience has its own training data
and its own test set, and a scoring function gives one number per (model, experience).

- ``domain``  domain-incremental language modelling: one held-out Wikipedia topic (never in
              pretraining) per experience; score = held-out NLL per token (lower is better).
              The general held-out text is scored alongside as an extra column.
- ``facts``   the fact stream: K new facts per experience, taught as batches of paraphrases;
              score = exact match of held-out question probes (higher is better). The base's
              known facts are scored alongside as an extra column ("retained").
- ``task_il`` / ``class_il``  topic classification of Wikipedia summaries with the LM: the
              model reads "Text: <summary> Topic:" and the label is the answer text; each
              experience adds ``topics_per_experience`` topics. The prediction is the candidate
              label with the highest log-likelihood. Task-incremental: the candidates are the
              topics of the document's own experience. Class-incremental: every topic seen so
              far, i.e. of experiences 1..max(i, j) when scoring experience j after training
              through i (before training: 1..j). Score = accuracy.

Order and splits are fixed by the seed and recorded in the results.
"""

from __future__ import annotations

import functools

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data.augment import is_probe_like, questions_from
from ..data.batches import fact_batch, label_batch, lm_batch
from ..data.factfile import load_fact_file
from ..data.facts import MATERIALS, Fact, load_known_facts, reliability_prompt
from ..errors import ConfigError, DataSourceError
from ..evaluate.answers import exact_match, greedy_answers, heldout_nll
from ..evaluate.facts import (
    HELDOUT_WINDOW,
    FactEvaluator,
    FactScores,
    probe_exact_match,
)
from ..evaluate.known import known_facts
from ..models.checkpoint import load_model
from ..models.folder import (
    encode_texts,
    eval_file,
    load_heldout_ids,
    load_topics,
    open_model,
)
from ..models.memory import freeze_query_stats
from ..training.lifecycle import Experience

KINDS = ("domain", "facts", "task_il", "class_il")


@dataclass
class StreamConfig:
    """The one stream config: ``forgetless run`` (``stream:`` of an experiment), ``learn`` and
    ``bench facts`` (a facts stream of one experience) all use it."""

    kind: str = "domain"  # domain | facts | task_il | class_il
    topics: list[str] | None = None  # domain: which held-out topics, in order (default: all, shuffled by seed)
    experiences: int | None = None  # domain: how many topics; facts: how many groups of facts (default 4)
    facts_per_experience: int = 10
    steps_per_experience: int = 40  # domain / task_il / class_il: optimizer steps per experience
    steps_per_fact: int = 8  # facts: optimizer steps per fact (8 learned more than 4 at the same forgetting: docs/smf.md)
    passes: int = 1  # facts: teach each experience's facts this many times in order (each pass sees new lines)
    skip_learned: bool = False  # facts: in passes after the first, skip a fact the model answers under its taught prompts
    questions: bool = False  # facts: older spelling of material: questions
    material: str = "augmented"  # facts: augmented | statements | questions (see data/facts.teaching_sentences)
    facts_offset: int = 0  # facts: skip this many facts of the shuffled file (e.g. validation facts after the test ones)
    loss_on: str = "all"  # facts: loss on "all" tokens of the statement, or only the "answer" tokens
    facts_file: str | None = None  # facts: JSONL fact file (default: the model's facts_new.jsonl)
    retained_sample: int = 100  # facts: known facts probed for the "retained" column and the curves
    heldout_tokens: int = 16_384  # facts: held-out text scored along the curves (4x for the base and final scores)
    final_all_known: bool = True  # facts: the base and final fact scores probe every known fact
    batch_size: int = 16
    seq_len: int = 128
    test_docs: int = 30  # domain: documents per topic kept for testing
    # Curve points within an experience, in OPTIMIZER STEPS for every kind (0 = only at experience
    # ends). `forgetless learn/bench facts --eval-every K` count facts and set K * steps_per_fact.
    eval_every: int = 10
    general_tokens: int = 8192  # general held-out text scored as the extra column
    topics_per_experience: int = 2  # task_il / class_il
    text_chars: int = 200  # task_il / class_il: characters of each summary shown to the model
    seed: int = 0  # facts: fact order and known-fact sample when built without a run seed (learn)
    chat: bool = True  # question probes through the tokenizer's chat template when it has one (false: plain text)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"stream.kind must be one of {KINDS}, got {self.kind!r}.")
        if self.questions:
            self.material = "questions"
        if self.material not in MATERIALS:
            raise ConfigError(f"stream.material must be one of {MATERIALS}, got {self.material!r}.")
        if self.loss_on not in ("all", "answer"):
            raise ConfigError(f"stream.loss_on must be 'all' or 'answer', got {self.loss_on!r}.")
        for key in ("facts_per_experience", "steps_per_experience", "steps_per_fact", "passes", "batch_size", "seq_len",
                    "test_docs", "general_tokens", "topics_per_experience", "text_chars", "retained_sample",
                    "heldout_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"stream.{key} must be at least 1, got {getattr(self, key)}.")
        if self.kind == "facts" and self.heldout_tokens < HELDOUT_WINDOW:
            raise ConfigError(f"stream.heldout_tokens must be at least {HELDOUT_WINDOW} (one scoring window of "
                              f"the fact evaluation), got {self.heldout_tokens}.")
        if self.skip_learned and self.passes < 2:
            raise ConfigError("stream.skip_learned (--skip-learned) acts on the passes after the first: set stream.passes "
                              "(--passes) to 2 or more.")
        if self.experiences is not None and self.experiences < 1:
            raise ConfigError(f"stream.experiences must be at least 1, got {self.experiences}.")
        if self.eval_every < 0:
            raise ConfigError(f"stream.eval_every counts optimizer steps and must be >= 0 (0: only at experience "
                              f"ends), got {self.eval_every}.")


@dataclass
class Stream:
    name: str
    kind: str
    metric: str
    higher_is_better: bool
    experiences: list[Experience]
    score: Callable[[nn.Module, Experience, int], float]  # (model, experience, stage: experiences trained - 1)
    extra_name: str
    extra_score: Callable[[nn.Module], float]
    info: dict
    eval_every: int = 0  # steps between curve points within an experience (0: only at its end)
    facts: "FactTrack | None" = None  # fact streams: the taught facts and the one fact evaluator
    chat: bool = True  # the models of the stream are opened with this chat setting (StreamConfig.chat)
    device: str = "cpu"  # ... and on this device (``forgetless run/bench facts --device``)

    @property
    def task_given(self) -> bool:
        """Whether the experience is known at test time (task-incremental)."""
        return self.kind == "task_il"


def domain_stream(model_dir: Path, tok, cfg: StreamConfig, seed: int) -> Stream:
    by_topic = load_topics(model_dir)
    topics = _choose_topics(by_topic, cfg, seed)
    if cfg.experiences and cfg.experiences > len(topics):
        raise ConfigError(f"stream.experiences is {cfg.experiences}, but this model has {len(topics)} held-out topics.")
    topics = topics[: cfg.experiences or len(topics)]
    experiences, splits = [], {}
    for k, topic in enumerate(topics):
        docs = sorted(by_topic[topic], key=lambda d: d["title"])
        random.Random(seed * 7919 + k).shuffle(docs)
        test, train = docs[: cfg.test_docs], docs[cfg.test_docs:]
        train_ids, test_ids = encode_texts(tok, [d["text"] for d in train]), encode_texts(tok, [d["text"] for d in test])
        splits[topic] = {"train_docs": len(train), "test_docs": len(test), "train_tokens": int(train_ids.numel()),
                         "test_tokens": int(test_ids.numel()), "test_titles": [d["title"] for d in test]}

        def batch_fn(step: int, ids=train_ids, k=k) -> dict:
            return lm_batch(ids, cfg.seq_len, cfg.batch_size, seed * 1_000_003 + k * 10_007 + step)

        def valid_fn(i: int, ids=train_ids, k=k) -> dict:
            return lm_batch(ids, cfg.seq_len, cfg.batch_size, seed * 1_000_003 + k * 10_007 + 5_000_000 + i)

        experiences.append(Experience(topic, batch_fn, cfg.steps_per_experience, test_ids, splits[topic], valid_fn))
    general = load_heldout_ids(model_dir, tok, cfg.general_tokens)

    def score(model: nn.Module, exp: Experience, stage: int) -> float:
        return heldout_nll(model, exp.test, seq_len=cfg.seq_len, batch_size=32)["nll"]

    return Stream(name="domain", kind="domain", metric="nll", higher_is_better=False, experiences=experiences,
                  score=score, extra_name="general_nll",
                  extra_score=lambda m: heldout_nll(m, general, seq_len=cfg.seq_len, batch_size=32)["nll"],
                  info={"topics": topics, "splits": splits, "seed": seed}, eval_every=cfg.eval_every)


@dataclass
class FactTrack:
    """The fact side of a fact stream: every taught fact in order and the one :class:`FactEvaluator`;
    the base model's scores are computed once per stream (every method starts from the same base)."""

    facts: list[Fact]
    evaluator: FactEvaluator
    steps_per_fact: int
    _base: FactScores | None = None
    _base_curve: FactScores | None = None
    device: str = "cpu"

    def taught(self, experiences: list[Experience], k: int, step: int) -> list[Fact]:
        """Facts taught after ``step`` steps of experience ``k`` (those of experiences < k included)."""
        before = [f for e in experiences[:k] for f in e.test]
        return before + list(experiences[k].test[: step // self.steps_per_fact])

    def base(self, model_dir: Path) -> FactScores:
        """The base model on every fact to teach, with the final evaluation's known facts and text."""
        if self._base is None:
            with torch.random.fork_rng(devices=[]):  # building a model must not move the run's RNG
                model, _ = open_model(model_dir, device=self.device)
            freeze_query_stats(model)
            self._base = self.evaluator(model, self.facts, 0, final=True)
            self._base_curve = self.evaluator(model, [], 0)
        return self._base

    def set_base(self, model: nn.Module, base: FactScores | None = None,
                 base_curve: FactScores | None = None) -> FactScores:
        """Take the base scores from ``model`` (the untrained model a caller holds); ``base`` and
        ``base_curve``, when a caller already has them for this model and evaluator, are not recomputed."""
        freeze_query_stats(model)
        self._base = base or self.evaluator(model, self.facts, 0, final=True)
        self._base_curve = base_curve or self.evaluator(model, [], 0)
        return self._base

    def base_curve(self, model_dir: Path) -> FactScores:
        """The curve's first point (the known-fact sample, like its other points)."""
        self.base(model_dir)
        return self._base_curve


def fact_stream(model_dir: Path, tok, cfg: StreamConfig, seed: int, facts_file: Path | None = None,
                facts: list[Fact] | None = None, device: str = "cpu") -> Stream:
    """``experiences`` groups of ``facts_per_experience`` facts from the fact file (shuffled by the
    seed), or exactly ``facts`` (in their order) as one experience when given (``forgetless learn``)."""
    given = facts
    if facts is None:
        facts = load_fact_file(facts_file or cfg.facts_file or eval_file(model_dir, "facts_new.jsonl", "the fact stream"))
        random.Random(seed).shuffle(facts)
        facts = facts[cfg.facts_offset:]
        n_exp = cfg.experiences or 4
        if n_exp * cfg.facts_per_experience > len(facts):
            raise ConfigError(f"the fact stream needs {n_exp * cfg.facts_per_experience} facts; the file has {len(facts)}.")
        per = cfg.facts_per_experience
    else:
        if not facts:
            raise DataSourceError("there are no facts to teach.")
        n_exp, per = 1, len(facts)
    if (Path(model_dir) / "facts_known.jsonl").is_file():
        known = load_known_facts(model_dir)
    else:  # any other model: the shipped probe facts it answers before training (found once, cached beside it)
        known = known_facts(load_model(model_dir).to(device), tok, model_dir, exclude={f.id for f in facts})
    evaluator = FactEvaluator(tok, known,
                              load_heldout_ids(model_dir, tok, 4 * cfg.heldout_tokens), replace(cfg, seed=seed))
    stream = facts_to_stream(tok, [facts[k * per:(k + 1) * per] for k in range(n_exp)], cfg, evaluator, seed)
    stream.facts.device = device
    _check_context(stream, model_dir)
    stream.info["facts_file"] = str(facts_file or cfg.facts_file or eval_file(model_dir, "facts_new.jsonl")) \
        if given is None else "(given)"
    return stream


def _check_context(stream: "Stream", model_dir: Path) -> None:
    """Teaching text longer than the model's context is refused before anything is trained."""
    try:
        limit = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(limit, int):
        return
    for e in stream.experiences:
        for step in range(e.steps):
            width = e.train_batch(step)["input_ids"].shape[1]
            if width > limit:
                raise DataSourceError(f"the teaching text of {e.name} is {width} tokens long, more than the model's "
                                      f"context of {limit}; shorten the fact's statement.")


def facts_to_stream(tok, groups: list[list[Fact]], cfg: StreamConfig, evaluator: FactEvaluator, seed: int) -> Stream:
    """A fact stream of the given groups of facts (one experience each), scored by ``evaluator``."""
    experiences = []
    for k, group in enumerate(groups):
        # one batch per step: with augmented material, later steps of a fact (and later passes) see new lines
        # built when asked for (a fact's lines depend only on the fact, its step and the seed), so that
        # many passes over many facts do not hold every batch in memory at once
        spf, n_steps = cfg.steps_per_fact, cfg.passes * len(group) * cfg.steps_per_fact

        @functools.lru_cache(maxsize=64)
        def batch_fn(step: int, group=group, spf=spf) -> dict:
            p, rest = divmod(step, len(group) * spf)
            f, j = divmod(rest, spf)
            return fact_batch(tok, group[f], cfg.batch_size, cfg.loss_on, torch.device("cpu"), material=cfg.material,
                              step=p * spf + j, seed=seed)

        experiences.append(Experience(f"facts {k + 1}", batch_fn, n_steps, group,
                                      {"fact_ids": [f.id for f in group]},
                                      lambda i, batch_fn=batch_fn, n=n_steps: batch_fn(i % n), facts=group,
                                      skip=skip_learned(tok, group, spf) if cfg.skip_learned else None))
    track = FactTrack([f for e in experiences for f in e.test], evaluator, cfg.steps_per_fact)
    return Stream(name="facts", kind="facts", metric="exact_match", higher_is_better=True, experiences=experiences,
                  score=lambda m, e, stage: probe_exact_match(m, tok, e.test), extra_name="retained",
                  extra_score=evaluator.retained,
                  info={"fact_ids": [e.info["fact_ids"] for e in experiences], "seed": seed,
                        "retained_facts": [f.id for f in evaluator.known_sample]},
                  eval_every=cfg.eval_every, facts=track)


def taught_prompts(fact: Fact, n_questions: int = 3) -> list[str]:
    """Prompts a fact is taught with, to check whether it was learned without its held-out probe:
    its first training prompt (``data.facts.reliability_prompt``: a training question, or the
    statement cut before the answer) and up to ``n_questions`` of the augmenter's rule-made
    questions in the "Question: ... Answer:" format; none is probe-like."""
    first = reliability_prompt(fact)
    prompts = [first[0]] if first else []
    prompts += [f"Question: {q} Answer:" for q in questions_from(fact.statement, fact.answer)[:n_questions]]
    return [p for p in dict.fromkeys(prompts) if not is_probe_like(p, fact.question)]


def skip_learned(tok, group: list[Fact], steps_per_fact: int) -> Callable[[nn.Module, int], bool]:
    """``Experience.skip`` of a fact experience taught in passes: from the second pass on, a fact's
    steps are left out when the model, at the first of them, already answers every one of its
    ``taught_prompts`` (never the held-out probe). Facts that later teaching overwrote are taught again.

    The passes stop early when they stop making progress: a pass is taught only while the checks
    of the pass before it found more facts answering their taught prompts than the checks of the
    pass before that (none are counted before the first checks). So a stream the model does not
    learn (no fact answers its taught prompts after a whole pass) is taught twice, not N times, and
    a stream that stalls is not hammered further. The checks (greedy answers) count as training time."""
    per_pass = len(group) * steps_per_fact
    decided: dict[tuple[int, int], bool] = {}
    passed: dict[int, int] = {}  # pass -> facts that answered every taught prompt at its checks
    stopped: list[int] = []  # the pass at which the passes stopped

    def skip(model: nn.Module, step: int) -> bool:
        p, f = step // per_pass, (step % per_pass) // steps_per_fact
        if p == 0:  # every fit starts here: decisions of an earlier fit (another method) do not carry over
            decided.clear(), passed.clear(), stopped.clear()
            return False
        if stopped:
            return True
        if p >= 2 and f == 0 and (p, f) not in decided and passed.get(p - 1, 0) <= passed.get(p - 2, 0):
            stopped.append(p)  # the last pass made no progress on the taught prompts: stop
            return True
        if (p, f) not in decided:
            prompts = taught_prompts(group[f])
            answers = greedy_answers(model, tok, prompts) if prompts else []
            decided[p, f] = bool(prompts) and all(exact_match(a, group[f].answer) for a in answers)
            passed[p] = passed.get(p, 0) + decided[p, f]
        return decided[p, f]

    skip.stopped_at = stopped  # for the caller's report: [] while the passes run
    return skip


def _choose_topics(by_topic: dict[str, list[dict]], cfg: StreamConfig, seed: int) -> list[str]:
    """``stream.topics`` in the given order (checked), or every held-out topic shuffled by the seed."""
    topics = list(cfg.topics) if cfg.topics else sorted(by_topic)
    unknown = [t for t in topics if t not in by_topic]
    if unknown:
        raise ConfigError(f"stream.topics {unknown} are not held-out topics of this model; choose from {sorted(by_topic)}.")
    if not cfg.topics:
        random.Random(seed).shuffle(topics)
    return topics


@torch.no_grad()
def label_logprobs(model: nn.Module, tok, prompts: list[str], labels: list[str], batch_size: int = 32) -> torch.Tensor:
    """log p(label | prompt) summed over the label tokens, for every (prompt, label) pair: (P, L)."""
    model.eval()
    device = next(model.parameters()).device
    pairs = [(p, l) for p in prompts for l in labels]
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        enc = tok([p + " " + l for p, l in chunk], return_tensors="pt", padding=True, padding_side="right").to(device)
        n_prompt = [len(tok(p, add_special_tokens=False)["input_ids"]) for p, _ in chunk]
        logp = model(**enc).logits.float().log_softmax(-1)
        ids = enc["input_ids"]
        tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # log p(token t+1 | <= t)
        mask = enc["attention_mask"][:, 1:].clone().bool()
        for b, n in enumerate(n_prompt):
            mask[b, : n - 1] = False
        out.append((tok_lp * mask).sum(-1))
    return torch.cat(out).view(len(prompts), len(labels)).cpu()


def topic_stream(model_dir: Path, tok, cfg: StreamConfig, seed: int) -> Stream:
    by_topic = load_topics(model_dir)
    topics = _choose_topics(by_topic, cfg, seed)
    per = cfg.topics_per_experience
    groups = [topics[i:i + per] for i in range(0, len(topics) - per + 1, per)]
    if cfg.experiences and cfg.experiences > len(groups):
        raise ConfigError(f"stream.experiences is {cfg.experiences}, but {len(topics)} topics make only {len(groups)} "
                          f"experiences of {per}.")
    groups = groups[: cfg.experiences or None]
    if not groups:
        raise ConfigError(f"stream needs at least {per} topics for one experience.")

    def prompt(d: dict) -> str:
        return "Text: " + d["text"][: cfg.text_chars].rsplit(" ", 1)[0] + " Topic:"

    experiences = []
    for k, group in enumerate(groups):
        train, test = [], []
        for t in group:
            docs = sorted(by_topic[t], key=lambda d: d["title"])
            random.Random(seed * 7919 + len(t)).shuffle(docs)
            test += [(prompt(d), t) for d in docs[: cfg.test_docs]]
            train += [(prompt(d), t) for d in docs[cfg.test_docs:]]

        def batch_fn(step: int, train=train, k=k) -> dict:
            return label_batch(tok, train, cfg.batch_size, random.Random(seed * 1_000_003 + k * 10_007 + step))

        def valid_fn(i: int, train=train, k=k) -> dict:
            return label_batch(tok, train, cfg.batch_size, random.Random(seed * 1_000_003 + k * 10_007 + 5_000_000 + i))

        experiences.append(Experience(" + ".join(group), batch_fn, cfg.steps_per_experience, test,
                                      {"topics": group, "train_docs": len(train), "test_docs": len(test)}, valid_fn))
    index = {id(e): k for k, e in enumerate(experiences)}

    def score(model: nn.Module, exp: Experience, stage: int) -> float:
        j = index[id(exp)]
        if cfg.kind == "task_il":
            cands = exp.info["topics"]
        else:
            cands = [t for e in experiences[: max(stage, j) + 1] for t in e.info["topics"]]
        lp = label_logprobs(model, tok, [p for p, _ in exp.test], cands)
        pred = [cands[i] for i in lp.argmax(-1).tolist()]
        return sum(p == t for p, (_, t) in zip(pred, exp.test)) / len(exp.test)

    general = load_heldout_ids(model_dir, tok, cfg.general_tokens)
    return Stream(name=cfg.kind, kind=cfg.kind, metric="accuracy", higher_is_better=True, experiences=experiences,
                  score=score, extra_name="general_nll",
                  extra_score=lambda m: heldout_nll(m, general, seq_len=cfg.seq_len, batch_size=32)["nll"],
                  info={"groups": groups, "seed": seed}, eval_every=cfg.eval_every)


def build_stream(model_dir: Path, tok, cfg: StreamConfig, seed: int, device: str = "cpu") -> Stream:
    """The stream of ``cfg``; its models are opened on ``device`` (batches are built on the CPU and
    delivered on the model's device by ``training.lifecycle.fit_experience``)."""
    if cfg.kind == "domain":
        stream = domain_stream(model_dir, tok, cfg, seed)
    elif cfg.kind == "facts":
        stream = fact_stream(model_dir, tok, cfg, seed, device=device)
    else:
        stream = topic_stream(model_dir, tok, cfg, seed)
    stream.chat, stream.device = cfg.chat, device
    return stream
