"""Which probe facts a model knows before training: the facts ``retained`` is scored on.

The shipped base (and every model trained from it) carries its list (``facts_known.jsonl``). For any
other model it is found once: every shipped probe fact (the base's known and new facts: all relations,
each fact's own question probe) is asked, and the facts answered correctly, by exact match or, for a
model answering in sentences, by ``contains`` (see ``evaluate.answers``), are the model's known facts.
The result is cached as JSON beside the model (``known_facts.json``), keyed by the checksum of its
weight files and the prompt format, so that the next run on the same weights reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Callable

from torch import nn

from ..data.facts import Fact, read_builtin_facts
from ..files import sha256_file, write_json
from ..models.folder import eval_file, shipped_dir
from ..models.tokenizer import uses_chat
from .answers import contains_match, exact_match, greedy_answers

CACHE = "known_facts.json"
PROBE_FILES = ("facts_known.jsonl", "facts_new.jsonl")


def weights_checksum(model_dir: str | os.PathLike) -> str:
    """sha256 over the folder's weight files (model.safetensors, or the index and every shard)."""
    d = Path(model_dir)
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    else:
        index = d / "model.safetensors.index.json"
        files = [index, *(d / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values())))]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()


def probe_facts(limit: int | None = None) -> list[Fact]:
    """Every shipped probe fact (known and new facts of the shipped base), in file order; ``limit``: a seeded
    sample of that many (for a quick look on a slow machine)."""
    facts = [f for name in PROBE_FILES for f in read_builtin_facts(shipped_dir() / name)]
    if limit and limit < len(facts):
        facts = sorted(random.Random(0).sample(facts, limit), key=facts.index)
    return facts


def known_facts(model: nn.Module, tok, model_dir: str | os.PathLike, log: Callable[[str], None] = print,
                exclude: set[str] | frozenset = frozenset(), probes: int | None = None) -> list[Fact]:
    """The facts ``retained`` is scored on for the model of ``model_dir`` (see the module docstring); for a
    model without its own list, facts whose id is in ``exclude`` (the ones about to be taught) are left out."""
    own = Path(model_dir) / "facts_known.jsonl"
    if own.is_file():
        return read_builtin_facts(own)
    if probes is None and os.environ.get("FORGETLESS_KNOWN_PROBES", "").isdigit():
        probes = int(os.environ["FORGETLESS_KNOWN_PROBES"]) or None  # a seeded sample, for slow machines
    known = _probe_known(model, tok, model_dir, log, probes)
    kept = [f for f in known if f.id not in exclude]
    if len(kept) < len(known):
        log(f"{len(known) - len(kept)} of the {len(known)} known facts are in the fact file to teach and are left out; "
            f"retained is scored on the other {len(kept)}.")
    return kept


def _probe_known(model: nn.Module, tok, model_dir: str | os.PathLike, log: Callable[[str], None],
                 probes: int | None) -> list[Fact]:
    facts = probe_facts(probes)
    by_id = {f.id: f for f in facts}
    key = {"weights_sha256": weights_checksum(model_dir), "chat": uses_chat(tok), "probes": len(facts)}
    cache = Path(model_dir) / CACHE
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if all(saved.get(k) == v for k, v in key.items()):
                known = [by_id[i] for i in saved["fact_ids"] if i in by_id]
                log(f"the model knows {len(known)} of {len(facts)} shipped probe facts (found before; {cache}).")
                return known
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            pass  # a corrupt cache is recomputed
    log(f"finding which of the {len(facts)} shipped probe facts this model knows (once; cached in {cache}) ...")
    preds = greedy_answers(model, tok, [f.question for f in facts])
    known = [f for f, p in zip(facts, preds) if exact_match(p, f.answer) or contains_match(p, f.answer)]
    log(f"the model knows {len(known)} of {len(facts)} shipped probe facts.")
    try:
        write_json(cache, {**key, "rule": "exact match or contains", "known": len(known),
                           "fact_ids": [f.id for f in known]})
    except OSError:
        log(f"(could not write {cache}; the known facts will be found again next time)")
    return known


def new_facts_file(model_dir: str | os.PathLike) -> Path:
    """The default facts to teach: the folder's ``facts_new.jsonl``, else the shipped one."""
    return eval_file(model_dir, "facts_new.jsonl", "the fact benchmark")
