"""Every Triton kernel compiles for sm_90 (H100/H200) on a machine without a GPU: the quick
part of benchmarks/triton_compile_check.py (each launcher of the ops once per dtype, with
the config an untuned GPU launch takes), in a subprocess without TRITON_INTERPRET (which
the tests set, and under which the kernels are not JIT functions).  The full check, every
tuned config the prunes keep at the bench presets' shapes, is the script itself."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
DTYPES = 4  # float32 (IEEE and TF32 dots), float16, bfloat16
SPILL_LIMIT = 256  # bytes of stack a thread (ptxas spills) an untuned config may take


def _launchers() -> list:
    """Every Launcher of the Triton ops (each kernel with one config list)."""
    from fastattn.ops import triton_attention, triton_hard, triton_recurrent

    return [*triton_attention.LAUNCHERS.values(), triton_attention.COMBINE_LAUNCHER, triton_hard.LAUNCHER,
            *triton_recurrent.LAUNCHERS.values()]


def _cuda_compiler_missing() -> str | None:
    """Why triton cannot compile for CUDA here, or None."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no NVIDIA backend"
    try:
        triton.knobs.nvidia.ptxas.path
    except Exception as error:  # noqa: BLE001 - any failure to find ptxas means no CUDA compile
        return f"triton {triton.__version__} finds no ptxas: {error}"
    return None


CUDA_COMPILER_MISSING = _cuda_compiler_missing()


@pytest.mark.skipif(CUDA_COMPILER_MISSING is not None, reason=str(CUDA_COMPILER_MISSING))
def test_every_kernel_compiles_for_sm90_with_its_untuned_config():
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton_compile_check.py"), "--quick"],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=600,
    )
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert result.returncode == 0 and not failed, "\n".join(failed) or result.stdout[-3000:] + result.stderr[-3000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    launchers = _launchers()
    assert len(compiled) == len(launchers) * DTYPES, result.stdout  # the quick problems reach every launcher
    assert {re.match(r"ok\s+(\w+)", line)[1] for line in compiled} == {launcher.kernel.__name__ for launcher in launchers}
    # The prunes keep the untuned configs out of register spills in every dtype (IEEE
    # float32's FMA dots spilled 0.8 to 12 KB a thread before they were bounded).
    spilling = [line for line in compiled if int(re.search(r"stack (\d+) B", line)[1]) > SPILL_LIMIT]
    assert not spilling, "\n".join(spilling)
