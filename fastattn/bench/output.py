"""What a run prints and writes: the terminal table, JSON, CSV and the PNG speedup chart.

JSON holds the machine (CPU model, cores, GPU, versions), the limits the roofline
column uses, the preset and one row per case and implementation with every raw timing;
CSV holds the same rows, with the nested fields (shape, work, speedups, raw timings)
written as compact JSON in their cells.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Callable, Sequence, TextIO

from fastattn.bench.cases import BenchError
from fastattn.bench.implementations import REFERENCE
from fastattn.bench.run import Result

TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))
BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def _scaled(value: float, units) -> str:
    value = float(f"{value:.3g}")  # rounded before the unit is picked: 999.7 us is 1 ms, not 1e+03 us
    for unit, factor in units:
        if abs(value) >= factor:
            break
    return f"{value / factor:.3g} {unit}"


def percent_text(value: float) -> str:
    """Two significant digits, whole numbers from 99.5 up: "7.4%", "58%", "100%", "110%"."""
    return f"{value:.2g}%" if value < 99.5 else f"{value:.0f}%"


def aligned(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows of cells as lines whose columns line up."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _error_cell(result: Result) -> str:
    if result.max_error is None:
        return "-"
    return f"{result.max_error:.1e}" + ("" if result.error_ok else " OVER TOL")


def _speedup_cell(result: Result) -> str:
    """For fastattn's own backends: how many times faster than the reference and each peer."""
    if result.kind != "backend" or result.implementation == REFERENCE:
        return ""
    return ", ".join(f"{ratio:.2f}x vs {other}" for other, ratio in result.speedup.items())


def format_table(results: list[Result]) -> str:
    header = ("case", "implementation", "median", "IQR", "max error", "peak mem", "% of limit", "speedup")
    rows = []
    for r in results:
        if r.failure:
            rows.append((r.case, r.implementation, "FAILED", "", "", "", "", r.failure))
            continue
        rows.append((
            r.case,
            r.implementation,
            _scaled(r.median_s, TIME_UNITS),
            _scaled(r.iqr_s, TIME_UNITS),
            _error_cell(r),
            "-" if r.peak_bytes is None else _scaled(r.peak_bytes, BYTE_UNITS),
            f"{percent_text(r.percent_of_limit)} {r.bound_by}",
            _speedup_cell(r),
        ))
    return "\n".join(aligned([header, *rows]) + _target_lines(results))


def _target_lines(results: list[Result]) -> list[str]:
    """Below the table, for the rows that have targets: each one's value and whether it is met."""
    rows = []
    for r in results:
        for outcome in r.targets:
            value = outcome["value"]
            verdict = {True: "met", False: "NOT MET", None: "unknown"}[outcome["met"]]
            if outcome.get("not_judged"):
                verdict = f"not judged: {outcome['not_judged']}"
            shown = "-" if value is None else f"{value:.3g}{outcome['unit']}"
            rows.append((r.case, r.implementation, outcome["target"], shown, verdict))
    return ["", "targets (issues 4 and 6):", *aligned(rows, indent="  ")] if rows else []


def report(results: list[Result], preset: dict, machine: dict, limits: dict, compile_reference: bool,
           cases_chosen: int | None = None) -> dict:
    """The JSON report; ``cases_chosen`` (the run's case count) against the cases in
    ``results`` says whether the run finished or was cut short (a report is written after
    every case, so a run killed by a time limit keeps what it measured)."""
    cases_done = len(dict.fromkeys(result.case for result in results))
    return {
        "machine": machine,
        "limits": limits,
        "preset": preset,
        "compile_reference": compile_reference,
        "cases_done": cases_done,
        "cases_chosen": cases_done if cases_chosen is None else cases_chosen,
        "results": [dataclasses.asdict(result) for result in results],
    }


def check_output_path(path: str) -> None:
    """Fails before the timings when ``path`` (``--json``, ``--csv``, ``--plot``) cannot be
    written: a missing or read-only folder, or a folder at the path itself.  Nothing is
    created: the file appears only with results in it (see :func:`write_atomically`)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BenchError(f"cannot write {path}: it is a folder")
    if not os.path.isdir(folder):
        raise BenchError(f"cannot write {path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BenchError(f"cannot write {path}: the folder {folder} is not writable")


def write_atomically(path: str, write: Callable[[TextIO], None]) -> None:
    """``write`` into ``path`` through a temporary file renamed over it: a reader, or a run
    killed in the middle, sees the previous complete file or the new one, never a torn one."""
    temporary = f"{path}.partial"
    try:
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            write(file)
        os.replace(temporary, path)
    except OSError as error:
        raise BenchError(f"cannot write {path}: {error.strerror}") from error


def write_json(file: TextIO, content: dict) -> None:
    json.dump(content, file, indent=1)
    file.write("\n")


def write_csv(file: TextIO, results: list[Result]) -> None:
    writer = csv.DictWriter(file, fieldnames=[field.name for field in dataclasses.fields(Result)])
    writer.writeheader()
    for result in results:
        row = dataclasses.asdict(result)
        writer.writerow({k: json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else v for k, v in row.items()})


def check_plot_path(path: str) -> None:
    """Fails before the timings when matplotlib is missing, cannot write the format the
    file's extension names, or the file cannot be written."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as error:
        raise BenchError("--plot needs matplotlib (pip install matplotlib)") from error
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1][1:].lower()
    if extension and extension not in formats:
        raise BenchError(f"cannot write {path}: --plot writes the formats {', '.join(sorted(formats))} (named by the extension)")
    check_output_path(path)


def write_plot(path: str, results: list[Result], title: str) -> None:
    """One horizontal bar per case and implementation: its speedup over the eager reference
    (log scale), fastattn's backends, the peers and the baselines each in their colour."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    bars = [r for r in results if r.median_s and REFERENCE in r.speedup]
    figure, axes = pyplot.subplots(figsize=(10, 0.22 * len(bars) + 1.5))
    colours = {"backend": "tab:blue", "peer": "tab:gray", "baseline": "tab:olive"}
    axes.barh(range(len(bars)), [r.speedup[REFERENCE] for r in bars], color=[colours[r.kind] for r in bars])
    axes.set_yticks(range(len(bars)), [f"{r.case} [{r.implementation}]" for r in bars], fontsize=6)
    axes.set_ylim(len(bars) - 0.5, -0.5)
    axes.set_xscale("log")
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("speedup over the eager reference (reference time / time); blue: fastattn, grey: peers, olive: baselines")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
