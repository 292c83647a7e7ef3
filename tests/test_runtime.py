"""keep_freed_memory: freed tensors are reused without page faults; the override and bad values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from forgetless.errors import ConfigError
from forgetless.runtime import MALLOC_ENV, malloc_choice

PROBE = """
import resource, torch
from forgetless.runtime import keep_freed_memory
print(keep_freed_memory())
t = torch.ones(16 * 2**20)  # 64 MB, every page written, then freed
del t
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = torch.ones(12 * 2**20)  # 48 MB: fits where the first one was
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _run(choice: str) -> tuple[str, int]:
    env = {**os.environ, MALLOC_ENV: choice, "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    done, faults = out.stdout.split()
    return done, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_tensor_is_reused_without_page_faults_and_system_keeps_the_defaults():
    done, faults = _run("keep")
    if done == "unavailable":
        pytest.skip("not glibc")
    assert done == "keep"
    assert faults < 100  # the 48 MB tensor lands in memory already faulted in
    done, faults = _run("system")
    assert done == "system"
    assert faults > 10_000  # glibc's default: a fresh mmap above 32 MB, 12,288 pages of 4 KB


def test_malloc_choice_reads_the_environment_value():
    assert malloc_choice(None) == "keep"
    assert malloc_choice(" System ") == "system"
    with pytest.raises(ConfigError, match="FORGETLESS_MALLOC must be one of"):
        malloc_choice("jemalloc")
