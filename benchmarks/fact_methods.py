"""Seconds per step and peak memory of fact-injection methods on the same fact stream.

    python benchmarks/fact_methods.py [--facts 12] [--steps-per-fact 2] [--threads N]

Each method (full fine-tuning, LoRA, sparse memory finetuning) runs in its own subprocess
(so peak resident memory is its own) over the same facts, batch and steps, with no
evaluation in the timed region. Printed per method: median ms per optimizer step (forward,
backward, method hooks, gradient clipping, optimizer; through the one lifecycle), peak RSS, the RSS added by training on top of the
loaded model, trainable parameters per step, and ratios against full fine-tuning measured
in the same run. The machine may be shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from forgetless.runtime import keep_freed_memory

METHODS = {"full": {"lr": 1e-5}, "lora": {"lr": 1e-4, "rank": 32}, "smf": {"lr": 3.0, "top_t": 500}}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(name: str, n_facts: int, steps_per_fact: int, batch: int) -> dict:
    import torch

    from forgetless.data.batches import fact_batch
    from forgetless.data.facts import read_builtin_facts
    from forgetless.methods import Plugin, make_method
    from forgetless.models.folder import default_model_dir, open_model
    from forgetless.training import Experience, MethodContext, fit_experience

    class StepTimer(Plugin):  # wall time from a step's batch to the end of its optimizer step
        name = "step_timer"

        def __init__(self):
            self.times, self._t = [], 0.0

        def before_batch(self, model, batch, step):
            self._t = time.perf_counter()

        def after_step(self, model, step):
            self.times.append(time.perf_counter() - self._t)

    base = default_model_dir()
    model, tok = open_model(base)
    facts = read_builtin_facts(base / "facts_new.jsonl")[:n_facts]
    batches = [fact_batch(tok, f, batch, "all", torch.device("cpu")) for f in facts]
    loaded = rss_mb()
    method = make_method(name, **METHODS[name])
    timer = StepTimer()
    method.plugins.append(timer)
    exp = Experience("facts", lambda s: batches[s // steps_per_fact], n_facts * steps_per_fact)
    fit_experience(method, model, MethodContext.for_folder(base, tok), exp, progress=False)
    times = timer.times
    warm = times[steps_per_fact:] or times  # the first fact's steps warm up allocators
    return {"method": name, "ms_per_step": 1000 * statistics.median(warm), "peak_rss_mb": rss_mb(),
            "train_rss_mb": rss_mb() - loaded, "trainable_params_per_step": method.trainable_params_per_step(),
            "steps": len(times)}


def main() -> None:
    malloc = keep_freed_memory()  # as the forgetless command does: see forgetless.runtime
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=12)
    ap.add_argument("--steps-per-fact", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.facts, args.steps_per_fact, args.batch)))
        return
    import torch
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, load average before "
          f"{os.getloadavg()[0]:.2f}; {args.facts} facts x {args.steps_per_fact} steps, batch {args.batch}")
    from forgetless.models.native import kernel_status
    from forgetless.models.precision import autocast_dtype, describe
    prec = "bf16 autocast" if autocast_dtype("cpu") is not None else "fp32"
    print(f"{describe()}; fact steps run in {prec} (fit_experience's choice; FORGETLESS_PRECISION overrides); "
          f"malloc: {malloc}; compiled memory kernels: {kernel_status()}")
    rows = []
    for name in METHODS:
        cmd = [sys.executable, __file__, "--one", name, "--facts", str(args.facts), "--steps-per-fact",
               str(args.steps_per_fact), "--batch", str(args.batch)] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    full = rows[0]
    print("| method | ms/step | vs full | peak RSS MB | training RSS MB | vs full | trainable params/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ms_per_step']:.0f} | {r['ms_per_step'] / full['ms_per_step']:.2f}x | "
              f"{r['peak_rss_mb']:.0f} | {r['train_rss_mb']:.0f} | {r['train_rss_mb'] / max(full['train_rss_mb'], 1):.2f}x | "
              f"{r['trainable_params_per_step']:,} |")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
