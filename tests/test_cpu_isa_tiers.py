"""The CPU kernels' narrower instruction-set clones (csrc/cpu/isa.h) against the reference.

The rest of the suite runs the clones this CPU picks, the widest it has (AVX-512 on the
project's machines).  The AVX2 and baseline clones run only where a process starts under
ATEN_CPU_CAPABILITY=avx2 or =default (the choice is made once a process), so this runs the
CPU kernels' test modules again in a process of their own under each: every attention
score, mask and dtype, the 16-bit widening, the LSTM/GRU cells and layers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastattn import backends
from tests.cpu_capability import ROOT, run_with_cpu_capability

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

KERNEL_TEST_MODULES = (
    "tests/test_cpu_attention.py",
    "tests/test_cpu_attention_16_bit.py",
    "tests/test_cpu_attention_values_are_keys.py",
    "tests/test_cpu_attention_bfloat16_gemm.py",
    "tests/test_cpu_recurrent.py",
)


def isa_of(capability: str) -> str:
    """The clones a process under ATEN_CPU_CAPABILITY=capability runs (info()'s first entry)."""
    result = run_with_cpu_capability("import fastattn; print(fastattn.info()['cpu_kernels'][0])", capability)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


@pytest.mark.parametrize("capability, isa", [("avx2", "avx2"), ("default", "baseline")])
def test_the_cpu_kernel_tests_pass_with_the_narrower_clones(capability, isa):
    ran = isa_of(capability)
    if capability == "avx2" and ran != "avx2":
        pytest.skip(f"this CPU has no AVX2 and FMA: ATEN_CPU_CAPABILITY=avx2 runs the {ran} clones, "
                    "which the baseline case covers")
    assert ran == isa
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TEST_MODULES]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]

