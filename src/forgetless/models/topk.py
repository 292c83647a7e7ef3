"""Indices of the k largest values along the last dimension, for the product-key lookup on CPU.

The lookup takes three top-k selections per token and head: k of the sqrt(N) sub-key scores of each half,
then k of the ~k ln k candidate sums. Profiled on CPU (docs/performance.md), ``torch.topk`` over rows of
256 values with k = 32 took 37 ms for 16,384 rows where a plain ``max`` took 4 ms: the selection, not the
score products, dominated the memory layer's forward. PyTorch has no faster exact selection on CPU, so this
module compiles a small C++ kernel (``torch.utils.cpp_extension.load_inline``, once per machine, cached in
``~/.cache/forgetless``): one pass over each row keeps a sorted buffer of the k best, inserting
a value only when it beats the k-th (about k ln(n/k) insertions on random rows), rows split over threads.

Semantics are ``torch.topk(x, k, dim=-1, largest=True, sorted=True).indices``: best first; among equal
values the lower index first (``torch.topk`` leaves ties unspecified). Only the indices come from the
kernel: values are gathered from ``x`` by the caller, so gradients flow through ``gather`` as through
``topk``'s values. float32 CPU tensors only; anything else (CUDA, other dtypes, a machine without a C++
compiler or ``ninja``) uses ``torch.topk``. ``FORGETLESS_TOPK=torch`` turns the kernel off.
Tested against ``torch.topk`` in tests/test_topk.py.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

ENV_VAR = "FORGETLESS_TOPK"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

torch::Tensor topk_indices(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.device().is_cpu(), "float32 CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && k >= 0 && k <= x.size(-1), "k must be within the last dimension");
  auto xc = x.contiguous();
  const int64_t n = xc.size(-1);
  const int64_t rows = n > 0 ? xc.numel() / n : 0;
  auto sizes = xc.sizes().vec();
  sizes.back() = k;
  auto out = torch::empty(sizes, xc.options().dtype(torch::kLong));
  if (rows == 0 || k == 0) return out;
  const float* px = xc.data_ptr<float>();
  int64_t* po = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> bv(k);
    std::vector<int64_t> bi(k);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = px + r * n;
      int64_t m = 0;
      for (int64_t j = 0; j < n; ++j) {
        const float v = row[j];
        if (m == k && !(v > bv[k - 1])) continue;  // not better than the k-th: most values stop here
        int64_t p = m < k ? m++ : k - 1;
        while (p > 0 && v > bv[p - 1]) {  // strict: an equal earlier value stays ahead
          bv[p] = bv[p - 1];
          bi[p] = bi[p - 1];
          --p;
        }
        bv[p] = v;
        bi[p] = j;
      }
      std::copy(bi.begin(), bi.end(), po + r * k);
    }
  });
  return out;
}
"""

_lock = threading.Lock()
_kernel = None  # the compiled function, False when it cannot be built here


def _build_dir() -> Path:
    """One build folder per kernel source and torch version: ``$FORGETLESS_CACHE`` (default
    ``~/.cache/forgetless``)/topk-<torch>-<source hash>."""
    root = Path(os.environ.get("FORGETLESS_CACHE") or Path.home() / ".cache" / "forgetless")
    tag = hashlib.sha256((_SOURCE + torch.__version__).encode()).hexdigest()[:12]
    path = root / f"topk-{torch.__version__.replace('+', '_')}-{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load():
    global _kernel
    if _kernel is None:
        with _lock:
            if _kernel is None:
                try:
                    from torch.utils.cpp_extension import load_inline

                    build = _build_dir()
                    if not any(build.glob("*.so")):
                        print("forgetless: building the C++ top-k kernel of the memory lookup, once "
                              f"(about a minute; cached in {build})", file=sys.stderr, flush=True)
                    mod = load_inline(name="forgetless_topk", cpp_sources=[_SOURCE], functions=["topk_indices"],
                                      extra_cflags=["-O3"], build_directory=str(build), verbose=False)
                    _kernel = mod.topk_indices
                except Exception as e:  # no compiler, no ninja, no headers: torch.topk instead
                    warnings.warn(f"the C++ top-k kernel could not be built ({str(e).splitlines()[0][:120]}); "
                                  f"using torch.topk", stacklevel=3)
                    _kernel = False
    return _kernel


def kernel_available() -> bool:
    """Whether the compiled kernel is in use on this machine (it is built on the first call)."""
    return os.environ.get(ENV_VAR, "").lower() != "torch" and bool(_load())


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.topk(x, k, dim=-1).indices`` (sorted, best first), by the C++ kernel where it applies."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and kernel_available():
        return _kernel(x.detach(), k)
    return x.topk(k, dim=-1).indices


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest along the last dimension, sorted; values are differentiable."""
    idx = topk_indices(x, k)
    return x.gather(-1, idx), idx
