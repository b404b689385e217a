"""The ``fastattn`` command line, also run as ``python -m fastattn``.

``fastattn info`` prints :func:`fastattn.info.info` as aligned text (``--json``:
as JSON); ``fastattn bench`` times the ops (see :mod:`fastattn.bench`).  A user
error prints one line on stderr, without a traceback, and gives exit status 2
for bad usage or 1 when the request cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Sequence

import torch

from fastattn import backends, bench
from fastattn.info import info
from fastattn.zoo import cli as zoo_cli

TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))


class UsageError(Exception):
    """The command line is malformed; the message is argparse's, on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: error: {message}")


def _aligned(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows of cells as lines whose columns line up."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in rows
    ]


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def format_info(description: dict) -> str:
    """``info()`` as text: the plain entries, then the backends, then the auto choices."""
    plain = [(key, _shown(value)) for key, value in description.items() if not isinstance(value, dict)]
    availability = [
        (name, "available" if entry["available"] else f"unavailable: {entry['reason']}")
        for name, entry in description["backends"].items()
    ]
    lines = _aligned(plain) + ["backends:"] + _aligned(availability, indent="  ")
    for device_type, choices in description["auto"].items():
        lines += [f"auto picks on {device_type}:"] + _aligned(list(choices.items()), indent="  ")
    return "\n".join(lines)


def _seconds(value: float) -> str:
    for unit, factor in TIME_UNITS:
        if value >= factor:
            break
    return f"{value / factor:.3g} {unit}"


def _backend_label(result: bench.Result) -> str:
    """The backend's name, marked when it is the one ``"auto"`` picks."""
    picked = backends.auto_choice(result.op, result.device) == result.backend
    return f"{result.backend} (auto)" if picked else result.backend


def format_results(results: list[bench.Result]) -> str:
    header = ("case", "backend", "shape", "median", "IQR")
    rows = [
        (r.case, _backend_label(r), bench.format_shape(r.shape), _seconds(r.median_s), _seconds(r.iqr_s))
        for r in results
    ]
    return "\n".join(_aligned([header, *rows]))


def _run_info(arguments: argparse.Namespace) -> int:
    description = info()
    print(json.dumps(description, indent=2) if arguments.json else format_info(description))
    return 0


def _run_bench(arguments: argparse.Namespace) -> int:
    preset = "quick" if arguments.quick else "full"
    chosen = bench.choose(preset, arguments.device, arguments.dtype, arguments.ops)
    with contextlib.ExitStack() as outputs:
        json_file = outputs.enter_context(bench.open_output(arguments.json)) if arguments.json else None
        csv_file = outputs.enter_context(bench.open_output(arguments.csv)) if arguments.csv else None
        results = bench.run(chosen, arguments.device, arguments.dtype, bench.PRESETS[preset].min_run_time)
        print(f"fastattn bench: {preset} preset, {arguments.device}, {arguments.dtype}")
        print(format_results(results))
        if json_file:
            bench.write_json(json_file, results, preset)
        if csv_file:
            bench.write_csv(csv_file, results)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastattn", description="Fused attention and LSTM/GRU kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info_parser = commands.add_parser("info", help="versions, backends and what 'auto' picks")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    info_parser.set_defaults(run=_run_info)

    bench_parser = commands.add_parser("bench", help="time each op on every available backend")
    bench_parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds in all")
    bench_parser.add_argument(
        "--device",
        choices=bench.DEVICES,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when a GPU is present, else cpu",
    )
    bench_parser.add_argument(
        "--ops", nargs="+", default=(), metavar="OP", help="case-name prefixes, e.g. attention.additive lstm_cell"
    )
    bench_parser.add_argument("--dtype", choices=tuple(bench.DTYPES), default="float32")
    bench_parser.add_argument("--json", metavar="FILE", help="write the machine description and results as JSON")
    bench_parser.add_argument("--csv", metavar="FILE", help="write the results as CSV")
    bench_parser.set_defaults(run=_run_bench)
    zoo_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command in ``argv`` (default: ``sys.argv[1:]``) and returns its exit status."""
    try:
        arguments = build_parser().parse_args(argv)
        return arguments.run(arguments)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except bench.BenchError as error:
        print(f"fastattn: error: {error}", file=sys.stderr)
        return 1
