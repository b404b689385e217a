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

    return [*triton_attention.LAUNCHERS.values(), triton_attention.COMBINE_LAUNCHER, *triton_hard.LAUNCHERS.values(),
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


# The probes' common start: a compile check's problem, a stand-in for the CUDA driver, the cache's entries.
PROBE_SETUP = """
import os, sys
sys.path.insert(0, os.getcwd())
import torch
from triton.runtime import driver
import benchmarks.triton_compile_check as check
from benchmarks.triton_compile_problems import QUICK_PROBLEMS, Problem

def entries():
    return sorted(os.listdir(os.environ["TRITON_CACHE_DIR"]))

class Hopper:  # what the JIT asks the CUDA driver, answered without one
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return check.TARGET
    def get_active_torch_device(self): return torch.device("cpu")

cell = next(problem for problem in QUICK_PROBLEMS if problem.name == "gru_cell.b64_h256")
"""

SHARED_CACHE_PROBE = PROBE_SETUP + """
from unittest import mock

def tuning(run):
    def tuned(dtype):
        with mock.patch.dict(os.environ, {"FASTATTN_TRITON_AUTOTUNE": "1"}):
            run(dtype)
    return tuned

untuned, tuned = (check.record_launches([Problem(cell.name, run)], ["bfloat16"])[0] for run in (cell.run, tuning(cell.run)))
assert not untuned.tuned and tuned.tuned
jobs = check.compiles_to_run([untuned, tuned], "untuned")
assert all(check.compile_one(job)[0] for job in jobs)
compiled = entries()
driver.set_active(Hopper())
config = untuned.launcher.untuned_config(untuned.arguments, untuned.constexprs)
untuned.launcher.kernel.run(*untuned.arguments, grid=(1,), warmup=True, **untuned.constexprs, **config.kwargs,
                            num_warps=config.num_warps, num_stages=config.num_stages)
untuned_jit = entries()
tuned.launcher.tuner_for(tuned.arguments, tuned.constexprs).warmup(*tuned.arguments, grid=(1,), **tuned.constexprs)
print(len(jobs), len(compiled), untuned_jit == compiled, entries() == compiled)
"""


@pytest.mark.skipif(CUDA_COMPILER_MISSING is not None, reason=str(CUDA_COMPILER_MISSING))
def test_the_jit_finds_what_the_compile_check_compiled_in_tritons_cache(tmp_path):
    # gpu_check.sh warms Triton's cache for its gpu tests and benches with
    # `triton_compile_check.py --gpu-check`; that only helps if the JIT's launch of the same
    # kernel, arguments and config, untuned or through the autotuner (every config the
    # prune keeps), looks up the entries the check wrote (here with a stand-in for the CUDA
    # driver; the autotuner's warmup compiles what its timing runs would).
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SHARED_CACHE_PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**environment, "TRITON_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    jobs, compiled, untuned_found, tuned_found = result.stdout.split()
    assert int(jobs) >= 3 and int(compiled) >= int(jobs), result.stdout  # the untuned config and the tuned ones
    assert untuned_found == "True" and tuned_found == "True", result.stdout


C_LAUNCHER_CACHE_PROBE = PROBE_SETUP + """
from triton.backends.nvidia import driver as nvidia_driver

launch = check.record_launches([cell], ["bfloat16"])[0]
config = launch.launcher.untuned_config(launch.arguments, launch.constexprs)
assert check.compile_one(check.Compile(launch, config, build_c_launcher=sys.argv[1] == "built"))[0]
compiled = entries()
driver.set_active(Hopper())
kernel = launch.launcher.kernel.run(*launch.arguments, grid=(1,), warmup=True, **launch.constexprs, **config.kwargs,
                                    num_warps=config.num_warps, num_stages=config.num_stages)
nvidia_driver.CudaLauncher(kernel.src, kernel.metadata)  # what the kernel's first launch builds
print(len(compiled), entries() == compiled)
"""


def _stub_libcuda(directory: Path) -> Path:
    """A libcuda.so.1 defining, as empty functions, every driver call Triton's C launchers
    make: enough to link and load one on a machine without the CUDA driver."""
    import inspect

    from triton.backends.nvidia import driver as nvidia_driver

    names = sorted(set(re.findall(r"\b(cu[A-Z]\w+)\b", inspect.getsource(nvidia_driver))))
    source = directory / "stub.c"
    source.write_text("".join(f"int {name}(void) {{ return 0; }}\n" for name in names))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(directory / "libcuda.so.1"), str(source)], check=True)
    return directory


def _compiles_c_launchers() -> bool:
    from triton.backends.nvidia import driver as nvidia_driver

    return hasattr(nvidia_driver, "make_launcher")


@pytest.mark.skipif(CUDA_COMPILER_MISSING is not None, reason=str(CUDA_COMPILER_MISSING))
@pytest.mark.skipif(
    CUDA_COMPILER_MISSING is None and not _compiles_c_launchers(),
    reason=f"triton {triton.__version__} launches every kernel through one generic launcher (3.6, the GPU machine's, "
    "compiles a C launcher per kernel signature; gpu_versions_check.sh runs this test under it)",
)
def test_the_jit_finds_the_c_launcher_the_gpu_check_warm_up_built(tmp_path):
    # Under triton 3.6 a kernel's first launch also compiles its C launcher (gcc, about a
    # second, cached by its source): `triton_compile_check.py --gpu-check` builds them too.
    # Linked and loaded here against a stand-in libcuda; a control without the build.
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    libcuda = _stub_libcuda(tmp_path)
    found = {}
    for mode in ("built", "not built"):
        result = subprocess.run(
            [sys.executable, "-c", C_LAUNCHER_CACHE_PROBE, mode], capture_output=True, text=True, cwd=ROOT,
            timeout=300, env={**environment, "TRITON_CACHE_DIR": str(tmp_path / mode), "TRITON_LIBCUDA_PATH": str(libcuda),
                              "LD_LIBRARY_PATH": str(libcuda)},
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        compiled, unchanged = result.stdout.split()
        found[mode] = (int(compiled), unchanged == "True")
    assert found["built"] == (2, True) and found["not built"] == (1, False), found  # kernel and launcher, or kernel only
