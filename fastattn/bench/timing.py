"""Timing one zero-argument call: median, interquartile range and every raw sample.

CPU: ``torch.utils.benchmark.Timer.timeit`` over blocks of calls (each raw sample is the
mean of one block).  GPU: CUDA events around each call after a warm-up, with the L2
cache flushed before every timed call by overwriting a buffer larger than any current
card's L2 (as ``triton.testing.do_bench`` does), so no call finds its inputs in L2
left there by the previous one.  A GPU sample is the call's device time: between the
flush and the start event the GPU spins (``torch.cuda._sleep``) for twice the longest
host time a warm-up call took to enqueue its work, so that the host has queued the whole
call before the start event is reached.  Without that spin a call whose host time
exceeded the flush's (about 60-80 us on an H100) had the GPU idle between its kernels
and was timed as host time, one with less host time as device time.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils import benchmark

CPU_MIN_SAMPLES = 5
CPU_BLOCKS = 10  # blocks of calls per min_run_time
CUDA_WARMUP_CALLS = 5
CUDA_MIN_CALLS = 10
CUDA_MAX_CALLS = 500
L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float
    times_s: list[float]  # the raw samples


def _summary(times: list[float]) -> Timing:
    if len(times) == 1:
        return Timing(times[0], 0.0, times)
    first_quartile, median, third_quartile = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median, third_quartile - first_quartile, times)


def time_on_cpu(function: Callable[[], object], min_run_time: float) -> Timing:
    """Blocks of calls timed by ``torch.utils.benchmark.Timer.timeit``, each block about a
    tenth of ``min_run_time`` (one call when a call is longer), until ``min_run_time`` is
    spent and at least :data:`CPU_MIN_SAMPLES` blocks are taken; a sample is a block's mean.
    (``blocked_autorange`` would first spend 10 ms or more per call sizing its blocks.)"""
    timer = benchmark.Timer(stmt="function()", globals={"function": function}, num_threads=torch.get_num_threads())
    estimate = timer.timeit(number=1).mean
    number = max(1, int(min_run_time / CPU_BLOCKS / max(estimate, 1e-9)))
    times: list[float] = []
    while len(times) < CPU_MIN_SAMPLES or sum(times) * number < min_run_time:
        times.append(timer.timeit(number=number).mean)
    return _summary(times)


def _cuda_samples(function: Callable[[], object], calls: int, flush: torch.Tensor, lead_cycles: int) -> list[float]:
    """Times ``calls`` calls one by one, each after an L2 flush and a spin of
    ``lead_cycles`` GPU clock cycles, neither timed."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        flush.zero_()
        torch.cuda._sleep(lead_cycles)
        start.record()
        function()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1000 for start, end in events]


@functools.cache
def _gpu_cycles_per_second() -> float:
    """The clock ``torch.cuda._sleep`` counts, from one timed spin of 10^7 cycles."""
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1000)


def _host_seconds(function: Callable[[], object]) -> float:
    """The host's time to enqueue one call, from the GPU idle (a call that waits on the
    GPU inside, an ``.item()``, counts that wait too)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    return elapsed


def time_on_cuda(function: Callable[[], object], min_run_time: float) -> Timing:
    """Warms up (measuring the host time of each warm-up call), estimates the device time
    of a call, then times enough calls to fill ``min_run_time`` with their leads."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    function()  # the first call may compile or autotune: not a host time to lead by
    host = max(_host_seconds(function) for _ in range(CUDA_WARMUP_CALLS))
    lead_cycles = math.ceil(2 * host * _gpu_cycles_per_second())
    estimate = statistics.median(_cuda_samples(function, CUDA_MIN_CALLS, flush, lead_cycles))
    sample_seconds = estimate + 2 * host  # each sample's wall time, lead included
    calls = min(CUDA_MAX_CALLS, max(CUDA_MIN_CALLS, math.ceil(min_run_time / max(sample_seconds, 1e-6))))
    return _summary(_cuda_samples(function, calls, flush, lead_cycles))


def time_call(function: Callable[[], object], device_type: str, min_run_time: float) -> Timing:
    return (time_on_cuda if device_type == "cuda" else time_on_cpu)(function, min_run_time)
