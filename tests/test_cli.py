"""The command line (``fastattn info``, ``fastattn bench``, bad ``profile`` flags) and ``fastattn.info()``."""

import csv
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn import backends
from fastattn.bench import implementations as bench_implementations
from fastattn.cli import main
from fastattn.info import info

REPOSITORY = Path(__file__).resolve().parents[1]
INFO_KEYS = {
    "version", "python", "torch", "triton", "backends", "cuda_arch_list", "extension",
    "cpu_capability", "cpu_kernels", "device", "backend_setting", "auto",
}
bench_run = importlib.import_module("fastattn.bench.run")  # the module (fastattn.bench.run is also its run function)
BENCH_CASES = ("attention.additive.decode_step.forward", "lstm_cell.forward")


def test_info_describes_versions_backends_and_auto_choices():
    description = info()
    assert set(description) == INFO_KEYS
    assert description["torch"] == torch.__version__
    assert set(description["backends"]) == set(backends.BACKENDS)
    assert description["backends"]["reference"] == {"available": True, "reason": None}
    for name, entry in description["backends"].items():
        assert entry["available"] == (entry["reason"] is None), name
    assert description["backend_setting"] == backends.current_backend()
    assert set(description["auto"]["cpu"]) == set(backends.OPS)
    assert ("cuda" in description["auto"]) == torch.cuda.is_available()
    assert description["cuda_arch_list"] is None or isinstance(description["cuda_arch_list"], list)


def test_info_follows_the_backend_setting():
    with backends.backend("reference"):
        assert info()["backend_setting"] == "reference"


def test_python_m_fastattn_info_json_prints_the_info_dict():
    completed = subprocess.run(
        [sys.executable, "-m", "fastattn", "info", "--json"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert set(json.loads(completed.stdout)) == INFO_KEYS


def test_info_text_lists_every_entry_and_backend(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for word in ("version", "torch", "triton", "cuda_arch_list", "backend_setting", *backends.BACKENDS):
        assert word in text
    assert "auto picks on cpu:" in text


def _check_results(results, device="cpu"):
    assert {row["case"] for row in results} == set(BENCH_CASES)
    pairs = [(row["case"], row["implementation"]) for row in results]
    assert len(pairs) == len(set(pairs))
    assert {(case, "reference") for case in BENCH_CASES} <= set(pairs)
    assert ("lstm_cell.forward", "torch.nn.LSTMCell") in pairs
    for row in results:
        assert row["kind"] == "peer" or backends.unavailable_reason(row["implementation"]) is None
        assert row["device"] == device and row["dtype"] == "float32"
        assert math.isfinite(float(row["median_s"])) and float(row["median_s"]) > 0
        assert math.isfinite(float(row["iqr_s"])) and float(row["iqr_s"]) >= 0
        assert int(row["runs"]) > 0


def _bench(*arguments):
    """``fastattn bench`` in process, on the tiny preset (tests patch it to the reference only)."""
    return main(["bench", "--preset", "tiny", "--device", "cpu", "--no-memory", *arguments])


def test_bench_writes_one_json_row_per_case_and_implementation(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_implementations, "runnable_backends", lambda case, device_type: ["reference"])
    path = tmp_path / "bench.json"
    assert _bench("--json", str(path), "--ops", *BENCH_CASES) == 0
    report = json.loads(path.read_text())
    assert report["preset"]["name"] == "tiny"
    assert INFO_KEYS <= set(report["machine"])
    _check_results(report["results"])
    assert report["results"][0]["shape"] == {"B": 2, "S": 5, "D": 6}
    table = capsys.readouterr().out
    assert all(case in table for case in BENCH_CASES)
    assert "torch.nn.LSTMCell" in table and "% of limit" in table


def test_a_bench_cut_short_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    """--json and --csv are rewritten (atomically) after every case: a run killed by a time
    limit (gpu_check's steps) keeps its finished cases, where a file opened at the start and
    written at the end was left empty."""
    monkeypatch.setattr(bench_implementations, "runnable_backends", lambda case, device_type: ["reference"])
    measure_case = bench_run._measure_case
    calls = []

    def killed_on_the_second_case(case, *arguments):
        calls.append(case.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a timeout's signal does to the run
        return measure_case(case, *arguments)

    monkeypatch.setattr(bench_run, "_measure_case", killed_on_the_second_case)
    paths = {kind: tmp_path / f"bench.{kind}" for kind in ("json", "csv")}
    with pytest.raises(KeyboardInterrupt):
        _bench("--json", str(paths["json"]), "--csv", str(paths["csv"]), "--ops", *BENCH_CASES)
    report = json.loads(paths["json"].read_text())
    assert (report["cases_done"], report["cases_chosen"]) == (1, 2)
    assert {row["case"] for row in report["results"]} == {calls[0]}
    with paths["csv"].open(newline="") as file:
        assert {row["case"] for row in csv.DictReader(file)} == {calls[0]}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench.csv", "bench.json"]  # no temporary left


def test_a_bench_that_fails_before_its_first_case_writes_no_file(tmp_path, capsys):
    path = tmp_path / "bench.json"
    _fails_cleanly(["bench", "--preset", "tiny", "--device", "cpu", "--ops", "no_such_op", "--json", str(path)], capsys, "unknown op")
    assert not path.exists()


def test_bench_writes_csv_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_implementations, "runnable_backends", lambda case, device_type: ["reference"])
    path = tmp_path / "bench.csv"
    assert _bench("--csv", str(path), "--ops", *BENCH_CASES) == 0
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    _check_results(rows)
    assert json.loads(rows[-1]["shape"]) == {"B": 2, "I": 7, "H": 7}


def test_bench_exits_non_zero_when_an_implementation_fails(capsys, monkeypatch):
    monkeypatch.setattr(bench_implementations, "runnable_backends", lambda case, device_type: ["reference"])

    def broken(*arguments):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(torch.nn.LSTMCell, "forward", broken)
    assert _bench("--ops", "lstm_cell.forward") == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "kernel exploded" in captured.out
    assert "lstm_cell.forward on torch.nn.LSTMCell" in captured.err


def _fails_cleanly(argv, capsys, expected_message):
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert expected_message in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_bench_rejects_an_unknown_op_and_lists_the_valid_ones(capsys):
    _fails_cleanly(["bench", "--quick", "--ops", "attention.nonsense"], capsys, "unknown op 'attention.nonsense'")


def test_bench_refuses_quick_with_a_preset(capsys):
    """--quick is the quick preset: with another --preset it had silently won."""
    _fails_cleanly(["bench", "--quick", "--preset", "tiny"], capsys, "--preset: not allowed with argument --quick")


def test_unknown_op_message_names_the_valid_cases(capsys):
    main(["bench", "--quick", "--ops", "lstm_cel1"])
    assert "attention.additive.multi_query.forward_backward" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so --device cuda is valid")
def test_bench_on_cuda_without_a_gpu_fails_cleanly(capsys):
    _fails_cleanly(["bench", "--quick", "--device", "cuda"], capsys, "no CUDA GPU")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trian"], "invalid choice: 'trian'"),
        ([], "required"),
        (["bench", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["bench", "--preset", "huge"], "invalid choice: 'huge'"),
        (["profile"], "required: op"),
        (["profile", "lstm_cell.forward", "--batch", "two"], "invalid int value: 'two'"),
        (["info", "--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_bad_command_lines_fail_cleanly(argv, message, capsys):
    _fails_cleanly(argv, capsys, message)


def test_unwritable_output_file_fails_cleanly(tmp_path, capsys):
    missing_folder = tmp_path / "missing" / "bench.json"
    _fails_cleanly(
        ["bench", "--preset", "tiny", "--device", "cpu", "--ops", "lstm_cell", "--json", str(missing_folder)],
        capsys, "cannot write",
    )


def test_plot_to_an_unwritable_path_fails_before_timing(tmp_path, capsys):
    _fails_cleanly(
        ["bench", "--preset", "tiny", "--device", "cpu", "--ops", "lstm_cell", "--plot", str(tmp_path / "no" / "x.png")],
        capsys, "cannot write",
    )


def test_plot_in_a_format_matplotlib_lacks_fails_before_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fastattn.bench.run", lambda *arguments, **keywords: pytest.fail("the cases ran"))
    _fails_cleanly(
        ["bench", "--preset", "tiny", "--device", "cpu", "--ops", "lstm_cell", "--plot", str(tmp_path / "x.jpgx")],
        capsys, "--plot writes the formats",
    )
    assert not (tmp_path / "x.jpgx").exists()


@pytest.mark.parametrize("trace", ["missing/trace.json", "."], ids=["missing-folder", "a-folder"])
def test_profile_trace_to_an_unwritable_path_fails_before_the_run(tmp_path, capsys, trace):
    _fails_cleanly(["profile", "lstm_cell.forward", "--preset", "tiny", "--trace", str(tmp_path / trace)],
                   capsys, "cannot write")
