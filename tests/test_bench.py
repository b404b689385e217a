"""``fastattn bench`` end to end on the tiny preset, and the parts it is made of."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn import backends
from fastattn.bench import PRESETS, cases
from fastattn.bench.implementations import COMPILED_REFERENCE, flatten, runnable_backends
from fastattn.bench.memory import peak_bytes_resident
from fastattn.bench.run import max_error
from fastattn.bench.timing import CPU_MIN_SAMPLES, time_on_cpu

REPOSITORY = Path(__file__).resolve().parents[1]
TINY_CASES = cases(PRESETS["tiny"])
PEERS = {
    "attention.dot.": "torch sdpa",
    "attention.scaled_dot.": "torch sdpa",
    "lstm_cell.": "torch.nn.LSTMCell",
    "gru_cell.": "torch.nn.GRUCell",
    "lstm_layer.": "torch.nn.LSTM",
    "gru_layer.": "torch.nn.GRU",
    "greedy_decoding.cuda_graph.": "eager reference",
}


def plain_environment() -> dict:
    """The environment a user runs ``fastattn bench`` in: without the test suite's
    TRITON_INTERPRET (under which Triton kernels would be benchmarked on the CPU,
    interpreted, for minutes)."""
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


def runnable_here(case) -> list[str]:
    """The backends a plain ``fastattn bench`` process runs ``case`` on (interpreted Triton excluded)."""
    return [name for name in runnable_backends(case, "cpu") if not (name == "triton" and os.environ.get("TRITON_INTERPRET"))]


def run_bench(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastattn", "bench", "--device", "cpu", *arguments],
        cwd=REPOSITORY, env=plain_environment(), capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny-preset run of the whole benchmark on the CPU, with every output file."""
    folder = tmp_path_factory.mktemp("bench")
    paths = {kind: folder / f"bench.{kind}" for kind in ("json", "csv", "png")}
    completed = run_bench("--preset", "tiny", "--json", str(paths["json"]), "--csv", str(paths["csv"]),
                          "--plot", str(paths["png"]))
    return completed, json.loads(paths["json"].read_text()), paths


def test_tiny_run_succeeds(tiny_run):
    completed, report, _ = tiny_run
    failures = [(r["case"], r["implementation"], r["failure"], r["max_error"], r["tolerance"])
                for r in report["results"] if r["failure"] or not r["error_ok"]]
    assert failures == []
    assert completed.returncode == 0, completed.stderr
    assert "attention.additive.multi_query.forward_backward" in completed.stdout


def test_every_case_runs_on_every_available_backend_and_its_peers(tiny_run):
    _, report, _ = tiny_run
    rows = {(r["case"], r["implementation"]) for r in report["results"]}
    assert len(rows) == len(report["results"])
    expected = set()
    for case in TINY_CASES:
        assert runnable_here(case), case.name
        expected |= {(case.name, backend) for backend in runnable_here(case)}
        expected |= {(case.name, peer) for prefix, peer in PEERS.items() if case.name.startswith(prefix)}
    assert rows == expected
    if backends.unavailable_reason("cpu") is None:
        assert {case.name for case in TINY_CASES} <= {case for case, name in rows if name == "cpu"}


def test_every_row_has_finite_numbers_errors_under_tolerance_and_raw_timings(tiny_run):
    _, report, _ = tiny_run
    for row in report["results"]:
        where = (row["case"], row["implementation"])
        assert row["median_s"] > 0 and math.isfinite(row["median_s"]), where
        assert row["iqr_s"] >= 0 and math.isfinite(row["iqr_s"]), where
        assert len(row["times_s"]) == row["runs"] >= CPU_MIN_SAMPLES, where
        assert min(row["times_s"]) <= row["median_s"] <= max(row["times_s"]), where
        assert 0 <= row["max_error"] <= row["tolerance"] < 1e-3, where
        assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] >= 0, where
        assert 0 < row["percent_of_limit"] and row["bound_by"] == "memory", where
        others = {r["implementation"] for r in report["results"] if r["case"] == row["case"]} - {row["implementation"]}
        assert set(row["speedup"]) == others, where
        for other, ratio in row["speedup"].items():
            other_row = next(r for r in report["results"] if r["case"] == row["case"] and r["implementation"] == other)
            assert ratio == pytest.approx(other_row["median_s"] / row["median_s"]), where


def test_json_describes_the_machine_versions_and_limits(tiny_run):
    _, report, _ = tiny_run
    machine = report["machine"]
    assert machine["cpu_cores"] >= 1 and machine["cpu_model"]
    assert machine["gpu"] is None and machine["torch"] == torch.__version__
    assert report["limits"]["measured_copy_bandwidth"] > 0
    assert report["limits"]["bandwidth"] == report["limits"]["measured_copy_bandwidth"]
    assert report["preset"]["name"] == "tiny" and report["compile_reference"] is False


def test_csv_and_png_are_written(tiny_run):
    _, report, paths = tiny_run
    with paths["csv"].open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["case"], r["implementation"]) for r in rows] == [(r["case"], r["implementation"]) for r in report["results"]]
    assert json.loads(rows[0]["times_s"]) == report["results"][0]["times_s"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compiled_reference_is_a_peer_when_asked(tmp_path):
    path = tmp_path / "bench.json"
    completed = run_bench("--preset", "tiny", "--compile", "--no-memory", "--ops", "lstm_cell.forward",
                          "--json", str(path))
    rows = {r["implementation"]: r for r in json.loads(path.read_text())["results"]}
    assert completed.returncode == 0, completed.stderr
    assert rows[COMPILED_REFERENCE]["error_ok"] and rows[COMPILED_REFERENCE]["failure"] is None
    assert rows[COMPILED_REFERENCE]["peak_bytes"] is None  # not measured (see fastattn.bench.memory)


def test_max_error_is_the_largest_absolute_difference():
    reference = [torch.zeros(3), torch.ones(2, 2)]
    assert max_error([torch.tensor([0.0, -0.25, 0.0]), torch.ones(2, 2) + 0.5], reference) == 0.5
    assert max_error([torch.zeros(3)], reference) == math.inf
    assert max_error([torch.zeros(4), torch.ones(2, 2)], reference) == math.inf
    assert math.isnan(max_error([torch.tensor([0.0, math.nan, 0.0]), torch.ones(2, 2)], reference))


def test_cpu_timer_takes_enough_samples_of_a_slow_call():
    slow = lambda: torch.ones(300, 300) @ torch.ones(300, 300)  # noqa: E731
    timing = time_on_cpu(slow, min_run_time=1e-6)
    assert len(timing.times_s) >= CPU_MIN_SAMPLES
    assert min(timing.times_s) <= timing.median_s <= max(timing.times_s)


def test_peak_resident_memory_sees_a_large_temporary():
    size = 64 * 2**20
    peak = peak_bytes_resident(lambda: torch.ones(size // 4).sum())
    assert 0.95 * size <= peak < 3 * size


@pytest.mark.parametrize("case", [c for c in TINY_CASES if not c.name.startswith(("decoder_step", "greedy"))], ids=lambda c: c.name)
def test_roofline_bytes_are_the_bytes_of_the_case_tensors(case):
    """An ideal kernel reads each input once and writes each output once (3x inputs +
    2x outputs with the backward): the counts must match the tensors the case builds."""
    workload = case.build(case.inputs("cpu", torch.float32))
    with torch.no_grad():
        outputs = flatten(workload.run())
    input_bytes = sum(leaf.numel() * leaf.element_size() for leaf in workload.leaves)
    output_bytes = sum(output.numel() * output.element_size() for output in outputs)
    expected = 3 * input_bytes + 2 * output_bytes if case.backward else input_bytes + output_bytes
    assert case.work(4).bytes == expected
