"""benchmarks/readme_tables.py: README's performance tables from committed bench results."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from fastattn.bench.output import report
from fastattn.bench.run import Result

REPOSITORY = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_tables", REPOSITORY / "benchmarks" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_tables)


def _row(case, implementation, kind, median, **changes):
    row = Result(
        case=case, implementation=implementation, kind=kind, shape={"B": 2}, dtype="float32", device="cpu",
        median_s=median, iqr_s=median / 10 if median else None, runs=5, max_error=1e-7, tolerance=1e-6, error_ok=True,
        peak_bytes=3 * 2**20, work={"bytes": 1, "flops": 1, "transcendentals": 0},
        percent_of_limit=12.0, bound_by="memory", times_s=[median] * 5,
    )
    return dataclasses.replace(row, **changes)


def _write_run(folder: Path, rows: list[Result], cpu_model="Test CPU", gpu=None, file="bench.json", preset_name="full",
               cases_chosen=None) -> None:
    for row in rows:
        row.speedup = {o.implementation: o.median_s / row.median_s for o in rows
                       if o.case == row.case and o is not row and o.median_s and row.median_s}
    machine = {"cpu_model": cpu_model, "cpu_cores": 2, "torch_threads": 2, "gpu": gpu, "torch": "2.99"}
    limits = {"note": "a note about limits", "measured_copy_bandwidth": 1e10}
    preset = {"name": preset_name, "batch": 32, "length": 64, "dim": 256, "hidden": 256, "steps": 100, "tokens": 20, "vocabulary": 1000}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_text(json.dumps(report(rows, preset, machine, limits, compile_reference=True, cases_chosen=cases_chosen)))


def _readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text(f"# title\n\n## Performance\n\n{readme_tables.BEGIN}\nold table\n{readme_tables.END}\n\n## Next\n")
    return path


def test_without_results_both_tables_say_so(tmp_path):
    tables = readme_tables.render(tmp_path / "results")
    assert "No CPU results are committed yet" in tables and "No GPU results are committed yet" in tables


def test_latest_cpu_run_and_every_gpu_card_get_a_table(tmp_path):
    results = tmp_path / "results"
    _write_run(results / "2026-01-01-cpu-2core", [_row("lstm_cell.forward", "reference", "backend", 1.0)], cpu_model="Old CPU")
    _write_run(results / "2026-02-01-cpu-2core", [
        _row("lstm_cell.forward", "reference", "backend", 4e-3),
        _row("lstm_cell.forward", "cpu", "backend", 2e-3),
        _row("lstm_cell.forward", "reference-compiled", "peer", 3e-3, peak_bytes=None),
        _row("lstm_cell.forward", "torch.nn.LSTMCell", "peer", 1e-3),
        _row("gru_cell.forward", "reference", "backend", 4e-3),
        _row("gru_cell.forward", "cpu", "backend", None, failure="RuntimeError: boom"),
    ])
    _write_run(results / "2026-03-01-h200", [_row("lstm_cell.forward", "reference", "backend", 5e-5)], gpu="NVIDIA H200")
    (results / "2026-04-01-a100").mkdir()  # no bench.json: ignored
    readme = _readme(tmp_path)
    assert readme_tables.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert readme_tables.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert readme_tables.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    assert text.startswith("# title\n\n## Performance\n\n") and text.endswith(f"{readme_tables.END}\n\n## Next\n")
    assert "old table" not in text and "Old CPU" not in text
    assert "### CPU: Test CPU, 2 cores, measured 2026-02-01" in text
    assert "### GPU: NVIDIA H200, measured 2026-03-01" in text and "No GPU results" not in text
    assert "| lstm_cell.forward | cpu | 2 ms | 200 µs | 2.00x | 1.50x | 0.50x (torch.nn.LSTMCell) | 1.0e-07 | 3 MiB | 12% (memory) |" in text
    assert "| gru_cell.forward | cpu | failed: RuntimeError: boom |" in text
    assert "| lstm_cell.forward | reference | 50 µs |" in text  # a GPU run with the reference only


def test_a_gpu_run_with_targets_gets_a_targets_table(tmp_path):
    results = tmp_path / "results"
    _write_run(results / "2026-03-01-h200", [_row("lstm_cell.forward", "reference", "backend", 5e-5)], gpu="NVIDIA H200")
    case = "lstm_cell.b64_h1024.forward"
    targets = [{"target": ">= 0.667x vs recurrent GEMM alone", "value": 0.5, "met": False},
               {"target": ">= 60% of the special functions limit", "value": None, "met": None}]
    _write_run(results / "2026-03-01-h200", [
        _row(case, "reference", "backend", 4e-5),
        _row(case, "cuda", "backend", 2e-5, targets=targets),
        _row(case, "recurrent GEMM alone", "baseline", 1e-5, max_error=None, error_ok=None),
    ], gpu="NVIDIA H200", file=readme_tables.TARGETS_FILE, preset_name="gpu")
    text = readme_tables.render(results)
    gpu_table, targets_table = text.split("### GPU targets of issues 4 and 6: NVIDIA H200, measured 2026-03-01")
    assert "### GPU: NVIDIA H200, measured 2026-03-01" in gpu_table and "| targets |" not in gpu_table
    assert "`fastattn bench` gpu preset" in targets_table and "bench-targets.json" in targets_table
    assert f"| {case} | cuda | 20 µs | 2 µs | 2.00x | – | 0.50x (recurrent GEMM alone) | 1.0e-07 | 3 MiB | 12% (memory) | " \
           ">= 0.667x vs recurrent GEMM alone: 0.5 **not met**; >= 60% of the special functions limit: – unknown |" in targets_table


def test_a_bench_file_left_empty_by_a_killed_run_is_skipped_and_the_targets_still_render(tmp_path, capsys):
    """A gpu_check step killed by its time limit before its first case wrote nothing: the
    folder's other file still gives its table, and an unreadable file is named, not fatal."""
    results = tmp_path / "results"
    case = "lstm_cell.b64_h1024.forward"
    _write_run(results / "2026-03-01-h200", [_row(case, "reference", "backend", 4e-5), _row(case, "cuda", "backend", 2e-5)],
               gpu="NVIDIA H200", file=readme_tables.TARGETS_FILE, preset_name="gpu")
    (results / "2026-03-01-h200" / "bench.json").write_text("")
    (results / "2026-03-02-cpu-2core").mkdir()
    (results / "2026-03-02-cpu-2core" / "bench.json").write_text("{")
    text = readme_tables.render(results)
    assert "### GPU targets of issues 4 and 6: NVIDIA H200, measured 2026-03-01" in text
    assert "### GPU: NVIDIA H200" not in text and "No CPU results are committed yet" in text
    assert f"| {case} | cuda | 20 µs |" in text
    warnings = capsys.readouterr().err
    assert "skipping" in warnings and "2026-03-01-h200/bench.json" in warnings and "2026-03-02-cpu-2core/bench.json" in warnings


def test_a_run_cut_short_says_how_many_cases_finished(tmp_path):
    results = tmp_path / "results"
    _write_run(results / "2026-03-01-h200", [_row("lstm_cell.forward", "reference", "backend", 5e-5)], gpu="NVIDIA H200",
               cases_chosen=7)
    assert "The run was cut short: 1 of its 7 cases finished." in readme_tables.render(results)
    _write_run(results / "2026-03-01-h200", [_row("lstm_cell.forward", "reference", "backend", 5e-5)], gpu="NVIDIA H200")
    assert "cut short" not in readme_tables.render(results)


def test_a_target_the_run_could_not_judge_says_why(tmp_path):
    results = tmp_path / "results"
    case = "lstm_cell.b64_h1024.forward"
    targets = [{"target": ">= 0.667x vs recurrent GEMM alone", "value": 0.5, "met": None,
                "not_judged": "the targets are for bfloat16, this run is float32"}]
    _write_run(results / "2026-03-01-h200", [_row(case, "reference", "backend", 4e-5), _row(case, "cuda", "backend", 2e-5, targets=targets)],
               gpu="NVIDIA H200", file=readme_tables.TARGETS_FILE, preset_name="gpu")
    assert (">= 0.667x vs recurrent GEMM alone: 0.5 not judged (the targets are for bfloat16, this run is float32) |"
            in readme_tables.render(results))


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="marker"):
        readme_tables.main(["--results", str(tmp_path), "--readme", str(readme)])


def test_committed_readme_matches_the_committed_results():
    assert readme_tables.main(["--check"]) == 0, "run python benchmarks/readme_tables.py and commit README.md"


@pytest.mark.parametrize("seconds, shown", [(0.0009997, "1 ms"), (0.000123456, "123 µs"), (2.5, "2.5 s"), (3e-10, "0.3 ns")])
def test_times_are_rounded_before_their_unit_is_picked(seconds, shown):
    assert readme_tables._time(seconds) == shown


@pytest.mark.parametrize("count, shown", [(1023.9 * 2**10, "1 MiB"), (3 * 2**20, "3 MiB"), (512, "512 B"), (None, "–")])
def test_byte_counts_are_rounded_before_their_unit_is_picked(count, shown):
    assert readme_tables._bytes(count) == shown


@pytest.mark.parametrize("value, shown", [(7.43, "7.4%"), (58.2, "58%"), (99.7, "100%"), (112.4, "112%"), (0.012, "0.012%")])
def test_percentages_keep_two_digits_and_never_an_exponent(value, shown):
    assert readme_tables.percent_text(value) == shown
