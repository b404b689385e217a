"""Compile every Triton kernel of ``kernels/`` for sm_90 (H100/H200) without a GPU.

The public Triton ops run on CPU tensors with ``Launcher.__call__`` replaced by a recorder
(benchmarks/triton_compile_problems.py: the bench presets' shapes, every score kind and
mask, the gpu tests' and benches' launches, float32 (IEEE and TF32 dots), float16 and
bfloat16), so each launch's kernel, arguments and constexprs are what a GPU run passes; then
each distinct launch is compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``,
with the signature, constexprs and specialization attributes Triton's own launcher would
derive, once per config a GPU would launch.  Modes: every tuned config the kernel's prune
keeps (default); ``--untuned``, the configs each launch compiles with tuning off
(FASTATTN_TRITON_AUTOTUNE=0, unless its problem turns tuning on as its gpu test does);
``--gpu-check``, that for gpu_check.sh's launches in the order it runs them (its warm-up of
Triton's cache), with each kernel's C launcher where Triton compiles one per kernel
signature (triton 3.6, the GPU machine's: gcc, about a second each, at the first launch
otherwise; it links against the driver's libcuda); ``--quick``, the untuned config of one
problem per launcher and dtype.  ptxas ships with Triton; no CUDA driver is called.  Needs
TRITON_INTERPRET unset.

One line per compile: ok (registers and stack bytes (spills) per thread, dynamic shared
memory) or FAILED with the error's message; a kernel whose shared memory exceeds what one
sm_90 block may have fails too, as Triton would refuse to load it.  Exit status: the number
of failures.

    python benchmarks/triton_compile_check.py [--quick | --untuned | --gpu-check] [--dtype bfloat16] [--jobs 16]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from unittest import mock

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the kernels must be JIT functions, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import driver as nvidia_driver  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastattn.kernels  # noqa: E402
from benchmarks.triton_compile_problems import ALL_PROBLEMS, GPU_CHECK_PROBLEMS, QUICK_PROBLEMS  # noqa: E402
from fastattn.ops.triton_launch import Launcher, RepeatedLaunch, autotuning, float32_matmul_precision  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# sm_90's opt-in shared memory per block (H100/H200): Triton refuses to load a kernel above it.
SHARED_MEMORY_LIMIT = 232448
# Name -> (dtype, torch.backends.cuda.matmul.fp32_precision while the launches are recorded),
# which float32's dots follow (fastattn.ops.triton_launch.dot_precision).
DTYPES = {
    "float32": (torch.float32, "ieee"),
    "float32-tf32": (torch.float32, "tf32"),
    "float16": (torch.float16, "ieee"),
    "bfloat16": (torch.bfloat16, "ieee"),
}


@dataclasses.dataclass
class Launch:
    """One kernel launch as the ops ask for it, before a config is chosen."""

    problem: str
    dtype: str
    launcher: Launcher
    arguments: tuple
    constexprs: dict
    tuned: bool  # FASTATTN_TRITON_AUTOTUNE at the launch: it compiles every config the prune keeps


@dataclasses.dataclass
class Compile:
    launch: Launch
    config: triton.Config
    build_c_launcher: bool = False  # also the kernel's C launcher, where Triton compiles one per signature

    def describe(self) -> str:
        config = self.config
        blocks = ",".join(f"{name}={value}" for name, value in config.kwargs.items())
        return (f"{self.launch.launcher.kernel.__name__} [{blocks} w{config.num_warps} s{config.num_stages}] "
                f"{self.launch.dtype} ({self.launch.problem})")


def _stand_in(value):
    """A one-element tensor of the same dtype (CPU allocations are 64-byte aligned, as a
    fresh CUDA tensor's 256): the launch is only compiled, never run."""
    return torch.empty(1, dtype=value.dtype) if isinstance(value, torch.Tensor) else value


def record_launches(problems, dtype_names) -> list[Launch]:
    """The launches of each problem in each of ``dtype_names`` it runs in, in that order,
    with tuning off (FASTATTN_TRITON_AUTOTUNE=0, gpu_check.sh's) unless the problem turns it on."""
    launches = []

    def record(launcher, grid, *arguments, **constexprs):
        launches.append(Launch(problem.name, dtype_name, launcher, tuple(map(_stand_in, arguments)), constexprs,
                               autotuning()))
        for argument in arguments:  # indices the kernel would have written: in bounds for what reads them next
            if isinstance(argument, torch.Tensor) and not argument.is_floating_point():
                argument.zero_()

    def each_launch_recorded(launch, *tensors):  # a layer's steps, a memoized forward: every launch through record
        launch.launcher(launch.grid, *tensors, *launch.scalars, **launch.constexprs)

    with mock.patch.object(Launcher, "__call__", record), mock.patch.object(RepeatedLaunch, "__call__", each_launch_recorded), \
            mock.patch.dict(os.environ, {"FASTATTN_TRITON_AUTOTUNE": "0"}):
        for problem in problems:
            for dtype_name in dtype_names:
                if problem.dtypes is not None and dtype_name not in problem.dtypes:
                    continue
                dtype, precision = DTYPES[dtype_name]
                with float32_matmul_precision(precision):
                    problem.run(dtype)
    return launches


def _binding(launch: Launch, config: triton.Config, backend):
    """(signature, constexprs, attributes, options) as Triton's launcher derives them."""
    kernel = launch.launcher.kernel
    keywords = {**launch.constexprs, **config.kwargs, "num_warps": config.num_warps,
                "num_stages": config.num_stages, "debug": False}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.arguments, **keywords)
    options, signature, constexprs, attributes = kernel._pack_args(backend, keywords, bound, specialization, options)
    return signature, constexprs, attributes, options


def compiles_to_run(launches: list[Launch], mode: str) -> list[Compile]:
    """Every distinct (kernel specialization, config) of ``mode``, in launch order: "tuned",
    every config the prune keeps; "untuned", the configs the launch compiles (the config an
    untuned launch takes, or every config the prune keeps where the launch tunes); "quick",
    the untuned config for the first launch of each launcher and dtype."""
    backend = make_backend(TARGET)
    chosen, seen = [], set()
    for launch in launches:
        if mode == "quick":
            key = (id(launch.launcher), launch.dtype)
            if key not in seen:
                seen.add(key)
                chosen.append(Compile(launch, launch.launcher.untuned_config(launch.arguments, launch.constexprs)))
            continue
        if mode == "tuned" or launch.tuned:
            configs = launch.launcher.pruned_configs(launch.arguments, launch.constexprs)
        else:
            configs = [launch.launcher.untuned_config(launch.arguments, launch.constexprs)]
        for config in configs:
            signature, constexprs, attributes, options = _binding(launch, config, backend)
            key = (launch.launcher.kernel.__name__, str(signature), str(constexprs), str(attributes), str(options))
            if key not in seen:
                seen.add(key)
                chosen.append(Compile(launch, config))
    return chosen


def _resources(cubin: bytes) -> str:
    """Registers and stack frame (spills) per thread, from cuobjdump (shipped with Triton)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name],
                                capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return f"regs {found[1]}, stack {found[2]} B" if found else "regs ?"


def _error_line(error: Exception) -> str:
    """The error's first line; for a Triton CompilationError ("at L:C:", the source up to the
    offending line, a caret, the message) the location, the offending line and the message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    message = getattr(error, "error_message", None)
    if hasattr(error, "node") and lines and lines[0].startswith("at "):
        caret = next((index for index, line in enumerate(lines) if line.strip() == "^"), 0)
        first = f"{lines[0]} {lines[caret - 1].strip()}" if caret > 1 else lines[0]
        if message:
            first += f" {message.splitlines()[0]}"
    else:
        first = lines[0].strip() if lines else ""
    return f"{type(error).__name__}: {first}"


# Triton before the generic launcher of 3.9 (3.6: the GPU machine's) compiles a C launcher
# for each kernel signature at its first launch, into the same cache.
COMPILES_LAUNCHERS = hasattr(nvidia_driver, "make_launcher")


def compile_one(job: Compile) -> tuple[bool, str]:
    """(compiled, the report line's detail)."""
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signature, constexprs, attributes, options = _binding(job.launch, job.config, make_backend(TARGET))
            source = ASTSource(job.launch.launcher.kernel, signature, constexprs, attributes)
            compiled = triton.compile(source, target=TARGET, options=options.__dict__)
            if job.build_c_launcher and COMPILES_LAUNCHERS:
                nvidia_driver.CudaLauncher(source, compiled.metadata)  # what the JIT's first launch builds
    except Exception as error:  # noqa: BLE001 - every failure is reported, one line each
        return False, _error_line(error)
    seconds = time.perf_counter() - started
    shared = compiled.metadata.shared
    if shared > SHARED_MEMORY_LIMIT:
        return False, f"OutOfResources: shared memory {shared} B, above sm_90's {SHARED_MEMORY_LIMIT} B a block"
    return True, f"{_resources(compiled.asm['cubin'])}, shared {shared} B, {seconds:.1f} s"


_JOBS: list[Compile] = []  # the forked workers' copy


def _compile_index(index: int) -> tuple[bool, str]:
    return compile_one(_JOBS[index])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="one problem per launcher and dtype, untuned config only")
    modes.add_argument("--untuned", action="store_true",
                       help="every problem, the configs its launches compile with tuning off (untuned config only)")
    modes.add_argument("--gpu-check", action="store_true",
                       help="gpu_check.sh's launches (its gpu tests, then its benches), as --untuned")
    parser.add_argument("--dtype", choices=tuple(DTYPES), action="append", help="only these dtypes (default: all)")
    parser.add_argument("--kernel", help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles in parallel (default: CPU count)")
    parser.add_argument("--seconds", type=float, help="start no compile after this many seconds")
    arguments = parser.parse_args(argv)
    mode = "quick" if arguments.quick else "untuned" if arguments.untuned or arguments.gpu_check else "tuned"
    problems = QUICK_PROBLEMS if arguments.quick else GPU_CHECK_PROBLEMS if arguments.gpu_check else ALL_PROBLEMS
    launches = record_launches(problems, arguments.dtype or tuple(DTYPES))
    _JOBS[:] = [dataclasses.replace(job, build_c_launcher=arguments.gpu_check) for job in compiles_to_run(launches, mode)
                if arguments.kernel is None or arguments.kernel in job.launch.launcher.kernel.__name__]
    print(f"triton {triton.__version__}, torch {torch.__version__}, kernels of {os.path.dirname(fastattn.kernels.__file__)}: "
          f"{len(_JOBS)} compiles for sm_90", flush=True)
    started, done, failures = time.monotonic(), 0, 0
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max(1, arguments.jobs), mp_context=context) as pool:
        futures = [pool.submit(_compile_index, index) for index in range(len(_JOBS))]
        for job, future in zip(_JOBS, futures):
            if arguments.seconds is not None and time.monotonic() - started > arguments.seconds and not future.done():
                pool.shutdown(wait=True, cancel_futures=True)
                print(f"stopped after {arguments.seconds:.0f} s: {done} of {len(_JOBS)} done, {failures} failed")
                return min(failures, 255)
            compiled, detail = future.result()
            done += 1
            failures += not compiled
            print(f"{'ok' if compiled else 'FAILED'}  {job.describe()}: {detail}", flush=True)
    print(f"{len(_JOBS) - failures} compiled, {failures} failed")
    return min(failures, 255)


if __name__ == "__main__":
    sys.exit(main())
