"""Compiled CPU kernels for the memory layer, with the PyTorch code as their reference.

Why: on CPU, ``torch.topk`` over the sub-key scores took 60% (2^16 slots) to 75% (2^20 slots)
of a product-key lookup, and ``F.embedding_bag``'s per-sample-weights backward twice the time of
its forward (docs/performance.md). ``memory_kernels.cpp`` holds two kernels:

- ``product_topk``: the whole selection (both halves' top-k, the candidate sums, the final
  top-k) in one pass per (token, head): a threshold that at least k scores reach (the least of
  k group maxima), raised by bisection with vectorised counts, then a compaction of the few
  scores above it and a branch-free ranking;
- ``bag_weight_grad``: the gradient of the bag's weights, one dot product per read with the
  rows prefetched.

The layer's PyTorch path (``ProductKeyMemory._select_reference``, ``F.embedding_bag``'s
backward) stays the reference that ``tests/test_native.py`` compares them with, and is what runs
on GPUs, when a score is NaN, and wherever the kernels cannot be built.

The kernels are built on first use with the C++ compiler of the machine (``$CXX``, else ``c++``
or ``g++``; ``-O3 -march=native``, about a second; ``FORGETLESS_NATIVE_ARCH=haswell`` builds for
another target, e.g. AVX2 without AVX-512) into ``$FORGETLESS_CACHE/native`` (default
``~/.cache/forgetless/native``), under a name that hashes the source, the flags and the CPU's
instruction sets, written atomically. No compiler, or a failed build: one warning, and the
PyTorch path. ``FORGETLESS_NATIVE=0`` turns the kernels off (``1``, the default, uses them
when they build).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ...errors import ConfigError
from ...files import cache_dir
from ..precision import cpu_flags

log = logging.getLogger(__name__)

NATIVE_ENV = "FORGETLESS_NATIVE"
SOURCE = Path(__file__).with_name("memory_kernels.cpp")
ARCH_ENV = "FORGETLESS_NATIVE_ARCH"  # the -march target, "native" by default (e.g. haswell: AVX2 only)
FLAGS = ["-O3", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-pthread"]

_lib: ctypes.CDLL | None = None
_tried = False
_status = "not built yet"


def native_enabled() -> bool:
    """Whether ``FORGETLESS_NATIVE`` allows the compiled kernels (default: yes)."""
    value = os.environ.get(NATIVE_ENV, "1").strip().lower()
    if value not in ("0", "1", "off", "on", "false", "true", "no", "yes"):
        raise ConfigError(f"{NATIVE_ENV} must be 1 or 0, got {value!r}.")
    return value in ("1", "on", "true", "yes")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _arch() -> str:
    """The -march target: ``$FORGETLESS_NATIVE_ARCH``, default "native"."""
    return os.environ.get(ARCH_ENV, "native").strip() or "native"


def _build() -> Path:
    """Compile the kernels (or find them already compiled) and return the library's path."""
    cxx = _compiler()
    if cxx is None:
        raise OSError("no C++ compiler found (set CXX, or install g++)")
    src = SOURCE.read_bytes()
    arch = _arch()
    if not arch.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise OSError(f"{ARCH_ENV}={arch!r} is not a -march target name")
    flags = [f"-march={arch}", *FLAGS]
    cpu = " ".join(sorted(cpu_flags())) or platform.machine()
    key = hashlib.sha256(src + " ".join([cxx, *flags, cpu]).encode()).hexdigest()[:16]
    out = cache_dir("native", f"memory_kernels-{key}.so")
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise OSError(f"{Path(cxx).name} failed: {res.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _status
    if _tried:
        return _lib
    _tried = True
    try:
        lib = ctypes.CDLL(str(_build()))
        fn = lib.forgetless_pk_topk
    except (OSError, subprocess.SubprocessError) as e:
        _status = f"unavailable ({e})"
        log.warning("the compiled memory kernels are unavailable, using the PyTorch path: %s", e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, i64]
    fn.restype = ctypes.c_int
    bag = lib.forgetless_bag_weight_grad
    bag.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, i64]
    bag.restype = None
    _lib, _status = lib, "compiled" if _arch() == "native" else f"compiled for -march={_arch()}"
    return _lib


def kernel_status() -> str:
    """What the memory layer's selection and bag backward run on, for benchmark headers:
    "compiled" (or "compiled for -march=..."), "off (...)", or why they are unavailable."""
    if not native_enabled():
        return f"off ({NATIVE_ENV}=0)"
    _load()
    return _status


def native_available(t: torch.Tensor) -> bool:
    """Whether the kernels run for a CPU float32 tensor like ``t`` (allowed, and built)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and native_enabled() and _load() is not None


def product_topk(s: torch.Tensor, k: int, pi: torch.Tensor, pj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The product-key selection of ``ProductKeyMemory`` on sub-key scores ``s`` (tokens, heads,
    2, n_keys), float32 on CPU: (scores, slots), each (tokens, heads, k), best first (ties: lower
    sub-key, then lower slot). ``pi``, ``pj``: the candidate pairs (``candidate_pairs(k)``).
    None when the kernel cannot run here (not built, switched off, another device or dtype, a NaN
    score): the caller then uses the PyTorch reference. Not differentiable by itself."""
    if s.device.type != "cpu" or s.dtype != torch.float32 or s.dim() != 4 or s.shape[2] != 2 or not native_enabled():
        return None
    lib = _load()
    if lib is None:
        return None
    if s.stride(-1) != 1:
        s = s.contiguous()
    tokens, heads, _, n = s.shape
    if n * n >= 2**32 or not 1 <= k <= n:  # the kernel packs slot ids in 32 bits
        return None
    pi = pi.to(torch.int64).contiguous()
    pj = pj.to(torch.int64).contiguous()
    scores = torch.empty(tokens, heads, k, dtype=torch.float32)
    slots = torch.empty(tokens, heads, k, dtype=torch.int64)
    if tokens == 0:
        return scores, slots
    bad = lib.forgetless_pk_topk(s.data_ptr(), tokens, heads, n, k, s.stride(0), s.stride(1), s.stride(2),
                                 pi.data_ptr(), pj.data_ptr(), pi.numel(), scores.data_ptr(), slots.data_ptr(),
                                 torch.get_num_threads())
    return None if bad else (scores, slots)


def bag_weight_grad(values: torch.Tensor, idx: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
    """The weights' gradient of ``y[m] = sum_r w[m, r] values[idx[m, r]]`` given ``grad`` = dL/dy
    (tokens, dim): ``gw[m, r] = <grad[m], values[idx[m, r]]>``, (tokens, reads) float32. What
    ``F.embedding_bag``'s per-sample-weights backward computes, 1.1x to 1.8x faster here
    (docs/performance.md). None where the kernel cannot run (the caller then lets
    ``F.embedding_bag`` compute it); IndexError for an index outside the table."""
    if not (values.device.type == idx.device.type == grad.device.type == "cpu") or values.dtype != torch.float32 \
            or values.dim() != 2 or idx.dim() != 2 or not native_enabled():
        return None
    lib = _load()
    if lib is None:
        return None
    values = values.detach().contiguous()
    idx = idx.to(torch.int64).contiguous()
    grad = grad.detach().to(torch.float32).contiguous()
    out = torch.empty(idx.shape, dtype=torch.float32)
    if idx.numel():
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= values.shape[0]:  # the kernel reads rows unchecked
            raise IndexError(f"bag index out of range: {int(lo)}..{int(hi)} for a table of {values.shape[0]} rows")
        lib.forgetless_bag_weight_grad(values.data_ptr(), values.shape[1], idx.data_ptr(), idx.shape[0], idx.shape[1],
                                       grad.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out
