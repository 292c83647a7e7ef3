"""Process-wide CPU memory allocation: reuse freed memory instead of page-faulting fresh memory.

PyTorch's CPU allocator asks the C library for every tensor and frees it when the tensor dies.
glibc's ``malloc`` serves a request of more than 32 MB (its largest mmap threshold) with a fresh
``mmap`` and returns it with ``munmap`` on free, so the next tensor of that size page-faults and
is zeroed by the kernel page by page: on the two cores of this project's machines that cost 12 to
300 ms per 64 MB tensor, and a training step of the shipped base (logits of 4,096 x 8,192, their
gradients, the memory layer's value-table gradient) touched about 0.6 GB of fresh memory, 130,000
to 160,000 page faults a step. Asking glibc to serve every allocation from its heap and never
return freed memory to the system (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, -1)``)
removes those faults after the first step: measured in docs/performance.md, both the memory model
and the dense model train 1.7x to 1.8x faster. The price is that the process keeps its peak memory
until it exits.

``keep_freed_memory()`` does it once per process; the ``forgetless`` command and the benchmarks
call it first. ``FORGETLESS_MALLOC=system`` leaves the C library's defaults. It is a no-op
outside glibc (macOS, musl) and says so in its return value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from .errors import ConfigError

MALLOC_ENV = "FORGETLESS_MALLOC"
MALLOC_CHOICES = ("keep", "system")
M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
NEVER = -1  # M_TRIM_THRESHOLD -1: never return the free top of the heap (glibc's mallopt(3))

_configured: str | None = None


def malloc_choice(value: str | None) -> str:
    """The allocator setting for an environment value: "keep" (the default) or "system"."""
    value = (value or "keep").strip().lower()
    if value not in MALLOC_CHOICES:
        raise ConfigError(f"{MALLOC_ENV} must be one of {MALLOC_CHOICES}, got {value!r}.")
    return value


def keep_freed_memory() -> str:
    """Make glibc keep and reuse freed memory for the rest of the process (see module).

    Returns what was done: "keep" (set now or earlier), "system" (left as is on request), or
    "unavailable" (not glibc). Safe to call more than once."""
    global _configured
    if _configured is not None:
        return _configured
    choice = malloc_choice(os.environ.get(MALLOC_ENV))
    if choice == "system":
        _configured = "system"
        return _configured
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _configured = "unavailable"
        return _configured
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER) == 1
    _configured = "keep" if ok else "unavailable"
    return _configured
