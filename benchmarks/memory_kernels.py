"""The memory layer's compiled CPU kernels against the PyTorch code they replace, in one run.

    python benchmarks/memory_kernels.py [--tokens 4096] [--reps 7] [--threads N]

Rows (median ms of ``--reps`` after a warm-up, both sides timed in this process, interleaved):

- selection: the product-key top-k on sub-key scores of ``--tokens`` tokens x 4 heads, knn 32,
  for 2^16 and 2^20 slots: ``ProductKeyMemory._select_reference`` (torch.topk twice, the candidate
  matmul, gathers) against ``models.native.product_topk``; the scores must agree bit for bit;
- bag weight gradient: ``F.embedding_bag``'s per-sample-weights backward (its forward + backward
  minus its forward) against ``models.native.bag_weight_grad``, 65,536 x 256 values, 128 reads
  per token;
- layer: forward + backward of the shipped base's memory layer (2^16 slots, whitened queries,
  bf16 autocast where the CPU has native bf16, as training runs) with ``FORGETLESS_NATIVE=0``
  and with the kernels, and a 256 -> 1024 -> 256 SiLU MLP of the same width for scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from forgetless.models.memory import MemoryConfig, ProductKeyMemory
from forgetless.models.native import NATIVE_ENV, bag_weight_grad, kernel_status, product_topk
from forgetless.models.precision import autocast_dtype, describe
from forgetless.runtime import keep_freed_memory


def timed_pair(a, b, reps: int) -> tuple[float, float]:
    """Median ms of a() and b(), alternated so both see the same load."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ta), statistics.median(tb)


class reference_path:
    """FORGETLESS_NATIVE=0 inside the block."""

    def __enter__(self):
        self.old = os.environ.get(NATIVE_ENV)
        os.environ[NATIVE_ENV] = "0"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(NATIVE_ENV, None)
        else:
            os.environ[NATIVE_ENV] = self.old


def main() -> None:
    malloc = keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per call (default: one 16x256 batch)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    status = kernel_status()
    bf16 = autocast_dtype("cpu") is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average before {os.getloadavg()[0]:.2f}; "
          f"{describe()}; malloc: {malloc}; compiled kernels: {status}")
    if not status.startswith("compiled"):
        raise SystemExit(f"the kernels are not available here ({status}): nothing to compare.")
    g = torch.Generator().manual_seed(0)
    rows = []

    for n_keys in (256, 1024):
        mem = ProductKeyMemory(256, 256, MemoryConfig(n_keys=n_keys, heads=4, knn=32, k_dim=128,
                                                      query_norm="layernorm")).eval()
        with torch.no_grad():
            q = mem._queries(torch.randn(args.tokens, 256, generator=g))
            s = torch.einsum("nhsd,hskd->nhsk", q, mem.sub_keys.float())
            pi, pj, _ = mem._pairs(s.device)
            ref, got = mem._select_reference(s), product_topk(s, 32, pi, pj)
            assert torch.equal(ref[0], got[0]), "the kernel's scores differ from the reference"
            t_ref, t_new = timed_pair(lambda: mem._select_reference(s), lambda: product_topk(s, 32, pi, pj), args.reps)
        rows.append((f"selection, 2^{2 * n_keys.bit_length() - 2} slots", t_ref, t_new))

    values = torch.randn(65536, 256, generator=g)
    idx = torch.randint(0, 65536, (args.tokens, 128), generator=g)
    w = torch.rand(args.tokens, 128, generator=g)
    grad = torch.randn(args.tokens, 256, generator=g)

    def bag_forward():
        with torch.no_grad():
            F.embedding_bag(idx, values, per_sample_weights=w, mode="sum")

    def bag_both():
        ww = w.clone().requires_grad_(True)
        F.embedding_bag(idx, values, per_sample_weights=ww, mode="sum").backward(grad)

    t_fwd, t_both = timed_pair(bag_forward, bag_both, args.reps)
    t_kernel, _ = timed_pair(lambda: bag_weight_grad(values, idx, grad), bag_forward, args.reps)
    rows.append(("bag weight gradient", t_both - t_fwd, t_kernel))

    torch.manual_seed(0)
    mem = ProductKeyMemory(256, 256, MemoryConfig(n_keys=256, heads=4, knn=32, k_dim=128, query_norm="whiten")).train()
    mem(torch.randn(2, 256, 256))  # whitening statistics
    mem.update_query_stats = False
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024, bias=False), torch.nn.SiLU(),
                              torch.nn.Linear(1024, 256, bias=False))
    x = torch.randn(args.tokens // 256 or 1, min(args.tokens, 256), 256, generator=g)

    def train_step(module):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = module(xx)
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    def reference_step():
        with reference_path():
            train_step(mem)

    t_ref, t_new = timed_pair(reference_step, lambda: train_step(mem), args.reps)
    t_mlp, _ = timed_pair(lambda: train_step(mlp), lambda: None, args.reps)
    rows.append((f"memory layer forward + backward ({'bf16 autocast' if bf16 else 'fp32'})", t_ref, t_new))

    print(f"\n{args.tokens} tokens per call, median of {args.reps}\n")
    print("| | PyTorch ms | compiled ms | speed-up |")
    print("|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    print(f"| a 256 -> 1024 -> 256 MLP, forward + backward, for scale | {t_mlp:.1f} | | |")
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
