"""The pretraining corpus of the shipped base: real offline text plus worded known facts.

What goes where (recorded in ``data_split.json`` next to the model):

- *train*: GCIDE dictionary entries, WordNet glosses and Wikipedia Vital Article summaries of
  every topic except the held-out ones, minus a random held-out slice; plus the fact lines
  of the *known* facts (statements; question/answer lines for part of them; a few
  "Context: ... Question: ... Answer: ..." lines that teach the model to read its context).
- *heldout*: a random slice of the same general text, never trained on (held-out perplexity,
  background statistics may come from train).
- *domains*: the Wikipedia summaries of the held-out topics, never trained on (the new domains
  of the domain-incremental stream).
- decontamination: every sentence of the general text that names a *new* fact's subject
  together with its answer is removed, so new facts stay new.
- leak check: no probe phrasing occurs anywhere in the training text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ..errors import DataSourceError
from .facts import (
    Fact,
    drop_overlapping,
    geonames_facts,
    probe_prefixes,
    question_lines,
    split_known_new,
    statement_lines,
)

DEFAULT_HELDOUT_TOPICS = ["Arts", "Technology", "Mathematics", "Philosophy and religion"]


@dataclass
class DataConfig:
    """Which real text and facts the base is pretrained on."""

    sources: list[str] = field(default_factory=lambda: ["gcide", "wordnet", "wiki"])
    gcide_limit: int | None = None  # entries (None = all)
    wordnet_limit: int | None = None
    heldout_topics: list[str] = field(default_factory=lambda: list(DEFAULT_HELDOUT_TOPICS))
    heldout_fraction: float = 0.02  # of general documents kept out for perplexity
    split_seed: int = 0
    new_fraction: float = 0.5  # share of countries whose facts are *new*
    max_cities_per_country: int = 4
    qa_fraction: float = 0.5  # known facts that also get question/answer lines
    context_fraction: float = 0.25  # known facts that also get a context-reading line
    fact_share: float = 0.2  # share of training sequences drawn from fact lines


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    domains: dict[str, list[dict]]
    known: list[Fact]
    new: list[Fact]
    fact_lines: list[str]
    qa_ids: list[str]
    info: dict


_SENT = re.compile(r"(?<=[.!?;])\s+")


def _general_docs(cfg: DataConfig) -> tuple[list[tuple[str, str]], dict[str, list[dict]]]:
    docs: list[tuple[str, str]] = []  # (source, text)
    domains: dict[str, list[dict]] = {}
    for src in cfg.sources:
        if src == "gcide":
            from .gcide import gcide_entries
            docs += [("gcide", t) for t in gcide_entries(limit=cfg.gcide_limit)]
        elif src == "wordnet":
            from .wordnet import wordnet_glosses
            docs += [("wordnet", t) for t in wordnet_glosses(limit=cfg.wordnet_limit)]
        elif src == "wiki":
            from .wiki import wiki_summaries
            for s in wiki_summaries():
                if s["topic"] in cfg.heldout_topics:
                    domains.setdefault(s["topic"], []).append(s)
                else:
                    docs.append(("wiki", s["text"]))
        else:
            raise DataSourceError(f"unknown text source {src!r}; choose from gcide, wordnet, wiki.")
    missing = [t for t in cfg.heldout_topics if "wiki" in cfg.sources and t not in domains]
    if missing:
        raise DataSourceError(f"held-out Wikipedia topic(s) {missing} do not exist in the summaries.")
    return docs, domains


def _decontaminate(docs: list[tuple[str, str]], new: list[Fact]) -> tuple[list[tuple[str, str]], int]:
    """Drop every sentence that names a new fact's subject together with its answer."""
    answers: dict[str, set[str]] = {}
    for f in new:
        answers.setdefault(f.subject, set()).add(f.answer)
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, answers), key=len, reverse=True)) + r")\b")
    out, dropped = [], 0
    for src, text in docs:
        hits = set(pattern.findall(text))
        if not hits:
            out.append((src, text))
            continue
        keep = []
        for sent in _SENT.split(text):
            bad = any(re.search(r"\b" + re.escape(a) + r"\b", sent) for s in hits if s in sent for a in answers[s])
            if bad:
                dropped += 1
            else:
                keep.append(sent)
        if keep:
            out.append((src, " ".join(keep)))
    return out, dropped


def fact_training_lines(known: list[Fact], cfg: DataConfig) -> tuple[list[str], list[str]]:
    """Lines of the known facts that go into pretraining; returns (lines, ids of QA-trained facts)."""
    rng = random.Random(cfg.split_seed + 1)
    ids = [f.id for f in known]
    qa_ids = set(rng.sample(ids, round(len(ids) * cfg.qa_fraction)))
    ctx_ids = set(rng.sample(ids, round(len(ids) * cfg.context_fraction)))
    lines: list[str] = []
    for f in known:
        lines += statement_lines(f)
        qs = question_lines(f)
        if f.id in qa_ids:
            lines += qs
        if f.id in ctx_ids:
            other = rng.choice(known)  # a distractor sentence before or after the relevant one
            ctx = [rng.choice(statement_lines(f)), rng.choice(statement_lines(other))]
            rng.shuffle(ctx)
            lines.append("Context: " + " ".join(ctx) + " " + rng.choice(qs))
    return lines, sorted(qa_ids)


def build_corpus(cfg: DataConfig) -> Corpus:
    facts = geonames_facts(max_cities_per_country=cfg.max_cities_per_country)
    known, new = split_known_new(facts, seed=cfg.split_seed, new_fraction=cfg.new_fraction)
    new_side = new  # every fact of a new-side country: all are kept out of the training text
    new, excluded = drop_overlapping(known, new)
    docs, domains = _general_docs(cfg)
    if not docs:
        raise DataSourceError("the corpus is empty: no text source produced any document.")
    n_before = len(docs)
    docs, dropped = _decontaminate(docs, new_side)
    rng = random.Random(cfg.split_seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_held = max(1, round(len(docs) * cfg.heldout_fraction))
    held_idx = set(order[:n_held])
    train = [docs[i][1] for i in range(len(docs)) if i not in held_idx]
    heldout = [docs[i][1] for i in sorted(held_idx)]
    lines, qa_ids = fact_training_lines(known, cfg)
    # leak check: no probe wording may occur in any training text
    blob_parts = train + lines
    for pre in probe_prefixes():
        if any(pre in t for t in blob_parts):
            raise DataSourceError(f"probe wording {pre!r} occurs in the training text; change the probe templates.")
    by_source: dict[str, dict[str, int]] = {}
    for i, (src, text) in enumerate(docs):
        part = "heldout" if i in held_idx else "train"
        d = by_source.setdefault(src, {"train_docs": 0, "train_chars": 0, "heldout_docs": 0, "heldout_chars": 0})
        d[f"{part}_docs"] += 1
        d[f"{part}_chars"] += len(text)
    info = {
        "sources": by_source,
        "general_docs_before_decontamination": n_before,
        "decontamination_sentences_dropped": dropped,
        "heldout_topics": {t: {"docs": len(v), "chars": sum(len(s["text"]) for s in v)} for t, v in domains.items()},
        "heldout_topic_titles": {t: [s["title"] for s in v] for t, v in domains.items()},
        "facts": {"known": len(known), "new": len(new), "known_with_qa_lines": len(qa_ids),
                  "fact_lines": len(lines), "fact_line_chars": sum(map(len, lines)),
                  "known_countries": sorted({f.country for f in known}),
                  "new_countries": sorted({f.country for f in new}),
                  "excluded_overlapping_subjects": sorted({f.subject for f in excluded}),
                  "excluded_facts": len(excluded)},
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    return Corpus(train=train, heldout=heldout, domains=domains, known=known, new=new,
                  fact_lines=lines, qa_ids=qa_ids, info=info)
