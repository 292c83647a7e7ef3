"""`forgetless learn`: teach the facts of a file to one model with one method, and save it.

This is the fact stream of ``forgetless run`` (one experience holding the given facts, in
order, ``steps_per_fact`` optimizer steps per fact on a batch of N differently-worded
statements of it, Lin et al. 2025) run through the same sequential pipeline
(``runner.learn_stream``) and scored by the same evaluator (``evaluate.facts.FactEvaluator``)
as ``bench facts`` and ``forgetless run``; the record is the typed ``results.FactRecord``.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from ..data.facts import Fact
from ..errors import DataSourceError
from ..evaluate.facts import FactEvaluator, FactScores, statement_prompt
from ..methods import Method, make_method
from ..models.checkpoint import load_memory_stats, save_model
from ..models.folder import CARRY_FILES
from ..training.lifecycle import MethodContext
from .results import FactRecord
from .runner import learn_stream, method_result, new_record
from .streams import StreamConfig, facts_to_stream

__all__ = ["SMF_LEVERS", "FactEvaluator", "FactRecord", "FactScores", "LeverTrial", "StreamConfig", "choose_levers",
           "learn_facts", "pick_lever", "save_learned", "statement_prompt"]

# Settings of sparse memory finetuning that `learn --choose-levers` tries (docs/smf.md): the defaults,
# which suit relations the base has read about, and more rows with less protection, which a relation
# the base never saw needs (measured on its validation facts: 0% learned at 500 rows, 20-25% at 2,000-8,000).
SMF_LEVERS: tuple[dict, ...] = (
    {"top_t": 500, "protect": 0.9},
    {"top_t": 2000, "protect": 0.7},
    {"top_t": 8000, "protect": 0.7},
    {"top_t": 8000, "protect": 0.5},
)


@dataclass
class LeverTrial:
    """One setting tried on the choice facts: its options and what it did to them."""

    options: dict
    learned: float
    retained_drop: float


def pick_lever(trials: list[LeverTrial], max_drop: float) -> LeverTrial | None:
    """The trial that learned the most with a retained drop of at most ``max_drop`` (ties: the
    smaller drop, then the earlier trial); None when every trial forgot more."""
    ok = [(i, t) for i, t in enumerate(trials) if t.retained_drop <= max_drop]
    if not ok:
        return None
    return min(ok, key=lambda it: (-it[1].learned, it[1].retained_drop, it[0]))[1]


def choose_levers(model: nn.Module, tok, facts: list[Fact], method: str, options: dict, evaluator: FactEvaluator,
                  cfg: StreamConfig, context: MethodContext, n_facts: int = 20, max_drop: float = 0.25,
                  grid: tuple[dict, ...] = SMF_LEVERS,
                  log: Callable[[str], None] = print) -> tuple[dict, list[LeverTrial]]:
    """Choose a method's settings on the user's own facts: teach a seeded sample of ``n_facts`` of
    them to a copy of ``model`` once per setting of ``grid`` (merged over ``options``), score each
    on those facts' held-out questions and the evaluator's known facts, and return the options of
    ``pick_lever`` (``options`` unchanged when no setting keeps the drop within ``max_drop``) with
    every trial. ``model`` itself is not changed."""
    if not facts:
        raise DataSourceError("there are no facts to choose settings on.")
    chosen = random.Random(cfg.seed + 29).sample(list(facts), min(n_facts, len(facts)))
    trials: list[LeverTrial] = []
    base = base_curve = None  # the unchanged model's scores: taken by the first trial, reused by the others
    for i, lever in enumerate(grid, 1):
        trial_model = copy.deepcopy(model)
        _, rec = learn_facts(trial_model, tok, chosen, make_method(method, **{**options, **lever}), evaluator, cfg,
                             context, progress=False, log=lambda _: None, base=base, base_curve=base_curve)
        base, base_curve = rec.base, rec.curve[0]
        trials.append(LeverTrial(dict(lever), rec.final.learned, rec.retained_drop))
        log(f"levers {i}/{len(grid)} {' '.join(f'{k}={v}' for k, v in lever.items())}: learned "
            f"{rec.final.learned:.1%} of {len(chosen)}, retained drop {rec.retained_drop:.1%}")
        del trial_model
    best = pick_lever(trials, max_drop)
    return ({**options, **best.options} if best else dict(options)), trials


def learn_facts(model: nn.Module, tok, facts: list[Fact], method: Method, evaluator: FactEvaluator,
                cfg: StreamConfig, context: MethodContext, progress: bool = True,
                log: Callable[[str], None] = print, base: FactScores | None = None,
                base_curve: FactScores | None = None) -> tuple[nn.Module, FactRecord]:
    """Teach ``facts`` in order with ``method``: a one-experience fact stream through the run
    pipeline. Returns the exported model (e.g. LoRA merged) and its fact record. ``base`` and
    ``base_curve`` (the model's scores before teaching and its curve's first point, ``record.base``
    and ``record.curve[0]`` of an earlier call with the same facts and evaluator) save re-evaluating
    the unchanged model."""
    if not facts:
        raise DataSourceError("there are no facts to teach.")
    stream = facts_to_stream(tok, [list(facts)], cfg, evaluator, cfg.seed)
    base = stream.facts.set_base(model, base, base_curve)  # also freezes the memory's query statistics
    log(f"before: learned {base.learned:.1%} (of {len(facts)} facts), retained {base.retained:.1%}, "
        f"held-out NLL {base.heldout_nll:.3f}")
    rec = new_record(model, stream, None)
    rec["facts_base"] = asdict(base)
    rec["facts_curve"] = [{**asdict(stream.facts.base_curve(None)), "step": 0}]
    model = learn_stream(stream, model, context, method, rec, method.name, progress, lambda s: None)
    record = method_result(rec, {"method": method.name}).facts
    f = record.final
    log(f"after {len(facts)} facts: learned {f.learned:.1%}, retained {f.retained:.1%}, "
        f"held-out NLL {f.heldout_nll:.3f}")
    return model, record


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
