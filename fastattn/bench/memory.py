"""Peak memory of one call: CUDA allocator statistics on a GPU, resident memory on a CPU.

GPU: ``max_memory_allocated`` during the call minus what was allocated before it.

CPU: the growth of the resident-set high-water mark during the call, measured in ONE
child process for all the calls of a run (:func:`child_main`, request as JSON on stdin): the high-water mark is reset through ``/proc/self/clear_refs`` before each
call, after a warm-up call, and glibc is told to serve every allocation above 64 KiB with
its own mapping (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set
and one call's leftovers do not hide the next call's peak.  Linux only; elsewhere the
peaks are ``None``.  The torch.compile'd reference is not measured (it would be compiled
a second time in the child).  When the child fails or times out, a warning says so and
the peaks are ``None``: the run's timings still print.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from typing import Callable

import torch

from fastattn.bench.cases import DTYPES, Preset, cases
from fastattn.bench.implementations import implementations, prepare

CHILD_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
CHILD_TIMEOUT_S = 600


def peak_bytes_cuda(call: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def peak_bytes_resident(call: Callable[[], object]) -> int:
    """Resident high-water-mark growth during one call (after a warm-up call)."""
    call()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current VmRSS
    before = _status_bytes("VmRSS")
    call()
    return max(_status_bytes("VmHWM") - before, 0)


def peaks_in_child(preset: Preset, dtype: str, case_names: list[str]) -> dict[tuple[str, str], int | None]:
    """(case name, implementation name) -> peak resident bytes, from one child process."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {}
    request = {"preset": dataclasses.asdict(preset), "dtype": dtype, "cases": case_names, "threads": torch.get_num_threads()}
    try:
        completed = subprocess.run(
            [sys.executable, "-c", "from fastattn.bench import memory; memory.child_main()"],
            input=json.dumps(request), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
            env={**os.environ, **CHILD_ENVIRONMENT},
        )
    except subprocess.TimeoutExpired:
        warnings.warn(f"peak memory not measured: the child process took more than {CHILD_TIMEOUT_S} s", stacklevel=2)
        return {}
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no message"])[-1]
        warnings.warn(f"peak memory not measured: the child process failed: {last_line}", stacklevel=2)
        return {}
    return {(case, name): peak for case, name, peak in json.loads(completed.stdout)}


def _measure(request: dict) -> list[tuple[str, str, int]]:
    torch.set_num_threads(request["threads"])
    dtype = DTYPES[request["dtype"]]
    wanted = set(request["cases"])
    peaks = []
    for case in cases(Preset(**request["preset"])):
        if case.name not in wanted:
            continue
        workload = case.build(case.inputs("cpu", dtype))
        for implementation in implementations(case, workload, "cpu", compile_reference=False):
            call = prepare(case, workload, implementation, dtype)
            try:
                with torch.set_grad_enabled(case.backward):
                    peak = peak_bytes_resident(call)
            except Exception:  # noqa: BLE001 - the parent reports the failure; no peak here
                peak = None
            peaks.append((case.name, implementation.name, peak))
    return peaks


def child_main() -> None:
    """The child process: the request as JSON on stdin, the peaks as JSON on stdout."""
    json.dump(_measure(json.load(sys.stdin)), sys.stdout)
