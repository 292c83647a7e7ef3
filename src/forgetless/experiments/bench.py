"""`forgetless bench facts`: full fine-tuning vs LoRA vs sparse memory finetuning on one fact stream.

Every method runs over a small learning-rate sweep (LoRA also over ranks) on the *same*
stream of new facts, from the same base; each run is evaluated the same way (see learn.py).
Writes ``results.json``, ``runs.csv`` and ``report.html`` (frontier + curves) to the output folder.
"""

from __future__ import annotations

import os
import platform
import random
import time
from pathlib import Path
from typing import Callable

import torch

from ..config import to_dict
from ..data.factfile import load_fact_file
from ..data.facts import load_known_facts
from ..errors import ConfigError
from ..methods import METHODS, default_options, make_method
from ..models.checkpoint import write_json
from ..models.folder import load_heldout_ids, open_model
from ..report.html import write_csv, write_facts_report
from ..training.lifecycle import MethodContext
from .facts import FactEvaluator, StreamConfig, evaluate_before, learn_facts

# Learning-rate sweeps (not defaults: a single run takes the method's Options default), calibrated on
# forgetless-tiny (see README): each sweep reaches well above the base's learned score.
LR_SWEEPS: dict[str, list[float]] = {
    "full": [5e-6, 1e-5, 3e-5],
    "lora": [3e-5, 1e-4, 3e-4],
    "smf": [1.0, 3.0, 10.0],
    "smf-tf": [3.0],
    "smf-all": [3.0],
    "eaft": [5e-6, 1e-5, 3e-5],
}
DEFAULT_LORA_RANKS = [8, 32]
ALIASES = {"smf-tf": ("smf", {"ranking": "tf"}), "smf-all": ("smf", {"ranking": "all"})}


def default_lr(method: str) -> float:
    """The learning rate of one run of a bench method (an alias: its method's): the Options default."""
    return default_options(ALIASES.get(method, (method,))[0]).lr


def quick_lrs(methods: list[str]) -> dict[str, list[float]]:
    """``--quick``: one run per method, at its default learning rate."""
    return {m: [default_lr(m)] for m in methods}


def parse_lrs(spec: list[str] | None, methods: list[str]) -> dict[str, list[float]]:
    """``["1e-5,3e-5"]`` (every method) or ``["full=1e-5,3e-5", "smf=10,30"]`` (per method); a
    method without a sweep runs once at its default learning rate."""
    for m in methods:
        if ALIASES.get(m, (m,))[0] not in METHODS:
            raise ConfigError(f"unknown method {m!r} in --methods; choose from {', '.join([*METHODS, *ALIASES])}.")
    lrs = {m: list(LR_SWEEPS.get(m, [default_lr(m)])) for m in methods}
    for item in spec or []:
        name, _, values = item.rpartition("=")
        try:
            vals = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise ConfigError(f"--lrs {item!r}: learning rates must be numbers.") from None
        for m in ([name] if name else methods):
            if m not in lrs:
                raise ConfigError(f"--lrs names method {m!r}, which is not in --methods {methods}.")
            lrs[m] = vals
    return lrs


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": "cpu", "load_average": os.getloadavg()[0]}


def bench_facts(model_dir: Path, out_dir: Path, methods: list[str], n_facts: int = 100,
                lrs: dict[str, list[float]] | None = None, lora_ranks: list[int] | None = None,
                stream: StreamConfig | None = None, top_t: int = 500, smf_background: str = "mix",
                facts_file: Path | None = None,
                command: str = "", log: Callable[[str], None] = print, progress: bool = False) -> dict:
    stream = stream or StreamConfig()
    lrs = lrs or parse_lrs(None, methods)
    lora_ranks = lora_ranks or DEFAULT_LORA_RANKS
    facts = load_fact_file(facts_file or model_dir / "facts_new.jsonl")
    random.Random(stream.seed).shuffle(facts)
    facts = facts[:n_facts]
    model, tok = open_model(model_dir)
    known = load_known_facts(model_dir)
    heldout = load_heldout_ids(model_dir, tok, 4 * stream.heldout_tokens)
    evaluator = FactEvaluator(tok, known, heldout, stream)
    results: dict = {
        "title": "Fact injection: learning vs forgetting", "command": command, "machine": _machine(),
        "model": str(model_dir),
        "stream": {"n_facts": len(facts), **to_dict(stream), "fact_ids": [f.id for f in facts],
                   "facts_file": str(facts_file or model_dir / "facts_new.jsonl")},
        "runs": [],
    }
    grid: list[tuple[str, str, float, dict]] = []
    for m in methods:
        base_name, extra = ALIASES.get(m, (m, {}))
        for lr in lrs[m]:
            if base_name == "lora":
                grid += [(m, base_name, lr, {"rank": r}) for r in lora_ranks]
            elif base_name == "smf":
                bg = {} if smf_background == "mix" else {"background": smf_background}
                grid.append((m, base_name, lr, {"top_t": top_t, **bg, **extra}))
            else:
                grid.append((m, base_name, lr, dict(extra)))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = evaluate_before(model, facts, evaluator)
    results["base"] = {"learned": base.learned, "learned_f1": base.learned_f1, "statement_acc": base.statement_acc,
                       "retained": base.retained, "heldout_nll": base.heldout_nll}
    log(f"base: learned {base.learned:.1%} of {len(facts)} facts, retained {base.retained:.1%}, "
        f"held-out NLL {base.heldout_nll:.3f}")
    for i, (label_method, name, lr, hp) in enumerate(grid):
        model, tok = open_model(model_dir)
        ctx = MethodContext.for_folder(model_dir, tok)
        method = make_method(name, lr=lr, **hp)
        _, res = learn_facts(model, tok, facts, method, evaluator, stream, ctx, progress=progress,
                             log=lambda s: None, base=base)
        row = {"method": label_method, "lr": lr, "hparams": hp, **res.summary()}
        row["label"] = f"{label_method} lr={lr:g}" + "".join(f" {k}={v}" for k, v in hp.items()
                                                               if k not in ("ranking",))
        results["runs"].append(row)
        log(f"[{i + 1}/{len(grid)} {time.time() - t0:.0f}s] {row['label']}: learned {row['learned']:.1%}, "
            f"retained {row['retained']:.1%} (drop {row['retained_drop']:.1%}), held-out NLL "
            f"{row['heldout_nll_delta']:+.3f}, {row['seconds_per_step'] * 1000:.0f} ms/step")
        write_json(out_dir / "results.json", results)
    results["seconds"] = time.time() - t0
    write_json(out_dir / "results.json", results)
    write_csv(results, out_dir / "runs.csv")
    write_facts_report(results, out_dir)
    return results


def format_table(results: dict) -> str:
    b = results["base"]
    lines = [f"base: learned {b['learned']:.1%}, retained {b['retained']:.1%}, held-out NLL {b['heldout_nll']:.3f}",
             "| run | learned | statement acc | retained | retained drop | held-out NLL delta | trainable params/step | ms/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['label']} | {r['learned']:.1%} | {r['statement_acc']:.1%} | {r['retained']:.1%} | "
                     f"{r['retained_drop']:.1%} | {r['heldout_nll_delta']:+.3f} | {r['trainable_params_per_step']:,} | "
                     f"{r['seconds_per_step'] * 1000:.0f} |")
    lines += ["", "EasyEdit's measures (reliability: training question; generalization: unseen probe; "
              "locality: retained known facts; portability: two-hop continent question)",
              "| run | reliability | generalization | locality | portability |", "|---|---|---|---|---|"]
    first = results["runs"][0]["easyedit"]["base"] if results["runs"] else None
    rows = ([("base", first)] if first else []) + [(r["label"], r["easyedit"]) for r in results["runs"]]
    for label, e in rows:
        lines.append(f"| {label} | {e['reliability']:.1%} | {e['generalization']:.1%} | {e['locality']:.1%} | "
                     f"{e['portability']:.1%} |")
    return "\n".join(lines)
