"""``fastattn bench`` end to end on the tiny preset, and the parts it is made of."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastattn import backends, roofline
from fastattn.bench import PRESETS, cases, run
from fastattn.bench.cases import DECODE_BANDWIDTH_FROM, EAGER_DECODING, FLASH_PEER, GEMM_BASELINE, REFERENCE, SCORES, Target, _torch_sdpa, select
from fastattn.bench import implementations
from fastattn.bench.implementations import COMPILED_REFERENCE, flatten, runnable_backends
from fastattn.bench import machine
from fastattn.bench.machine import Limits
from fastattn.bench import memory
from fastattn.bench.memory import peak_bytes_resident
from fastattn.bench.output import format_table, write_plot
from fastattn.bench.run import Result, max_error, tolerance
from fastattn.bench.timing import CPU_MIN_SAMPLES, time_on_cpu, time_on_cuda
from fastattn.ops.triton_launch import float32_matmul_precision

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_tolerance_is_twice_the_reference_error_and_refuses_zeros(dtype):
    """The slack is 100 epsilons of float32 at most: 100 of bfloat16's are 78% of the largest
    output, which passed an output of zeros."""
    oracle = [torch.linspace(-0.3, 0.3, 50, dtype=torch.float64)]
    reference_error = max_error([oracle[0].to(dtype)], oracle)
    allowed = tolerance(reference_error, dtype, oracle)
    assert allowed == pytest.approx(2 * reference_error + 100 * torch.finfo(torch.float32).eps)
    assert max_error([torch.zeros(50)], oracle) > allowed


def test_integer_outputs_do_not_scale_the_tolerance():
    """Token ids and positions are no magnitude of an error (a greedy decoding's ids of ~1000
    made its float32 slack 1000 times too wide)."""
    outputs = [torch.full((3,), 2.5, dtype=torch.float64)]
    assert tolerance(0.0, torch.float32, [*outputs, torch.tensor([983, 7])]) == tolerance(0.0, torch.float32, outputs)
    assert tolerance(0.0, torch.float32, outputs) == pytest.approx(100 * torch.finfo(torch.float32).eps * 2.5)


@pytest.mark.parametrize("query_shape", [(3, 5, 8), (3, 8)])
def test_the_torch_sdpa_peer_runs_a_fused_kernel(query_shape):
    """On 3-D tensors torch's scaled_dot_product_attention runs its math path only; the peer
    passes one head (4-D), and torch picks its fused kernel."""
    query, keys = torch.randn(*query_shape), torch.randn(3, 6, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        context = _torch_sdpa(query, keys, 0.5)
    names = {event.name for event in profile.events()}
    assert "aten::scaled_dot_product_attention" in names
    assert "aten::_scaled_dot_product_attention_math" not in names
    rows = query if query.dim() == 3 else query.unsqueeze(1)
    expected = torch.softmax(rows @ keys.transpose(1, 2) * 0.5, dim=-1) @ keys
    torch.testing.assert_close(context, expected if query.dim() == 3 else expected.squeeze(1))


def test_the_plot_draws_backends_peers_and_baselines(tmp_path):
    """A target case's baseline row (the recurrent GEMM alone) has its own colour."""
    rows = [Result(case="lstm_cell.forward", implementation=name, kind=kind, shape={}, dtype="float32", device="cpu",
                   median_s=1e-5, iqr_s=0.0, runs=1, max_error=None, tolerance=None, error_ok=None, peak_bytes=None,
                   work={}, percent_of_limit=None, bound_by=None, speedup={REFERENCE: 2.0})
            for name, kind in (("cpu", "backend"), ("torch.nn.LSTMCell", "peer"), (GEMM_BASELINE, "baseline"))]
    path = tmp_path / "plot.png"
    write_plot(str(path), rows, "three kinds")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_case_that_cannot_be_built_is_one_failed_row_and_the_run_goes_on():
    """Building the workload or the float64 oracle (a GPU out of memory) used to stop the
    whole run with a traceback."""
    def out_of_memory(inputs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore lines")

    chosen = [case for case in TINY_CASES if case.name in ("lstm_cell.forward", "gru_cell.forward")]
    broken = dataclasses.replace(chosen[0], build=out_of_memory)
    limits = Limits(roofline.cpu_limits(1e10), 1e10, "test limits", from_datasheet=False)
    results = run([broken, chosen[1]], PRESETS["tiny"], "cpu", "float32", limits, compile_reference=False,
                  measure_memory=False, progress=False)
    (failed,) = [r for r in results if r.case == broken.name]
    assert failed.implementation == REFERENCE and failed.tolerance is None and failed.error_ok is None
    assert failed.failure == "building the case failed: RuntimeError: CUDA out of memory. Tried to allocate 8.00 GiB"
    assert {r.implementation for r in results if r.case == chosen[1].name} >= {REFERENCE, "torch.nn.GRUCell"}
    assert all(r.failure is None for r in results if r.case == chosen[1].name)
    assert "FAILED" in format_table(results)


def test_cpu_timer_takes_enough_samples_of_a_slow_call():
    slow = lambda: torch.ones(300, 300) @ torch.ones(300, 300)  # noqa: E731
    timing = time_on_cpu(slow, min_run_time=1e-6)
    assert len(timing.times_s) >= CPU_MIN_SAMPLES
    assert min(timing.times_s) <= timing.median_s <= max(timing.times_s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_sample_is_the_device_time_however_long_the_host_takes():
    """A call that spends 3 ms on the host before one small kernel is timed at its kernel: the
    GPU spins through the host's time before the start event.  (Timed from the flush alone,
    the GPU waited for the host and the sample was the 3 ms.)"""
    x = torch.randn(2**20, device="cuda")

    def slow_host():
        time.sleep(0.003)
        return x.mul_(1.0)

    assert time_on_cuda(slow_host, min_run_time=0.05).median_s < 0.001


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the peak-memory child runs on Linux only")
def test_a_failed_peak_memory_child_warns_and_leaves_the_peaks_unknown(monkeypatch):
    """It used to raise after every case had run, so that no table printed."""
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback ...\nMemoryError: out of memory")
    monkeypatch.setattr(memory.subprocess, "run", lambda *arguments, **keywords: failed)
    with pytest.warns(UserWarning, match="peak memory not measured: the child process failed: MemoryError: out of memory"):
        assert memory.peaks_in_child(PRESETS["tiny"], "float32", ["lstm_cell.forward"]) == {}


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


TINY_TARGETS = dataclasses.replace(PRESETS["tiny"], targets=True, decode_lengths=(5, DECODE_BANDWIDTH_FROM), head_dims=(4, 6),
                                   additive_batch=2, targets_dtype="float32")


def test_gpu_preset_holds_exactly_the_targets_of_issues_4_and_6():
    by_name = {case.name: case for case in cases(PRESETS["gpu"])}
    decode = {f"attention.{score}.decode_step.b64_s{keys}_d512.forward": keys for score in SCORES for keys in (64, 1024, 4096)}
    multi_query = {f"attention.scaled_dot.multi_query.b64_t512_s512_d{dim}.forward_backward" for dim in (64, 128)}
    additive, cell = "attention.additive.multi_query.b16_t512_s512_d128.forward", "lstm_cell.b64_h1024.forward"
    layers = {f"{layer}_layer.t100_b64_h1024.forward": module for layer, module in (("lstm", "LSTM"), ("gru", "GRU"))}
    greedy = {f"greedy_decoding.cuda_graph.batch_{batch}.forward": batch for batch in (1, 64)}
    assert set(by_name) == set(decode) | multi_query | {additive, cell} | set(layers) | set(greedy)
    assert list(by_name)[-2:] == list(greedy)  # last: a CUDA graph capture per backend to set up
    for name, batch in greedy.items():  # at the full preset's decoding sizes
        assert by_name[name].targets == (Target(10.0, peer=EAGER_DECODING),)
        assert by_name[name].shape == {"B": batch, "S": 64, "H": 256, "tokens": 20, "V": 1000}
    for name, keys in decode.items():
        bandwidth = [Target(85.0, resource="memory")] if keys >= 1024 else []
        assert list(by_name[name].targets) == bandwidth + [Target(3.0, peer=REFERENCE)], name
    for name in multi_query:
        assert by_name[name].backward and by_name[name].targets == (Target(1.0, peer=FLASH_PEER),)
    assert by_name[additive].targets == (Target(60.0, resource="special functions"), Target(5.0, peer=COMPILED_REFERENCE))
    assert by_name[cell].targets == (Target(1 / 1.5, peer=GEMM_BASELINE),) and by_name[cell].shape == {"B": 64, "I": 1024, "H": 1024}
    for name, module in layers.items():  # forward only: the targets step has 60 s on the GPU machine
        assert by_name[name].targets == (Target(microseconds_per_step=5.0, steps=100), Target(1.0, peer=f"torch.nn.{module}"))
        assert not by_name[name].backward and by_name[name].shape == {"T": 100, "B": 64, "I": 1024, "H": 1024}
    assert [name for name, case in by_name.items() if case.compilable] == [additive]  # the one compiled peer


def test_a_target_names_one_peer_one_resource_or_a_time_per_step():
    with pytest.raises(ValueError, match="exactly one"):
        Target(1.0)
    with pytest.raises(ValueError, match="exactly one"):
        Target(1.0, peer=REFERENCE, resource="memory")
    with pytest.raises(ValueError, match="exactly one"):
        Target(1.0, peer=REFERENCE, microseconds_per_step=5.0)
    with pytest.raises(ValueError, match="a minimum exactly when"):
        Target(peer=REFERENCE)
    with pytest.raises(ValueError, match="a minimum exactly when"):
        Target(1.0, microseconds_per_step=5.0)


def test_a_time_target_judges_the_median_per_step():
    target = Target(microseconds_per_step=5.0, steps=100)
    assert target.describe() == "<= 5 us per step" and target.unit == " us"
    assert target.value(4e-4, {}, {}) == pytest.approx(4.0) and target.met_by(4.0) and target.met_by(5.0)
    assert not target.met_by(5.01) and target.value(None, {}, {}) is None


@pytest.fixture(scope="module")
def tiny_targets_run():
    """The tiny target cases run in this process, on the backends of a plain ``fastattn bench``
    (interpreted Triton left out: minutes) with the peak-memory child in a plain environment."""
    limits = Limits(roofline.cpu_limits(1e10), 1e10, "test limits", from_datasheet=True)  # judged as a datasheet's
    chosen = cases(TINY_TARGETS)
    plain_backends = {case.name: runnable_here(case) for case in chosen}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(implementations, "runnable_backends", lambda case, device_type: plain_backends[case.name])
        patch.delenv("TRITON_INTERPRET", raising=False)
        results = run(chosen, TINY_TARGETS, "cpu", "float32", limits, compile_reference=False, measure_memory=True, progress=False)
    return chosen, results


def test_target_cases_run_on_the_cpu_with_their_peers_and_baseline(tiny_targets_run):
    chosen, results = tiny_targets_run
    assert [(r.case, r.implementation) for r in results if r.failure or r.error_ok is False] == []
    rows = {(r.case, r.implementation): r for r in results}
    for case in chosen:
        assert {(case.name, backend) for backend in runnable_here(case)} <= set(rows), case.name
    flash = [r for r in results if r.implementation == FLASH_PEER]
    assert len(flash) == 2 and all(r.error_ok for r in flash)
    (gemm,) = [r for r in results if r.implementation == GEMM_BASELINE]
    assert gemm.kind == "baseline" and gemm.max_error is None and gemm.error_ok is None and gemm.median_s > 0
    assert all(isinstance(r.peak_bytes, int) for r in results)  # the memory child rebuilds the target preset


def test_target_outcomes_are_the_row_ratios_and_percentages(tiny_targets_run):
    chosen, results = tiny_targets_run
    targets = {case.name: case.targets for case in chosen}
    for r in results:
        ours = r.kind == "backend" and r.implementation != REFERENCE
        assert [t["target"] for t in r.targets] == ([t.describe() for t in targets[r.case]] if ours else []), (r.case, r.implementation)
        assert set(r.percent_of) == {"memory"}  # a CPU's only limit
        assert r.percent_of["memory"] == pytest.approx(r.percent_of_limit)
        for target, outcome in zip(targets[r.case], r.targets):
            if target.peer or target.resource:
                expected = r.speedup.get(target.peer) if target.peer else r.percent_of.get(target.resource)
                assert outcome["met"] == (None if expected is None else expected >= target.minimum)
            else:
                expected = r.median_s * 1e6 / target.steps
                assert outcome["met"] == (expected <= target.microseconds_per_step)
            assert outcome["value"] == expected, (r.case, outcome)
            assert outcome["unit"] == target.unit
    judged = {t["target"]: t for r in results for t in r.targets}
    assert judged[">= 85% of the memory limit"]["value"] is not None  # the S = 1024 decode step
    assert judged[">= 5x vs reference-compiled"]["met"] is None  # not compiled in this run
    assert judged[">= 60% of the special functions limit"]["met"] is None  # no such limit on a CPU
    assert judged["<= 5 us per step"]["value"] > 0 and judged[">= 1x vs torch.nn.GRU"]["value"] > 0  # the layers
    table = format_table(results)
    assert "targets (issues 4 and 6):" in table and ">= 1x vs torch sdpa (flash)" in table and "<= 5 us per step" in table


@pytest.mark.parametrize("case", [c for c in cases(TINY_TARGETS) if not c.name.startswith("greedy")], ids=lambda c: c.name)
def test_roofline_bytes_of_the_target_cases(case):
    test_roofline_bytes_are_the_bytes_of_the_case_tensors(case)


def test_targets_are_not_judged_in_another_dtype_than_theirs():
    """The issues state their targets in bfloat16: a float32 run of them shows the values
    and says why it judges none, rather than printing met / NOT MET for another dtype."""
    preset = dataclasses.replace(TINY_TARGETS, targets_dtype="bfloat16")
    chosen = select(cases(preset), ["lstm_cell"])
    limits = Limits(roofline.cpu_limits(1e10), 1e10, "test limits")
    results = run(chosen, preset, "cpu", "float32", limits, compile_reference=False, measure_memory=False, progress=False)
    outcomes = [outcome for r in results for outcome in r.targets]
    assert outcomes and all(o["met"] is None and o["value"] > 0 for o in outcomes)
    assert {o["not_judged"] for o in outcomes} == {"the targets are for bfloat16, this run is float32"}
    assert "not judged: the targets are for bfloat16, this run is float32" in format_table(results)


def test_a_percent_of_a_measured_copy_judges_no_target():
    """An unknown card (or a CPU) is rated by its measured copy bandwidth: "85% of the
    memory limit" against it is shown, not judged, as the issues mean the datasheet's."""
    chosen = select(cases(TINY_TARGETS), [f"attention.dot.decode_step.b2_s{DECODE_BANDWIDTH_FROM}_d6"])
    limits = Limits(roofline.cpu_limits(1e10), 1e10, "measured copy only")
    results = run(chosen, TINY_TARGETS, "cpu", "float32", limits, compile_reference=False, measure_memory=False, progress=False)
    outcomes = {o["target"]: o for r in results for o in r.targets}
    memory, reference = outcomes[">= 85% of the memory limit"], outcomes[">= 3x vs reference"]
    assert memory["met"] is None and memory["value"] > 0
    assert memory["not_judged"] == "the limit is a measured copy, not the device's datasheet peak"
    assert reference["met"] is not None and "not_judged" not in reference


def test_gpu_preset_runs_from_the_command_line(tmp_path):
    path = tmp_path / "bench-targets.json"
    completed = run_bench("--preset", "gpu", "--ops", "lstm_cell", "--no-memory", "--json", str(path))
    assert completed.returncode == 0, completed.stderr
    assert "lstm_cell.b64_h1024.forward" in completed.stdout and ">= 0.667x vs recurrent GEMM alone" in completed.stdout
    report = json.loads(path.read_text())
    assert report["preset"]["name"] == "gpu" and report["preset"]["decode_lengths"] == [64, 1024, 4096]
    rows = {r["implementation"]: r for r in report["results"]}
    assert rows[GEMM_BASELINE]["kind"] == "baseline" and rows["cpu"]["targets"][0]["value"] > 0


def test_the_printed_report_rounds_before_it_picks_a_unit():
    from fastattn.bench.output import BYTE_UNITS, TIME_UNITS, _scaled

    assert _scaled(0.0009997, TIME_UNITS) == "1 ms" and _scaled(0.000123456, TIME_UNITS) == "123 us"
    assert _scaled(1023.9 * 2**10, BYTE_UNITS) == "1 MiB" and _scaled(7, BYTE_UNITS) == "7 B"


@pytest.mark.parametrize("precision, float32_rate", [("ieee", 66.9e12), ("tf32", 494.7e12)])
def test_a_known_card_rates_float32_matrix_work_as_torch_runs_it(monkeypatch, precision, float32_rate):
    """float32 at the CUDA cores' peak by default (torch's float32 matmuls and the Triton
    kernels' IEEE dots), at the TF32 tensor cores' when torch allows TF32."""
    monkeypatch.setattr(machine, "copy_bandwidth", lambda device: 4.32e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *arguments: "NVIDIA H200")
    with float32_matmul_precision(precision):
        limits = machine.limits("cuda")
    assert limits.from_datasheet and limits.device.bandwidth == 4.8e12
    assert limits.device.flops["float32"] == pytest.approx(float32_rate)
    assert "measured copy reaches 90% of its datasheet bandwidth" in limits.note and "implausible" not in limits.note


def test_an_unlisted_card_is_rated_by_its_measured_copy(monkeypatch):
    monkeypatch.setattr(machine, "copy_bandwidth", lambda device: 3.5e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *arguments: "NVIDIA H100 NVL")
    limits = machine.limits("cuda")
    assert not limits.from_datasheet and limits.device.bandwidth == 3.5e12 and limits.device.flops == {}
    assert "not in fastattn.roofline.KNOWN_GPUS" in limits.note


def test_recurrent_peers_run_cudnn_in_ieee_float32_and_the_setting_is_restored():
    """torch lets cuDNN's RNNs use TF32 in float32 by default (their error failed the
    tolerance on an H200); the bench turns it off for its run, as fastattn's own float32
    kernels run, and puts the user's setting back afterwards.  torch's check of the setting
    (what cuDNN's RNNs read) must not raise during the run."""
    cudnn = torch.backends.cudnn
    seen = []
    chosen = select(cases(PRESETS["tiny"]), ["lstm_cell"])[:1]
    limits = Limits(roofline.cpu_limits(1e10), 1e10, "test limits")
    before = cudnn.allow_tf32
    cudnn.allow_tf32 = True
    try:
        run(chosen, PRESETS["tiny"], "cpu", "float32", limits, compile_reference=False, measure_memory=False,
            progress=False, after_each_case=lambda results: seen.append(torch._C._get_cudnn_allow_tf32()))
        assert seen == [False]
        assert cudnn.allow_tf32 is True
    finally:
        cudnn.allow_tf32 = before
