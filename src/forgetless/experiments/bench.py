"""`forgetless bench facts`: full fine-tuning vs LoRA vs sparse memory finetuning on one fact stream.

A bench is a run: a facts stream of one experience holding the N facts and a method grid (every
method over a small learning-rate sweep, LoRA also over ranks) as labelled method entries, run
by ``runner.run_experiment``. So it resumes, and writes the run's ``results.json`` schema
(``results.RunResult``, with the fact scores of every entry), ``metrics.csv``, the run report
``report.html`` (with the learned-vs-retained frontier) and ``runs.csv`` (one row per entry).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..config import to_dict
from ..data.factfile import load_fact_file
from ..errors import ConfigError
from ..files import MARKER, FolderLock
from ..methods import METHODS, default_options
from ..models.checkpoint import write_json
from ..models.folder import eval_file
from ..report.html import write_csv
from ..report.runs import fact_runs
from .runner import ExperimentConfig, RunConfig, _changes, config_hash, run_experiment
from .streams import StreamConfig

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
ALIASES = {"smf-tf": ("smf", {"ranking": "tf"}), "smf-all": ("smf", {"ranking": "all"}),
           "ewc-base": ("ewc", {"anchor": "base"})}  # EWC anchored at the base (Fisher on background text)


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
        if m in NEEDS_EXPERIENCES:
            raise ConfigError(f"--methods {m}: {NEEDS_EXPERIENCES[m]}; use `forgetless run` with a facts stream.")
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


def _machine(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": device, "load_average": os.getloadavg()[0],
            **({"device_name": torch.cuda.get_device_name(torch.device(device))} if device.startswith("cuda") else {})}


# methods whose point is several experiences: on the one experience of a bench they are not comparable
NEEDS_EXPERIENCES = {"joint": "joint training is the upper bound of a stream of several experiences"}


def bench_grid(methods: list[str], lrs: dict[str, list[float]], lora_ranks: list[int], top_t: int = 500,
               smf_background: str = "mix", smf_options: dict | None = None) -> list[dict]:
    """The method grid as labelled method entries of a run config (``label`` as the old bench named them)."""
    grid: list[dict] = []
    for m in methods:
        if m in NEEDS_EXPERIENCES:
            raise ConfigError(f"--methods {m}: {NEEDS_EXPERIENCES[m]}; use `forgetless run` with a facts stream.")
        base_name, extra = ALIASES.get(m, (m, {}))
        for lr in lrs[m]:
            if base_name == "lora":
                opts = [{"rank": r} for r in lora_ranks]
            elif base_name == "smf":
                opts = [{"top_t": top_t, **({} if smf_background == "mix" else {"background": smf_background}),
                         **(smf_options or {}), **extra}]
            else:
                opts = [dict(extra)]
            for hp in opts:
                label = f"{m} lr={lr:g}" + "".join(f" {k}={v}" for k, v in hp.items() if k != "ranking")
                grid.append({"name": base_name, "label": label, "lr": lr, **hp})
    return grid


def bench_facts(model_dir: Path, out_dir: Path, methods: list[str], n_facts: int = 100,
                lrs: dict[str, list[float]] | None = None, lora_ranks: list[int] | None = None,
                stream: StreamConfig | None = None, top_t: int = 500, smf_background: str = "mix",
                facts_file: Path | None = None, smf_options: dict | None = None,
                command: str = "", log: Callable[[str], None] = print, progress: bool = False,
                device: str = "cpu") -> dict:
    """Run the grid on one stream of ``n_facts`` facts (the first of the file shuffled by
    ``stream.seed``); returns the run's results dict (``results.RunResult.to_dict``)."""
    stream = replace(stream or StreamConfig(retained_sample=200, eval_every=100), kind="facts")
    lrs = lrs or parse_lrs(None, methods)
    grid = bench_grid(methods, lrs, lora_ranks or DEFAULT_LORA_RANKS, top_t, smf_background, smf_options)
    path = Path(facts_file or stream.facts_file or eval_file(model_dir, "facts_new.jsonl", "the fact benchmark"))
    stream.facts_file, stream.experiences = str(path), 1
    stream.facts_per_experience = min(n_facts, len(load_fact_file(path)))
    exp = ExperimentConfig(name="bench-facts", stream=stream, methods=grid)
    t0 = time.time()
    done = [0]

    def show(line: str) -> None:  # one line per finished grid entry (the runner's fact summary)
        if ": learned " in line:
            done[0] += 1
            log(f"[{done[0]}/{len(grid)} {time.time() - t0:.0f}s] {line}")

    out_dir = Path(out_dir)
    cfg = RunConfig(name="bench-facts", seed=stream.seed, model=str(model_dir), experiments=[exp])
    with FolderLock(out_dir, "forgetless bench facts"):
        marker = out_dir / MARKER
        saved = json.loads(marker.read_text()) if marker.is_file() else {}
        if saved.get("config_hash") not in (None, config_hash(cfg)):
            changed = _changes(saved.get("config") or {}, to_dict(cfg))
            raise ConfigError(f"{out_dir} holds a bench of other settings ({'; '.join(changed[:3]) or 'changed'}); "
                              f"choose another --out (a rerun with the same settings resumes).")
        write_json(marker, {"kind": "bench", "config_hash": config_hash(cfg), "config": to_dict(cfg)})
        results = run_experiment(exp, Path(model_dir), stream.seed, out_dir, progress, show, command, _machine(device),
                                 device=device)
    write_csv(fact_runs(results), Path(out_dir) / "runs.csv")
    return results


def format_table(results: dict) -> str:
    view = fact_runs(results)
    b = view["base"]
    lines = [f"base: learned {b['learned']:.1%}, retained {b['retained']:.1%}, held-out NLL {b['heldout_nll']:.3f}",
             "| run | learned | statement acc | retained | retained drop | held-out NLL delta | trainable params/step | ms/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in view["runs"]:
        lines.append(f"| {r['label']} | {r['learned']:.1%} | {r['statement_acc']:.1%} | {r['retained']:.1%} | "
                     f"{r['retained_drop']:.1%} | {r['heldout_nll_delta']:+.3f} | {r['trainable_params_per_step']:,} | "
                     f"{r['seconds_per_step'] * 1000:.0f} |")
    lines += ["", "EasyEdit's measures (reliability: training question; generalization: unseen probe; "
              "locality: retained known facts; portability: two-hop continent question)",
              "| run | reliability | generalization | locality | portability |", "|---|---|---|---|---|"]
    for label, e in [("base", b)] + [(r["label"], r) for r in view["runs"]]:
        cells = [e.get(k) or 0.0 for k in ("reliability", "learned", "retained", "portability")]
        lines.append("| " + label + " | " + " | ".join(f"{c:.1%}" for c in cells) + " |")
    rows = [("base", b)] + [(r["label"], r) for r in view["runs"]]
    if any((e.get("learned_contains") or 0.0) != (e.get("learned") or 0.0) or
           (e.get("retained_contains") or 0.0) != (e.get("retained") or 0.0) for _, e in rows):
        lines += ["", "Contains (the gold answer stated in the answer's first sentence; chat models answer in sentences)",
                  "| run | learned (contains) | retained (contains) |", "|---|---|---|"]
        for label, e in rows:
            lines.append(f"| {label} | {e.get('learned_contains') or 0.0:.1%} | {e.get('retained_contains') or 0.0:.1%} |")
    return "\n".join(lines)
