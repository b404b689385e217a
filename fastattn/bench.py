"""``fastattn bench``: times each op on every backend that can run it.

A *case* is one op at one shape (``attention.additive.multi_query``,
``lstm_cell``, ...).  Each case runs on every backend that is available for the
device and implements the op; CPU timings come from
``torch.utils.benchmark.Timer.blocked_autorange``, GPU timings from CUDA events
after a warm-up.  Every case is a forward pass without autograd.

Two presets: ``quick`` (tiny shapes, seconds in all) and ``full``.  Adding a case
means adding a :class:`Case` to :func:`cases`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence, TextIO

import torch
from torch.utils import benchmark

from fastattn import backends
from fastattn.functional.attention import attention
from fastattn.functional.recurrent import gru_cell, lstm_cell
from fastattn.info import info
from fastattn.nn.recurrent import GRU, LSTM

SCORES = ("dot", "scaled_dot", "general", "additive", "cosine", "location")
DEVICES = ("cpu", "cuda")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
CUDA_WARMUP_CALLS = 3
CUDA_MIN_CALLS = 10
CUDA_MAX_CALLS = 1000


class BenchError(Exception):
    """A benchmark request that cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Preset:
    batch: int
    length: int  # T = S of the attention cases
    dim: int  # D of queries, keys and the additive attention dimension
    hidden: int  # hidden (and input) size of the recurrent cases
    steps: int  # sequence length of the LSTM / GRU layer cases
    min_run_time: float  # seconds spent timing each case on each backend


PRESETS = {
    "quick": Preset(batch=4, length=16, dim=32, hidden=32, steps=16, min_run_time=0.05),
    "full": Preset(batch=32, length=64, dim=256, hidden=256, steps=100, min_run_time=0.5),
}


@dataclass(frozen=True)
class Inputs:
    """Makes the random tensors of a case on one device and dtype, reproducibly."""

    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator

    @classmethod
    def on(cls, device: str, dtype: torch.dtype) -> Inputs:
        return cls(torch.device(device), dtype, torch.Generator().manual_seed(0))

    def random(self, *shape: int) -> torch.Tensor:
        """Normal values scaled by 1/sqrt(last dimension), to keep scores moderate."""
        values = torch.randn(shape, generator=self.generator) / math.sqrt(shape[-1])
        return values.to(self.device, self.dtype)


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # the backends op that the case exercises
    shape: dict[str, int]
    build: Callable[[Inputs], Callable[[], object]]  # inputs -> the call to time


@dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float
    runs: int


@dataclass(frozen=True)
class Result:
    case: str
    op: str
    backend: str
    shape: dict[str, int]
    dtype: str
    device: str
    median_s: float
    iqr_s: float
    runs: int


def _score_parameters(score: str, inputs: Inputs, dim: int, source_length: int) -> dict:
    if score == "general":
        return {"weight": inputs.random(dim, dim)}
    if score == "additive":
        return {
            "w_query": inputs.random(dim, dim),
            "w_key": inputs.random(dim, dim),
            "v": inputs.random(dim),
            "bias": inputs.random(dim),
        }
    if score == "location":
        return {"weight": inputs.random(source_length, dim)}
    return {}


def _attention_case(score: str, layout: str, shape: dict[str, int]) -> Case:
    """``layout`` is ``multi_query`` (query (B, T, D)) or ``decode_step`` (query (B, D))."""

    def build(inputs: Inputs) -> Callable[[], object]:
        batch, source_length, dim = shape["B"], shape["S"], shape["D"]
        query_shape = (batch, shape["T"], dim) if "T" in shape else (batch, dim)
        query = inputs.random(*query_shape)
        keys = inputs.random(batch, source_length, dim)
        parameters = _score_parameters(score, inputs, dim, source_length)
        return lambda: attention(query, keys, score=score, **parameters)

    return Case(f"attention.{score}.{layout}", "attention", shape, build)


def _cell_case(op: str, cell: Callable, gates: int, state_count: int, preset: Preset) -> Case:
    """A torch.nn.LSTMCell / GRUCell-style step with ``gates`` gates and that many states."""
    shape = {"B": preset.batch, "I": preset.hidden, "H": preset.hidden}

    def build(inputs: Inputs) -> Callable[[], object]:
        batch, hidden = preset.batch, preset.hidden
        x = inputs.random(batch, hidden)
        states = tuple(inputs.random(batch, hidden) for _ in range(state_count))
        state = states if state_count > 1 else states[0]
        weights = (
            inputs.random(gates * hidden, hidden),
            inputs.random(gates * hidden, hidden),
            inputs.random(gates * hidden),
            inputs.random(gates * hidden),
        )
        return lambda: cell(x, state, *weights)

    return Case(op, op, shape, build)


def _layer_case(op: str, layer_class: type[torch.nn.Module], preset: Preset) -> Case:
    """A one-layer torch.nn.LSTM / GRU-style module over a whole (T, B, I) sequence."""
    shape = {"T": preset.steps, "B": preset.batch, "I": preset.hidden, "H": preset.hidden}

    def build(inputs: Inputs) -> Callable[[], object]:
        layer = layer_class(preset.hidden, preset.hidden).to(inputs.device, inputs.dtype)
        sequence = inputs.random(preset.steps, preset.batch, preset.hidden)
        return lambda: layer(sequence)

    return Case(op, op, shape, build)


def cases(preset: Preset) -> list[Case]:
    """Every case of the benchmark at the shapes of ``preset``."""
    attention_shapes = {
        "multi_query": {"B": preset.batch, "T": preset.length, "S": preset.length, "D": preset.dim},
        "decode_step": {"B": preset.batch, "S": preset.length, "D": preset.dim},
    }
    attention_cases = [
        _attention_case(score, layout, shape)
        for score in SCORES
        for layout, shape in attention_shapes.items()
    ]
    return attention_cases + [
        _cell_case("lstm_cell", lstm_cell, gates=4, state_count=2, preset=preset),
        _cell_case("gru_cell", gru_cell, gates=3, state_count=1, preset=preset),
        _layer_case("lstm_layer", LSTM, preset),
        _layer_case("gru_layer", GRU, preset),
    ]


def select(all_cases: list[Case], prefixes: Sequence[str]) -> list[Case]:
    """The cases whose names start with one of ``prefixes`` (all of them when empty)."""
    if not prefixes:
        return all_cases
    unknown = [prefix for prefix in prefixes if not any(c.name.startswith(prefix) for c in all_cases)]
    if unknown:
        valid = ", ".join(case.name for case in all_cases)
        raise BenchError(f"unknown op {', '.join(map(repr, unknown))}; valid ops: {valid}")
    return [case for case in all_cases if case.name.startswith(tuple(prefixes))]


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise BenchError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU")


def _can_run(op: str, backend_name: str, device_type: str) -> bool:
    try:
        backends.implementation(op, device_type, backend_name)
    except backends.BackendUnavailableError:
        return False
    return True


def runnable_backends(op: str, device_type: str) -> list[str]:
    """The backends that are available here and implement ``op`` for ``device_type``."""
    return [name for name in backends.BACKENDS if _can_run(op, name, device_type)]


def time_on_cpu(function: Callable[[], object], min_run_time: float) -> Timing:
    timer = benchmark.Timer(
        stmt="function()", globals={"function": function}, num_threads=torch.get_num_threads()
    )
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(measurement.median, measurement.iqr, len(measurement.times) * measurement.number_per_run)


def _cuda_seconds_per_call(function: Callable[[], object], calls: int) -> list[float]:
    """Times ``calls`` calls one by one with CUDA events."""
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(calls)
    ]
    for start, end in events:
        start.record()
        function()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1000 for start, end in events]


def time_on_cuda(function: Callable[[], object], min_run_time: float) -> Timing:
    """Warms up, estimates the time of a call, then times enough calls to fill ``min_run_time``."""
    for _ in range(CUDA_WARMUP_CALLS):
        function()
    torch.cuda.synchronize()
    estimate = statistics.median(_cuda_seconds_per_call(function, CUDA_MIN_CALLS))
    calls = min(CUDA_MAX_CALLS, max(CUDA_MIN_CALLS, math.ceil(min_run_time / max(estimate, 1e-9))))
    times = _cuda_seconds_per_call(function, calls)
    first_quartile, median, third_quartile = statistics.quantiles(times, n=4)
    return Timing(median, third_quartile - first_quartile, calls)


def _time_case(case: Case, backend_name: str, device: str, dtype: str, min_run_time: float) -> Timing:
    timer = time_on_cuda if device == "cuda" else time_on_cpu
    try:
        with torch.no_grad(), backends.backend(backend_name):
            return timer(case.build(Inputs.on(device, DTYPES[dtype])), min_run_time)
    except (TypeError, ValueError) as error:
        raise BenchError(f"{case.name} on backend {backend_name!r} failed: {error}") from error


def choose(preset: str, device: str, dtype: str, ops: Sequence[str] = ()) -> list[Case]:
    """The cases of ``preset`` selected by ``ops`` (name prefixes); raises
    :class:`BenchError` when they cannot run on ``device`` in ``dtype``."""
    check_device(device)
    if dtype not in DTYPES:
        raise BenchError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return select(cases(PRESETS[preset]), ops)


def run(chosen: list[Case], device: str, dtype: str, min_run_time: float) -> list[Result]:
    """Times each case on every backend that runs it, ``min_run_time`` seconds apiece."""
    results = []
    for case in chosen:
        for backend_name in runnable_backends(case.op, device):
            timing = _time_case(case, backend_name, device, dtype, min_run_time)
            results.append(
                Result(case.name, case.op, backend_name, case.shape, dtype, device, **dataclasses.asdict(timing))
            )
    return results


def format_shape(shape: dict[str, int]) -> str:
    return " ".join(f"{name}={size}" for name, size in shape.items())


def report(results: list[Result], preset: str) -> dict:
    """What ``--json`` writes: the machine, the preset and one row per case and backend."""
    return {
        "machine": info(),
        "preset": preset,
        "results": [dataclasses.asdict(result) for result in results],
    }


def open_output(path: str) -> TextIO:
    """Opens a ``--json`` / ``--csv`` file, before the timings, so a bad path fails fast."""
    try:
        return open(path, "w", newline="", encoding="utf-8")
    except OSError as error:
        raise BenchError(f"cannot write {path}: {error.strerror}") from error


def write_json(file: TextIO, results: list[Result], preset: str) -> None:
    json.dump(report(results, preset), file, indent=2)
    file.write("\n")


def write_csv(file: TextIO, results: list[Result]) -> None:
    """One row per result, the shape written as in the table (``B=4 T=16 ...``)."""
    writer = csv.DictWriter(file, fieldnames=[field.name for field in dataclasses.fields(Result)])
    writer.writeheader()
    for result in results:
        writer.writerow({**dataclasses.asdict(result), "shape": format_shape(result.shape)})
