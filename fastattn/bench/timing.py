"""Timing one zero-argument call: median, interquartile range and every raw sample.

CPU: ``torch.utils.benchmark.Timer.timeit`` over blocks of calls (each raw sample is the
mean of one block).  GPU: CUDA events around each call after a warm-up, with the L2
cache flushed before every timed call by overwriting a buffer larger than any current
card's L2 (as ``triton.testing.do_bench`` does), so no call finds its inputs in L2
left there by the previous one.
"""

from __future__ import annotations

import math
import statistics
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


def _cuda_samples(function: Callable[[], object], calls: int, flush: torch.Tensor) -> list[float]:
    """Times ``calls`` calls one by one, each after an L2 flush that is not timed."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        flush.zero_()
        start.record()
        function()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1000 for start, end in events]


def time_on_cuda(function: Callable[[], object], min_run_time: float) -> Timing:
    """Warms up, estimates the time of a call, then times enough calls to fill ``min_run_time``."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(CUDA_WARMUP_CALLS):
        function()
    torch.cuda.synchronize()
    estimate = statistics.median(_cuda_samples(function, CUDA_MIN_CALLS, flush))
    calls = min(CUDA_MAX_CALLS, max(CUDA_MIN_CALLS, math.ceil(min_run_time / max(estimate, 1e-6))))
    return _summary(_cuda_samples(function, calls, flush))


def time_call(function: Callable[[], object], device_type: str, min_run_time: float) -> Timing:
    return (time_on_cuda if device_type == "cuda" else time_on_cpu)(function, min_run_time)
