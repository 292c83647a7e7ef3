"""Training precision by hardware: bf16 only where it is computed natively (hand-made CPU flags)."""

import pytest
import torch

from forgetless.errors import ConfigError
from forgetless.models.precision import (
    autocast_dtype,
    choose_precision,
    cpu_flags,
    cpu_has_native_bf16,
    describe,
)

EPYC_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2 sha_ni\n"
XEON_SPR = "processor\t: 0\nflags\t\t: avx avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile\n"
ZEN4 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: avx2\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def test_flags_are_read_from_the_first_cpu():
    assert cpu_flags(ZEN4) == {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert "amx_bf16" in cpu_flags(XEON_SPR) and cpu_flags("no flags here") == set()


@pytest.mark.parametrize("cpuinfo,native", [(EPYC_AVX2, False), (XEON_SPR, True), (ZEN4, False), (ARM, False)])
def test_bf16_on_cpu_only_with_native_instructions(cpuinfo, native):
    flags = cpu_flags(cpuinfo)
    assert cpu_has_native_bf16(flags) is native
    assert choose_precision("cpu", flags) == ("bf16" if native else "fp32")
    assert choose_precision("cpu", " ".join(flags)) == choose_precision("cpu", flags)  # a flag string works too


def test_gpu_by_compute_capability_and_overrides_win():
    assert choose_precision("cuda", cuda_capability=(8, 0)) == "bf16"  # Ampere and later
    assert choose_precision("cuda", cuda_capability=(7, 5)) == "fp32"
    assert choose_precision("mps") == "fp32"
    assert choose_precision("cpu", cpu_flags(EPYC_AVX2), override="bf16") == "bf16"
    assert choose_precision("cpu", cpu_flags(XEON_SPR), override="FP32") == "fp32"
    with pytest.raises(ConfigError, match="FORGETLESS_PRECISION"):
        choose_precision("cpu", set(), override="fp16")


def test_environment_variable_overrides_the_automatic_choice(monkeypatch):
    monkeypatch.setenv("FORGETLESS_PRECISION", "fp32")
    assert autocast_dtype("cpu") is None
    monkeypatch.setenv("FORGETLESS_PRECISION", "bf16")
    assert autocast_dtype("cpu") is torch.bfloat16
    assert autocast_dtype("cpu", override="fp32") is None
    assert "CPU precision: bf16" in describe(cpu_flags(EPYC_AVX2))
    monkeypatch.delenv("FORGETLESS_PRECISION")
    assert describe(cpu_flags(EPYC_AVX2)).endswith("CPU instruction sets: avx2; CPU precision: fp32")
