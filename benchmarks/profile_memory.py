"""Where the time of a memory-layer step goes on CPU (torch.profiler), on the shipped base.

    python benchmarks/profile_memory.py [--batch 16] [--seq 256] [--steps 3] [--rows 25]

Two profiles, each over ``--steps`` steps after one warm-up step:

* "pretraining": a full training step of the shipped base (forward in the precision chosen by
  ``forgetless.models.precision``, shifted cross-entropy, backward, AdamW on the dense
  parameters + SparseAdam on the memory values, zero_grad) on random token ids;
* "smf": one sparse-memory-finetuning step on a fact batch of the shipped base (method loss,
  backward, TF-IDF row selection, row-masked SGD), as ``benchmarks/fact_methods.py`` runs it.

Printed: the top ops by self CPU time (torch.profiler's ``key_averages`` table), plus the
``memory.*`` regions' totals (record_function labels around the memory layer's forward).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from forgetless.models.checkpoint import load_memory_stats, load_model
from forgetless.models.memory import freeze_query_stats, memory_layers
from forgetless.models.precision import autocast_dtype, cpu_flags, describe
from forgetless.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "src" / "forgetless" / "assets" / "forgetless-tiny"


def _label_memory(model) -> None:
    """Wrap each memory layer's forward in a record_function region named memory.forward."""
    for mem in memory_layers(model):
        fwd = mem.forward

        def wrapped(x, _fwd=fwd):
            with record_function("memory.forward"):
                return _fwd(x)

        mem.forward = wrapped


def profile_pretraining(args) -> str:
    from forgetless.experiments.pretrain import TrainConfig, lm_loss, make_optimizers

    model = load_model(BASE).train()
    _label_memory(model)
    opts = make_optimizers(model, TrainConfig())
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1),
                          generator=torch.Generator().manual_seed(0))
    dtype = autocast_dtype("cpu")

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = lm_loss(model, batch)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            for o in opts:
                o.step()
            for o in opts:
                o.zero_grad(set_to_none=True)

    return _run(step, args, f"pretraining step, batch {args.batch}x{args.seq}, "
                            f"{'bf16 autocast' if dtype else 'fp32'}, AdamW + SparseAdam")


def profile_smf(args) -> str:
    from forgetless.data.facts import read_builtin_facts
    from forgetless.data.batches import fact_batch
    from forgetless.methods import make_method
    from forgetless.models.tokenizer import load_tokenizer
    from forgetless.training import MethodContext
    model, tok = load_model(BASE), load_tokenizer(BASE)
    ctx = MethodContext(model_dir=BASE, tokenizer=tok, memory_stats=load_memory_stats(BASE))
    freeze_query_stats(model)
    method = make_method("smf", lr=3.0, top_t=500)
    model = method.setup(model, ctx).train()
    _label_memory(model)
    facts = read_builtin_facts(BASE / "facts_new.jsonl")[:8]
    batches = [fact_batch(tok, f, 16, "all", torch.device("cpu")) for f in facts]
    it = iter(range(10**9))

    def step():
        b = batches[next(it) % len(batches)]
        loss = method.loss(model, b)
        with record_function("backward"):
            loss.backward()
        with record_function("smf.after_backward"):
            method.after_backward(model, 0)
        with record_function("optimizer"):
            for o in method.optimizers():
                o.step()
                o.zero_grad(set_to_none=True)

    return _run(step, args, "SMF step, batch 16 statements of one fact, row-masked SGD (top_t 500)")


def _run(step, args, title: str) -> str:
    step()  # warm-up
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    ms = (time.perf_counter() - t0) * 1e3 / args.steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=44)
    return f"\n## {title}: {ms:.0f} ms/step under the profiler ({args.steps} steps)\n\n{table}"


def main() -> None:
    malloc = keep_freed_memory()  # as the forgetless command does: see forgetless.runtime
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=("pretraining", "smf"), default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {describe(cpu_flags())}, "
          f"malloc: {malloc}, load average (1 min) {os.getloadavg()[0]:.2f}")
    if args.only in (None, "pretraining"):
        print(profile_pretraining(args))
    if args.only in (None, "smf"):
        print(profile_smf(args))
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
