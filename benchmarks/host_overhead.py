"""Where the time of one call of a bench case goes: the host (Python, dispatch, launches)
or the device (kernels).  For each implementation of each named case of a preset:

- ``synced``: the median wall time of a call followed by a synchronize (what the bench's
  event timer sees, near enough);
- ``host``: the wall time of 200 calls issued back to back, then one synchronize, per
  call; when it matches ``synced`` the host is the bound, not the kernels;
- ``kernels``: the device kernels one call launches and their summed device time
  (torch.profiler, CUDA only);
- the 12 functions of most own time over 100 calls (cProfile), for the fastattn rows.

    python benchmarks/host_overhead.py --device cuda --dtype bfloat16 \\
        attention.dot.decode_step.b64_s64_d512.forward lstm_cell.b64_h1024.forward

``--stub-triton-launches`` (CPU, TRITON_INTERPRET unset) measures the Triton backend's
Python on a machine without a GPU: the backend takes CPU tensors and Triton's
``JITFunction.run`` does nothing, so its row is everything a GPU call does on the host up
to Triton's own launch (fastattn's front end, the op's dispatch and body, the launcher),
untuned (FASTATTN_TRITON_AUTOTUNE=0, as gpu_check.sh runs its benches).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastattn.bench.cases import DTYPES, PRESETS, cases  # noqa: E402
from fastattn.bench.implementations import implementations, prepare  # noqa: E402

HOST_CALLS = 200
PROFILED_CALLS = 100


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synced_median(call, device: str, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_per_call(call, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        call()
    issued = time.perf_counter() - start
    synchronize(device)
    return issued / HOST_CALLS


def kernels_per_call(call, device: str, calls: int = 10) -> tuple[float, float]:
    """(kernels launched per call, their device time per call in seconds)."""
    if device != "cuda":
        return float("nan"), float("nan")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            call()
        synchronize(device)
    kernels = [event for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    device_time = sum(getattr(event, "device_time", 0.0) for event in kernels) * 1e-6
    return len(kernels) / calls, device_time / calls


def own_time_table(call, device: str, rows: int = 12) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(PROFILED_CALLS):
        call()
    synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler)
    entries = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:rows]
    lines = []
    for (path, line, function), (_, calls, own, cumulative, _) in entries:
        where = "/".join(Path(path).parts[-2:]) if path != "~" else "built-in"
        lines.append(f"      {own / PROFILED_CALLS * 1e6:8.1f} us own {cumulative / PROFILED_CALLS * 1e6:8.1f} us cum "
                     f"{calls / PROFILED_CALLS:6.1f}/call  {where}:{line} {function}")
    return "\n".join(lines)


def stub_triton_launches() -> None:
    """The Triton backend on CPU tensors, its kernels' launches replaced by nothing."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("host_overhead: --stub-triton-launches needs TRITON_INTERPRET unset (JIT functions, not interpreted)")
    from triton.runtime.jit import JITFunction

    from fastattn.ops import triton_backend

    JITFunction.run = lambda self, *arguments, **keywords: None
    os.environ["FASTATTN_TRITON_AUTOTUNE"] = "0"  # untuned launches, as gpu_check.sh's benches: tuning times kernels
    triton_backend.register(("cpu",))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", help="case names of the preset")
    parser.add_argument("--preset", default="gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--stub-triton-launches", action="store_true",
                        help="CPU only: time the Triton backend's Python, its launches stubbed out")
    arguments = parser.parse_args()
    if arguments.stub_triton_launches:
        if arguments.device != "cpu":
            parser.error("--stub-triton-launches is for --device cpu (a GPU runs the real launches)")
        stub_triton_launches()
    by_name = {case.name: case for case in cases(PRESETS[arguments.preset])}
    unknown = [name for name in arguments.cases if name not in by_name]
    if unknown:
        parser.error(f"unknown cases {unknown}; the preset has {sorted(by_name)}")
    dtype = DTYPES[arguments.dtype]
    for name in arguments.cases:
        case = by_name[name]
        print(f"{name} ({arguments.device}, {arguments.dtype})", flush=True)
        with torch.set_grad_enabled(case.backward):
            workload = case.build(case.inputs(arguments.device, dtype))
            for implementation in implementations(case, workload, arguments.device, compile_reference=False):
                call = prepare(case, workload, implementation, dtype)
                for _ in range(3):
                    call()  # warm-up: compiles, caches
                synced = synced_median(call, arguments.device)
                host = host_per_call(call, arguments.device)
                kernels, kernel_time = kernels_per_call(call, arguments.device)
                print(f"  {implementation.name:22s} synced {synced * 1e6:8.1f} us  host {host * 1e6:8.1f} us  "
                      f"kernels {kernels:5.1f}/call  {kernel_time * 1e6:8.1f} us on the device", flush=True)
                if implementation.kind == "backend":
                    print(own_time_table(call, arguments.device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
