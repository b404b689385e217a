"""Runs the chosen cases: every implementation of each case is checked, timed and measured.

Per case: the workload is built once in the run's dtype; a float64 oracle (the reference
on the same values, rounded through the run's dtype) gives each implementation's max
absolute error over its outputs and, for forward+backward cases, every gradient.  The
tolerance follows the project's rule: 2 x the error of the reference run in the same
dtype, plus 100 machine epsilons times the oracle's largest floating-point magnitude (so a
float64 run, whose reference IS the oracle, still has room for reordered sums).  The
epsilon is the dtype's, or float32's for float16 and bfloat16: there the reference's own
error is the allowance, and 100 of their epsilons (78% of the largest value in bfloat16)
would pass an output of zeros.
Speedups of a row are the other implementations' median times divided by its own.
cuDNN's recurrent layers (the ``torch.nn.LSTM``/``GRU`` peers) run in IEEE float32 for the
whole run, as fastattn's float32 kernels do: torch lets them use TF32 by default, whose
error (1e-2 on a float32 LSTM layer's gradients on an H200) would fail the tolerance.
Baselines (timed parts of the op, such as an LSTM step's recurrent GEMM) are not checked.
A fastattn backend's row (not the reference's) on a case with targets says of each
:class:`~fastattn.bench.cases.Target` the value reached and whether it is met (``None``
where it cannot be told: a failed row, a peer that did not run, a limit the device lacks,
a run in another dtype than the preset's ``targets_dtype``, or a "% of a limit" target
against limits that are not a datasheet's; the last two say so in ``not_judged``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from fastattn.bench import memory
from fastattn.bench.cases import DTYPES, PRESETS, BenchError, Case, Preset, Target, cases, select
from fastattn.bench.implementations import REFERENCE, Implementation, implementations, prepare
from fastattn.bench.machine import Limits
from fastattn.bench.timing import time_call
from fastattn import roofline

DEVICES = ("cpu", "cuda")
EPSILONS_OF_SLACK = 100


@dataclass
class Result:
    case: str
    implementation: str
    kind: str  # "backend", "peer" or "baseline"
    shape: dict[str, int]
    dtype: str
    device: str
    median_s: float | None
    iqr_s: float | None
    runs: int
    max_error: float | None
    tolerance: float | None
    error_ok: bool | None
    peak_bytes: int | None
    work: dict[str, float]  # roofline.Work as a dict
    percent_of_limit: float | None
    bound_by: str | None
    percent_of: dict[str, float] = field(default_factory=dict)  # resource -> % of its limit reached
    targets: list[dict] = field(default_factory=list)  # {"target", "value", "unit", "met"} per Target of the case
    speedup: dict[str, float] = field(default_factory=dict)  # other implementation -> its time / ours
    failure: str | None = None
    times_s: list[float] = field(default_factory=list)


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise BenchError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU")


def choose(preset: Preset, device: str, dtype: str, ops: Sequence[str] = ()) -> list[Case]:
    """The cases of ``preset`` selected by ``ops`` (name prefixes); raises
    :class:`BenchError` when they cannot run on ``device`` in ``dtype``."""
    check_device(device)
    if dtype not in DTYPES:
        raise BenchError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return select(cases(preset), ops)


def preset_named(name: str) -> Preset:
    if name not in PRESETS:
        raise BenchError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]


def max_error(results: list[torch.Tensor], oracle: list[torch.Tensor]) -> float:
    """Largest absolute difference over every tensor; inf when the outputs do not line up."""
    if len(results) != len(oracle) or any(r.shape != o.shape for r, o in zip(results, oracle)):
        return math.inf
    differences = [(r.detach().double() - o.detach().double()).abs().max().item() for r, o in zip(results, oracle) if r.numel()]
    return max(differences, default=0.0)


def _largest_magnitude(tensors: list[torch.Tensor]) -> float:
    """Over the floating-point tensors only: token ids and positions are no scale of error."""
    return max((t.detach().double().abs().max().item() for t in tensors if t.numel() and t.is_floating_point()),
               default=0.0)


def tolerance(reference_error: float, dtype: torch.dtype, oracle: list[torch.Tensor]) -> float:
    """2 x the reference's error, plus EPSILONS_OF_SLACK epsilons (float32's at most) of the
    oracle's largest magnitude (at least 1)."""
    epsilon = min(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return 2 * reference_error + EPSILONS_OF_SLACK * epsilon * max(1.0, _largest_magnitude(oracle))


@dataclass
class _Measured:
    implementation: Implementation
    timing: object = None
    error: float | None = None
    peak_bytes: int | None = None
    failure: str | None = None


def _failure(error: Exception) -> str:
    """An exception as one line: its type and its message's first line."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"


def _measure_case(case: Case, device: str, dtype: torch.dtype, min_run_time: float,
                  compile_reference: bool) -> tuple[list[_Measured], float | None]:
    """Each implementation's timing, error and (on a GPU) peak memory; and the tolerance.
    A case whose workload or float64 oracle cannot be built (a GPU out of memory) is one
    failed reference row, with no tolerance."""
    try:
        oracle_workload = case.build(case.inputs(device, torch.float64, rounded_to=dtype))
        with torch.set_grad_enabled(case.backward):
            oracle = prepare(case, oracle_workload, Implementation(REFERENCE, "backend"), dtype)()
            workload = case.build(case.inputs(device, dtype))
    except Exception as error:  # noqa: BLE001 - one case that cannot be set up must not stop the run
        return [_Measured(Implementation(REFERENCE, "backend"), failure=f"building the case failed: {_failure(error)}")], None
    with torch.set_grad_enabled(case.backward):
        measured = []
        for implementation in implementations(case, workload, device, compile_reference):
            entry = _Measured(implementation)
            try:
                call = prepare(case, workload, implementation, dtype)
                outputs = call()  # also the warm-up (and the compile)
                if implementation.kind != "baseline":
                    entry.error = max_error(outputs, oracle)
                entry.timing = time_call(call, device, min_run_time)
                if device == "cuda":
                    entry.peak_bytes = memory.peak_bytes_cuda(call)
            except Exception as error:  # noqa: BLE001 - one failing implementation must not stop the run
                entry.failure = _failure(error)
            measured.append(entry)
    reference_error = next((m.error for m in measured if m.implementation.name == REFERENCE), 0.0) or 0.0
    return measured, tolerance(reference_error, dtype, oracle)


def _target_outcome(target: Target, median: float | None, speedup: dict[str, float], percent_of: dict[str, float],
                    not_judged: str | None) -> dict:
    """``not_judged``: why the run cannot judge its targets (then "met" is None and the
    value is shown for what it is), or None."""
    value = target.value(median, speedup, percent_of)
    outcome = {"target": target.describe(), "value": value, "unit": target.unit,
               "met": None if value is None or not_judged else bool(target.met_by(value))}
    return {**outcome, "not_judged": not_judged} if not_judged else outcome


def _why_not_judged(target: Target, dtype: str, targets_dtype: str, limits: Limits) -> str | None:
    if dtype != targets_dtype:
        return f"the targets are for {targets_dtype}, this run is {dtype}"
    if target.resource is not None and not limits.from_datasheet:
        return "the limit is a measured copy, not the device's datasheet peak"
    return None


def _results_of(case: Case, measured: list[_Measured], tolerance: float | None, device: str, dtype: str,
                limits: Limits, targets_dtype: str) -> list[Result]:
    work = case.work(DTYPES[dtype].itemsize)
    medians = {m.implementation.name: m.timing.median_s for m in measured if m.timing is not None}
    results = []
    for m in measured:
        median = medians.get(m.implementation.name)
        percent, bound = roofline.percent_of_limit(work, limits.device, dtype, median) if median else (None, None)
        percent_of = roofline.percent_of_each(work, limits.device, dtype, median) if median else {}
        speedup = {other: time / median for other, time in medians.items() if other != m.implementation.name} if median else {}
        ours = m.implementation.kind == "backend" and m.implementation.name != REFERENCE
        targets = [
            _target_outcome(target, median, speedup, percent_of, _why_not_judged(target, dtype, targets_dtype, limits))
            for target in case.targets
        ] if ours else []
        results.append(Result(
            case=case.name, implementation=m.implementation.name, kind=m.implementation.kind,
            shape=case.shape, dtype=dtype, device=device,
            median_s=median, iqr_s=m.timing.iqr_s if m.timing else None,
            runs=len(m.timing.times_s) if m.timing else 0,
            max_error=m.error, tolerance=tolerance,
            error_ok=None if m.error is None else bool(m.error <= tolerance),
            peak_bytes=m.peak_bytes, work=vars(work).copy(),
            percent_of_limit=percent, bound_by=bound, percent_of=percent_of, targets=targets, speedup=speedup,
            failure=m.failure, times_s=list(m.timing.times_s) if m.timing else [],
        ))
    return results


@contextlib.contextmanager
def ieee_float32_recurrent_layers():
    """cuDNN's RNNs in IEEE float32 (no TF32) for a block, through the older
    ``torch.backends.cudnn.allow_tf32`` (which sets cuDNN's convolutions too; the bench has
    none): torch 2.11 and 2.13 refuse to say whether cuDNN may use TF32 (the check behind the
    ``allow_tf32`` getter) after ``torch.backends.cudnn.rnn.fp32_precision = "ieee"`` alone,
    the convolutions' and RNNs' settings then differing."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def run(chosen: list[Case], preset: Preset, device: str, dtype: str, limits: Limits, *,
        compile_reference: bool, measure_memory: bool, progress: bool = True,
        after_each_case: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Every chosen case on every implementation; peak memory on a CPU from one child process.
    ``after_each_case`` gets the results so far after every case (to save them as they come)."""
    results = []
    with ieee_float32_recurrent_layers(), \
            tqdm(chosen, desc="fastattn bench", unit="case", disable=None if progress else True, leave=False) as bar:
        for case in bar:
            bar.set_postfix_str(case.name)
            measured, allowed = _measure_case(case, device, DTYPES[dtype], preset.min_run_time, compile_reference)
            results += _results_of(case, measured, allowed, device, dtype, limits, preset.targets_dtype)
            if after_each_case is not None:
                after_each_case(results)
    if measure_memory and device == "cpu":
        peaks = memory.peaks_in_child(preset, dtype, [case.name for case in chosen])
        for result in results:
            result.peak_bytes = peaks.get((result.case, result.implementation))
    return results
