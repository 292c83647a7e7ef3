"""`forgetless learn`: teach the facts of a file to one model with one method, and save it.

This is the fact stream of ``forgetless run`` (one experience holding the given facts, in
order, ``steps_per_fact`` optimizer steps per fact on a batch of N differently-worded
statements of it, Lin et al. 2025) run through the same sequential pipeline
(``runner.learn_stream``) and scored by the same evaluator (``evaluate.facts.FactEvaluator``)
as ``bench facts`` and ``forgetless run``; the record is the typed ``results.FactRecord``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from torch import nn

from ..data.facts import Fact
from ..errors import DataSourceError
from ..evaluate.facts import FactEvaluator, FactScores, statement_prompt
from ..methods import Method
from ..models.checkpoint import load_memory_stats, save_model
from ..models.folder import CARRY_FILES
from ..training.lifecycle import MethodContext
from .results import FactRecord
from .runner import learn_stream, method_result, new_record
from .streams import StreamConfig, facts_to_stream

__all__ = ["FactEvaluator", "FactRecord", "FactScores", "StreamConfig", "learn_facts", "save_learned",
           "statement_prompt"]


def learn_facts(model: nn.Module, tok, facts: list[Fact], method: Method, evaluator: FactEvaluator,
                cfg: StreamConfig, context: MethodContext, progress: bool = True,
                log: Callable[[str], None] = print, base: FactScores | None = None) -> tuple[nn.Module, FactRecord]:
    """Teach ``facts`` in order with ``method``: a one-experience fact stream through the run
    pipeline. Returns the exported model (e.g. LoRA merged) and its fact record. ``base`` (the
    model's scores before teaching, if already known) saves re-evaluating the unchanged model."""
    if not facts:
        raise DataSourceError("there are no facts to teach.")
    stream = facts_to_stream(tok, [list(facts)], cfg, evaluator, cfg.seed)
    base = stream.facts.set_base(model, base)  # also freezes the memory's query statistics
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
