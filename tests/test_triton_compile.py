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


SHARED_CACHE_PROBE = """
import os, sys
sys.path.insert(0, os.getcwd())
import torch
from triton.runtime import driver
import benchmarks.triton_compile_check as check
from benchmarks.triton_compile_problems import QUICK_PROBLEMS

def entries():
    return sorted(os.listdir(os.environ["TRITON_CACHE_DIR"]))

class Hopper:  # what the JIT asks the CUDA driver, answered without one
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return check.TARGET
    def get_active_torch_device(self): return torch.device("cpu")

launch = check.record_launches([p for p in QUICK_PROBLEMS if p[0] == "lstm_cell.b64_h256"], ["bfloat16"])[0]
config = launch.launcher.untuned_config(launch.arguments, launch.constexprs)
assert check.compile_one(check.Compile(launch, config))[0]
compiled = entries()
driver.set_active(Hopper())
launch.launcher.kernel.run(*launch.arguments, grid=(1,), warmup=True, **launch.constexprs, **config.kwargs,
                           num_warps=config.num_warps, num_stages=config.num_stages)
print(len(compiled), len(entries()), entries() == compiled)
"""


@pytest.mark.skipif(CUDA_COMPILER_MISSING is not None, reason=str(CUDA_COMPILER_MISSING))
def test_the_jit_finds_what_the_compile_check_compiled_in_tritons_cache(tmp_path):
    # gpu_check.sh warms Triton's cache for the benches with `triton_compile_check.py
    # --untuned`; that only helps if the JIT's launch of the same kernel, arguments and
    # config looks up the entry the check wrote (here with a stand-in for the CUDA driver).
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SHARED_CACHE_PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**environment, "TRITON_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    compiled, after_jit, same = result.stdout.split()
    assert int(compiled) >= 1 and same == "True", result.stdout
