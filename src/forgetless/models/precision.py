"""Training precision by hardware: bf16 autocast only where bf16 matrix products are native and fast.

On a CPU, bf16 autocast is chosen only with AMX (``amx_bf16`` in /proc/cpuinfo: Sapphire Rapids
and later Xeons). Without AMX, PyTorch converts to and from bf16 around every autocast op; on an
AVX2-only EPYC the matmuls are emulated, and on a Xeon with AVX512-BF16 but no AMX (the machine
this project is developed on) it was measured slower than fp32 too: a training step of the
shipped base (16x256 tokens, 2 threads, idle) took 1,907 ms with bf16 autocast and 1,263 ms in
fp32 for the dense-MLP model, 2,224 and 1,650 ms for the memory model (docs/performance.md).
So AVX512-BF16 alone does not count. On a CUDA GPU bf16 is native from compute capability 8.0
(Ampere) on.

Override with the environment variable ``FORGETLESS_PRECISION`` = ``auto`` (default),
``bf16`` or ``fp32``, or with the ``override`` argument.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError

ENV_VAR = "FORGETLESS_PRECISION"
PRECISIONS = ("auto", "bf16", "fp32")
BF16_CPU_FLAGS = ("amx_bf16",)  # AVX512-BF16 without AMX measured slower than fp32 (see above)
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of the first CPU of a /proc/cpuinfo text (read when not given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return set()


def cpu_has_native_bf16(flags: set[str] | str) -> bool:
    """True when the CPU has AMX-BF16 tiles (AVX512-BF16 alone measured slower than fp32)."""
    flags = set(flags.split()) if isinstance(flags, str) else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def choose_precision(device_type: str, flags: set[str] | str = (), cuda_capability: tuple[int, int] | None = None,
                     override: str | None = None) -> str:
    """'bf16' or 'fp32' for training on ``device_type`` ('cpu', 'cuda', other), a pure function.

    ``override`` ('auto', 'bf16', 'fp32'; None = 'auto') wins when it is not 'auto'."""
    override = (override or "auto").lower()
    if override not in PRECISIONS:
        raise ConfigError(f"{ENV_VAR} must be one of {PRECISIONS}, got {override!r}.")
    if override != "auto":
        return override
    if device_type == "cpu":
        return "bf16" if cpu_has_native_bf16(flags if isinstance(flags, (set, str)) else set(flags)) else "fp32"
    if device_type == "cuda":
        return "bf16" if cuda_capability is not None and cuda_capability >= (8, 0) else "fp32"
    return "fp32"


def autocast_dtype(device: torch.device | str, override: str | None = None) -> torch.dtype | None:
    """torch.bfloat16 when bf16 autocast should be used on this machine's ``device``, else None.

    ``override`` defaults to the ``FORGETLESS_PRECISION`` environment variable."""
    device_type = torch.device(device).type
    override = override if override is not None else os.environ.get(ENV_VAR)
    cap = None
    if device_type == "cuda" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(torch.device(device))
    flags = cpu_flags() if device_type == "cpu" else set()
    return torch.bfloat16 if choose_precision(device_type, flags, cap, override) == "bf16" else None


def describe(flags: set[str] | None = None) -> str:
    """One line naming the relevant instruction sets present and the precision chosen on CPU."""
    flags = cpu_flags() if flags is None else flags
    present = [f for f in SHOWN_FLAGS if f in flags] or ["none of " + "/".join(SHOWN_FLAGS)]
    prec = choose_precision("cpu", flags, override=os.environ.get(ENV_VAR))
    return f"CPU instruction sets: {' '.join(present)}; CPU precision: {prec}"
