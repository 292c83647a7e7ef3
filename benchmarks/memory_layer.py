"""Benchmark of the product-key memory layer on CPU: lookup cost and training throughput.

Run:  python benchmarks/memory_layer.py [--quick] [--threads N] [--json out.json]
      FORGETLESS_NATIVE=0 python benchmarks/memory_layer.py    # the PyTorch path, without the compiled kernels
      python benchmarks/memory_layer.py --device cuda --batch 64   # on a GPU, at the pretraining batch

Table 1, "product-key lookup vs exhaustive scoring": for N = 2^16, 2^18, 2^20 slots
(n_keys = 256, 512, 1024; 4 heads, knn 32, k_dim 128, layernorm queries, eval mode, no grad)
it times ``ProductKeyMemory.lookup`` on a fixed batch of query vectors (width 256), and an
exhaustive lookup that projects the same queries, scores them against all N full keys
(full key of slot i1*n_keys+i2 = [sub-key i1 of half 1, sub-key i2 of half 2], built once,
untimed) with a matmul and takes the top-k per head. Exhaustive scoring grows like N and is
slow on CPU, so it is timed on the first ``--ex-queries`` queries of the batch and scaled
linearly (it is chunked over queries, so its cost is linear in them) to the full batch.
Both columns are ms per batch (median of the repetitions after a warm-up); ``ratio`` is
exhaustive / product-key: how much the product-key factorisation saves. Agreement columns:
``rank=`` fraction of (query, head, rank) where both give the same slot, ``set=`` fraction
of the product-key slots also in the exhaustive top-k (the matmul rounds differently from
s1[i1]+s2[i2], so near-ties can swap), ``sum=`` the same rank match against an exhaustive
top-k of s1[i1]+s2[i2] sums on a few queries (identical rounding: should be 1.000).

Table 2, "training throughput": the tiny base of configs/forgetless-tiny.yaml (vocab 8192)
once with its memory layer and once with ``memory.layers = []`` (dense LlamaMLP everywhere),
full training steps (forward in the precision of ``--precision``, by default bf16 autocast
only where the CPU computes bf16 natively, ``lm_loss``, backward, the optimizers of
``make_optimizers``: SparseAdam on memory values + AdamW, zero_grad) on random token ids.
tokens/s use the median of ``--steps`` timed steps after 2 warm-up steps (the two
models' steps are interleaved so both see the same machine load), "page faults/step" the median
of the minor page faults of the process during each of them (``FORGETLESS_MALLOC=system`` shows
the faults that ``forgetless.runtime.keep_freed_memory`` removes); ``ratio`` is memory / dense
(< 1 means the memory layer is slower than the dense MLP it replaces).

"Compute": the FLOPs of one training step of each model as ``torch.utils.flop_counter`` counts
them (matmuls and attention, forward and backward; not the lookup's selection or gathers, nor
the optimizer), divided by its median step time, against the rate of one large square matmul in
the same precision measured in the same run, and against ``--peak-tflops`` or, on a known GPU
(H100, H200, A100), its datasheet dense bf16 peak: the "share of the bf16 peak reached".

The machine may be shared: the header shows the 1-minute load average before and after;
when it exceeds the thread count the numbers are noisy and a warning is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from forgetless.experiments.pretrain import (
    lm_loss,
    load_pretrain_config,
    make_optimizers,
)
from forgetless.models.base import build_base
from forgetless.models.memory import MemoryConfig, ProductKeyMemory
from forgetless.models.native import kernel_status
from forgetless.models.precision import autocast_dtype, describe
from forgetless.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps: int, warmup: int = 1, device: torch.device = torch.device("cpu")) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity), by a
# substring of torch.cuda.get_device_name(); --peak-tflops overrides, other GPUs get none.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]


def datasheet_peak(device: torch.device) -> tuple[str, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return f"{name} datasheet", peak
    return None


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """What this device computes with one large square matmul in ``dtype`` (TFLOP/s, median of 5):
    the reachable matmul rate that the training figures are compared with."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = timed(lambda: a @ b, 5, warmup=2, device=device)
    return 2 * n**3 / (ms / 1e3) / 1e12


def step_flops(step) -> int:
    """Floating-point operations of one training step (forward + backward) as torch counts them
    (matmuls, attention, convolutions; not the lookup's top-k, gathers or the optimizer)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def table(title: str, cols: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(cols)]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([f"\n{title}\n", fmt(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(fmt, cells)])


# ------------------------------------------------------------------------ lookup
@torch.no_grad()
def exhaustive_topk(mem: ProductKeyMemory, x: torch.Tensor, full_keys: torch.Tensor, chunk: int):
    """Project x, score against all full keys (H, N, k_dim) with a matmul, top-k per head."""
    cfg = mem.config
    q = mem._queries(x.float()).reshape(x.shape[0], cfg.heads, cfg.k_dim)
    out_s, out_i = [], []
    for s in range(0, q.shape[0], chunk):
        scores = torch.einsum("chd,hnd->chn", q[s:s + chunk], full_keys)  # (c, H, N)
        v, i = scores.topk(cfg.knn, dim=-1)
        out_s.append(v)
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)


@torch.no_grad()
def bench_lookup(n_keys: int, args) -> dict:
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=n_keys, heads=4, knn=32, k_dim=128, query_norm="layernorm")
    mem = ProductKeyMemory(256, 256, cfg).eval().to(args.device)
    x = torch.randn(args.queries, 256, generator=torch.Generator().manual_seed(1)).to(args.device)
    xe = x[: args.ex_queries]
    keys = mem.sub_keys.float()  # (H, 2, n_keys, half)
    full = torch.cat([keys[:, 0].repeat_interleave(n_keys, dim=1), keys[:, 1].repeat(1, n_keys, 1)], dim=-1)
    chunk = max(1, (1 << 26) // (cfg.heads * cfg.n_slots))  # <= 64M fp32 scores (256 MB) at a time
    pk_ms = timed(lambda: mem.lookup(x), args.reps, device=args.device)
    exhaustive_topk(mem, xe[:chunk], full, chunk)  # warm-up on one chunk: the full pass is slow
    ex_ms = timed(lambda: exhaustive_topk(mem, xe, full, chunk), args.ex_reps, warmup=0, device=args.device)
    ex_ms *= args.queries / xe.shape[0]
    _, pk_i = mem.lookup(xe)
    _, ex_i = exhaustive_topk(mem, xe, full, chunk)
    rank = (pk_i == ex_i).float().mean().item()
    overlap = (pk_i[..., :, None] == ex_i[..., None, :]).any(-1).float().mean().item()
    # exhaustive top-k of s1[i1] + s2[i2]: the same float sums as the product-key candidates
    q = mem._queries(xe[:16].float())
    s1 = torch.einsum("nhd,hkd->nhk", q[:, :, 0], keys[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[:, :, 1], keys[:, 1])
    sum_i = (s1[..., :, None] + s2[..., None, :]).flatten(-2).topk(cfg.knn, dim=-1).indices
    exact = (pk_i[:16] == sum_i).float().mean().item()
    return {"slots": cfg.n_slots, "n_keys": n_keys, "queries": args.queries, "exhaustive_queries_timed": xe.shape[0],
            "product_key_ms": pk_ms, "exhaustive_ms": ex_ms, "ratio": ex_ms / pk_ms,
            "agree_rank": rank, "agree_set": overlap, "agree_sum_exact": exact}


# ---------------------------------------------------------------------- training
def bench_training(args) -> list[dict]:
    cfg = load_pretrain_config(ROOT / "configs" / "forgetless-tiny.yaml")
    cfg.train.batch_size, cfg.train.seq_len = args.batch, args.seq
    batch = torch.randint(0, 8192, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(2))
    batch = batch.to(args.device)
    tokens = args.batch * args.seq
    runs = []
    for name, section in (("memory", cfg.memory), ("dense", dataclasses.replace(cfg.memory, layers=[]))):
        torch.manual_seed(cfg.seed)
        model = build_base(cfg.model, section, vocab_size=8192, eos_id=0, pad_id=1).train().to(args.device)
        runs.append((name, section, model, make_optimizers(model, cfg.train), [], []))

    def forward_backward(model):
        with torch.autocast(device_type=args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = lm_loss(model, batch)
        loss.backward()

    def step(model, opts):
        forward_backward(model)
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)

    for i in range(2 + args.steps):  # interleaved, so that both models see the same machine load
        for _, _, model, opts, times, faults in runs:
            sync(args.device)
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            step(model, opts)
            sync(args.device)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    rows = []
    for name, section, model, opts, times, faults in runs:
        ms = statistics.median(times)
        flops = step_flops(lambda: forward_backward(model))  # untimed; its gradients are dropped
        model.zero_grad(set_to_none=True)
        rows.append({"model": name, "memory_layers": list(section.layers),
                     "parameters": sum(p.numel() for p in model.parameters()), "step_ms": ms,
                     "page_faults_per_step": statistics.median(faults), "flops_per_step": flops,
                     "tflops": flops / (ms / 1e3) / 1e12,
                     "tokens_per_s": tokens / ms * 1e3, "optimizers": [type(o).__name__ for o in opts]})
    rows[0]["ratio_vs_dense"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows


def main() -> None:
    malloc = keep_freed_memory()  # as the forgetless command does: see forgetless.runtime
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="smoke run: N = 2^16, 2^18 only, fewer reps and steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--queries", type=int, default=2048, help="query batch of the lookup table")
    ap.add_argument("--ex-queries", type=int, default=256, help="queries the exhaustive scoring is timed on")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of the product-key lookup")
    ap.add_argument("--ex-reps", type=int, default=3, help="timed repetitions of the exhaustive lookup")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per model")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                    help="training precision (default: FORGETLESS_PRECISION, else auto: bf16 autocast only on a "
                         "CPU with native bf16, see forgetless.models.precision)")
    ap.add_argument("--no-bf16", action="store_true", help="same as --precision fp32")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where both tables run")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's bf16 (or fp32) peak in TFLOP/s, for the share of peak reached (default: the "
                         "datasheet value of a known GPU; none on CPU, where the measured matmul rate is shown)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device must be cpu or cuda[:N], got {args.device!r}.")
    if args.device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:N], got {args.device}.")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch build or machine has no CUDA device.")
    if args.quick:
        args.ex_queries, args.reps, args.ex_reps, args.steps = min(args.ex_queries, 128), 3, 2, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    args.ex_queries = min(args.ex_queries, args.queries)
    args.bf16 = autocast_dtype(args.device, "fp32" if args.no_bf16 else args.precision) is not None
    threads = torch.get_num_threads()
    load0 = os.getloadavg()[0]
    gpu = f", GPU: {torch.cuda.get_device_name(args.device)}" if args.device.type == "cuda" else ""
    print(f"torch {torch.__version__}, {threads} threads, CPU: {cpu_model()} ({os.cpu_count()} cores){gpu}, "
          f"load average (1 min) before: {load0:.2f}")
    kernels = kernel_status() if args.device.type == "cpu" else "not used on GPUs (the PyTorch path)"
    print(f"{describe()}; device {args.device}; training runs in {'bf16 autocast' if args.bf16 else 'fp32'}; "
          f"malloc: {malloc}; compiled memory kernels: {kernels}")

    t0 = time.time()
    lookup = [bench_lookup(n, args) for n in ((256, 512) if args.quick else (256, 512, 1024))]
    print(table(f"Product-key lookup vs exhaustive scoring (4 heads, knn 32, k_dim 128, {args.queries} queries; "
                f"exhaustive timed on {args.ex_queries} queries and scaled to the batch)",
                ["slots N", "n_keys", "product-key ms", "exhaustive ms", "ratio", "agreement rank/set/sum"],
                [[f"2^{r['slots'].bit_length() - 1} = {r['slots']:,}", r["n_keys"], f"{r['product_key_ms']:.1f}",
                  f"{r['exhaustive_ms']:.1f}", f"{r['ratio']:.1f}x",
                  f"{r['agree_rank']:.3f} / {r['agree_set']:.3f} / {r['agree_sum_exact']:.3f}"] for r in lookup]))
    train = bench_training(args)
    print(table(f"Training throughput, forgetless-tiny, batch {args.batch}x{args.seq}, "
                f"{'bf16 autocast' if args.bf16 else 'fp32'}, median of {args.steps} steps",
                ["model", "memory layers", "parameters", "ms/step", "tokens/s", "page faults/step", "optimizers"],
                [[r["model"], r["memory_layers"], f"{r['parameters']:,}", f"{r['step_ms']:.0f}",
                  f"{r['tokens_per_s']:,.0f}", f"{r['page_faults_per_step']:,.0f}", "+".join(r["optimizers"])]
                 for r in train]))
    print(f"memory / dense throughput: {train[0]['ratio_vs_dense']:.2f}")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    reach = matmul_tflops(args.device, dtype)
    peak = (f"--peak-tflops", args.peak_tflops) if args.peak_tflops else datasheet_peak(args.device)
    prec = "bf16" if args.bf16 else "fp32"
    print(f"\nCompute (FLOPs counted by torch.utils.flop_counter over one step: matmuls and attention, not "
          f"the lookup's selection or gathers, nor the optimizer); a {prec} square matmul here: {reach:,.2f} TFLOP/s")
    for r in train:
        line = (f"  {r['model']}: {r['flops_per_step'] / 1e9:,.1f} GFLOP/step, {r['tflops']:,.3f} TFLOP/s "
                f"= {r['tflops'] / reach:.1%} of the measured matmul rate")
        if peak:
            line += f", {r['tflops'] / peak[1]:.2%} of the {prec} peak {peak[1]:,.1f} TFLOP/s ({peak[0]})"
        print(line)
    for r in train:
        r["matmul_tflops"], r["peak_tflops"] = reach, peak[1] if peak else None

    load1 = os.getloadavg()[0]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nload average (1 min) after: {load1:.2f}; wall {time.time() - t0:.0f}s; peak RSS {rss_mb:,.0f} MB")
    if max(load0, load1) > threads:
        print(f"WARNING: load average {max(load0, load1):.2f} exceeds {threads} threads: "
              "the machine is shared and these timings are noisy.")
    if args.json:
        env = {"torch": torch.__version__, "threads": threads, "cpu": cpu_model(), "device": str(args.device),
               "load_before": load0, "kernels": kernels,
               "load_after": load1, "peak_rss_mb": rss_mb, "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"env": env, "lookup": lookup, "training": train}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
