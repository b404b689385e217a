"""``fastattn profile OP``: one benchmark case under ``torch.profiler``, as a Chrome trace.

The case is built exactly as ``fastattn bench`` builds it (same names, shapes from a
preset with optional overrides), run on one backend a few times to warm up, then
``iterations`` times inside the profiler (CPU activity, plus CUDA kernels on a GPU) and
an NVTX range named :data:`NVTX_RANGE`.  The trace (open it in chrome://tracing or
https://ui.perfetto.dev) shows the ``fastattn::`` ops and, on a GPU, the kernels they
launch, under their own names.  Without ``trace`` the profiler is not started, so an
external profiler (Nsight Compute through ``benchmarks/ncu.sh``) sees the bare calls.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from fastattn import backends
from fastattn.bench.cases import DTYPES, BenchError, Case, Preset, cases
from fastattn.bench.cases import matches as case_matches
from fastattn.bench.implementations import Implementation, prepare
from fastattn.data.vocabulary import SPECIALS

NVTX_RANGE = "fastattn.profile"
WARMUP_ITERATIONS = 3
SHAPE_FIELDS = ("batch", "length", "dim", "hidden", "steps", "tokens", "vocabulary")
# The smallest size each field takes (the zoo's Seq2Seq needs its special tokens in the vocabulary).
SMALLEST_SIZE = {"vocabulary": len(SPECIALS)}


def find_case(name: str, preset: Preset) -> Case:
    """The case called ``name`` (a leading part of its dotted name is enough when it is unique)."""
    all_cases = cases(preset)
    matches = [case for case in all_cases if case_matches(case, name)]
    if len(matches) != 1:
        problem = "unknown op" if not matches else "ambiguous op"
        listed = ", ".join(case.name for case in (matches or all_cases))
        raise BenchError(f"{problem} {name!r}; {'it matches' if matches else 'valid ops'}: {listed}")
    return matches[0]


def resized(preset: Preset, **sizes: int | None) -> Preset:
    """``preset`` with the given sizes replaced (``None``: kept); each must be an int of at
    least its :data:`SMALLEST_SIZE` (1 unless listed there)."""
    changes = {}
    for name, size in sizes.items():
        if size is None:
            continue
        if name not in SHAPE_FIELDS:
            raise BenchError(f"unknown size {name!r}; sizes: {', '.join(SHAPE_FIELDS)}")
        smallest = SMALLEST_SIZE.get(name, 1)
        if not isinstance(size, int) or size < smallest:
            raise BenchError(f"--{name} must be an integer of at least {smallest}, got {size!r}")
        changes[name] = size
    return dataclasses.replace(preset, **changes)


def _profiled_call(case: Case, device: str, dtype: str, backend_name: str) -> Callable[[], object]:
    for op in case.ops:
        try:
            backends.implementation(op, device, backend_name)
        except backends.BackendUnavailableError as error:
            raise BenchError(f"--backend {backend_name}: {error}") from error
    workload = case.build(case.inputs(device, DTYPES[dtype]))
    return prepare(case, workload, Implementation(backend_name, "backend"), DTYPES[dtype])


def profile(case: Case, *, device: str, dtype: str, backend_name: str, iterations: int,
            trace: str | None) -> str:
    """Runs the case; writes the trace when asked; returns the profiler's summary table (or a line)."""
    if iterations < 1:
        raise BenchError(f"--iterations must be a positive integer, got {iterations}")
    call = _profiled_call(case, device, dtype, backend_name)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.set_grad_enabled(case.backward):
        for _ in range(WARMUP_ITERATIONS):
            call()
        synchronize()
        if trace is None:
            _run_in_nvtx_range(call, iterations, device)
            synchronize()
            return f"ran {case.name} {iterations} times on backend {backend_name!r} without the profiler"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            with torch.profiler.record_function(f"{case.name} [{backend_name}]"):
                _run_in_nvtx_range(call, iterations, device)
                synchronize()
    profiler.export_chrome_trace(trace)
    sort_by = "device_time_total" if device == "cuda" else "cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=15)


def _run_in_nvtx_range(call: Callable[[], object], iterations: int, device: str) -> None:
    if device == "cuda":
        torch.cuda.nvtx.range_push(NVTX_RANGE)
    for _ in range(iterations):
        call()
    if device == "cuda":
        torch.cuda.nvtx.range_pop()
