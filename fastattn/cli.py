"""The ``fastattn`` command line, also run as ``python -m fastattn``.

``fastattn info`` prints :func:`fastattn.info.info` as aligned text (``--json``:
as JSON); ``fastattn bench`` times the ops (see :mod:`fastattn.bench`);
``fastattn profile`` writes a torch.profiler trace of one op (:mod:`fastattn.profile`).  A user
error prints one line on stderr, without a traceback, and gives exit status 2
for bad usage or 1 when the request cannot run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch

from fastattn import backends, bench
from fastattn import profile as profiling
from fastattn.bench import machine
from fastattn.bench import output as bench_output
from fastattn.bench.output import aligned as _aligned
from fastattn.info import info
from fastattn.zoo import cli as zoo_cli


class UsageError(Exception):
    """The command line is malformed; the message is argparse's, on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: error: {message}")


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


def _run_info(arguments: argparse.Namespace) -> int:
    description = info()
    print(json.dumps(description, indent=2) if arguments.json else format_info(description))
    return 0


def _run_bench(arguments: argparse.Namespace) -> int:
    preset_name = "quick" if arguments.quick else arguments.preset
    preset = bench.preset_named(preset_name)
    chosen = bench.choose(preset, arguments.device, arguments.dtype, arguments.ops)
    compile_reference = preset.compile if arguments.compile is None else arguments.compile
    for path in (arguments.json, arguments.csv):
        if path:
            bench_output.check_output_path(path)
    if arguments.plot:
        bench_output.check_plot_path(arguments.plot)
    limits = machine.limits(arguments.device)
    description = machine.describe(arguments.device)

    def save(results: list) -> None:
        """--json and --csv as they stand, after every case and at the end."""
        content = bench_output.report(results, {"name": preset_name, **vars(preset)}, description, limits.as_dict(),
                                      compile_reference, cases_chosen=len(chosen))
        if arguments.json:
            bench_output.write_atomically(arguments.json, lambda file: bench_output.write_json(file, content))
        if arguments.csv:
            bench_output.write_atomically(arguments.csv, lambda file: bench_output.write_csv(file, results))

    results = bench.run(
        chosen, preset, arguments.device, arguments.dtype, limits,
        compile_reference=compile_reference, measure_memory=arguments.memory, after_each_case=save,
    )
    save(results)
    sizes = " ".join(f"{name}={value}" for name, value in vars(preset).items() if name in profiling.SHAPE_FIELDS)
    print(f"fastattn bench: {preset_name} preset ({sizes}), {arguments.device}, {arguments.dtype}, "
          f"torch.compile'd reference {'on' if compile_reference else 'off'}")
    print(f"limits: {limits.note}; measured copy {limits.measured_copy_bandwidth / 1e9:.3g} GB/s")
    print(bench_output.format_table(results))
    if arguments.plot:
        title = f"fastattn {preset_name}, {description['gpu'] or description['cpu_model']}, {arguments.dtype}"
        bench_output.write_plot(arguments.plot, results, title)
    failed = [f"{r.case} on {r.implementation}" for r in results if r.failure or r.error_ok is False]
    if failed:
        print(f"fastattn bench: {len(failed)} failed or over tolerance: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_profile(arguments: argparse.Namespace) -> int:
    bench.check_device(arguments.device)
    if arguments.trace:
        bench_output.check_output_path(arguments.trace)  # a bad path fails before the run
    preset = profiling.resized(
        bench.preset_named(arguments.preset), **{name: getattr(arguments, name) for name in profiling.SHAPE_FIELDS}
    )
    case = profiling.find_case(arguments.op, preset)
    summary = profiling.profile(
        case, device=arguments.device, dtype=arguments.dtype, backend_name=arguments.backend,
        iterations=arguments.iterations, trace=arguments.trace,
    )
    print(summary)
    if arguments.trace:
        print(f"trace written to {arguments.trace}")
    return 0


def _add_device_and_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=bench.DEVICES,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when a GPU is present, else cpu",
    )
    parser.add_argument("--dtype", choices=tuple(bench.DTYPES), default="float32")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastattn", description="Fused attention and LSTM/GRU kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info_parser = commands.add_parser("info", help="versions, backends and what 'auto' picks")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    info_parser.set_defaults(run=_run_info)

    bench_parser = commands.add_parser("bench", help="time each op on every available backend against its peers")
    shapes = bench_parser.add_mutually_exclusive_group()
    shapes.add_argument("--quick", action="store_true", help="the quick preset: small shapes, well under a minute")
    shapes.add_argument("--preset", choices=tuple(bench.PRESETS), default="full", help="shapes (default: full)")
    _add_device_and_dtype(bench_parser)
    bench_parser.add_argument(
        "--ops", nargs="+", default=(), metavar="OP",
        help="case names or their leading dotted parts, e.g. attention.additive lstm_cell.forward",
    )
    bench_parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="time the torch.compile'd reference too (default: on for full and gpu, off for quick and tiny)",
    )
    bench_parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True,
        help="measure peak memory (on CPU in one child process; default: on)",
    )
    bench_parser.add_argument("--json", metavar="FILE", help="write the machine, limits and every raw timing as JSON")
    bench_parser.add_argument("--csv", metavar="FILE", help="write the results as CSV")
    bench_parser.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of the speedups")
    bench_parser.set_defaults(run=_run_bench)

    profile_parser = commands.add_parser("profile", help="a torch.profiler Chrome trace of one op")
    profile_parser.add_argument("op", help="a case name from `fastattn bench`, e.g. attention.additive.multi_query.forward")
    profile_parser.add_argument("--preset", choices=tuple(bench.PRESETS), default="full", help="base shapes (default: full)")
    for name in profiling.SHAPE_FIELDS:
        profile_parser.add_argument(f"--{name}", type=int, metavar="N", help=f"override the preset's {name}")
    _add_device_and_dtype(profile_parser)
    profile_parser.add_argument("--backend", choices=backends.CHOICES, default="auto")
    profile_parser.add_argument("--iterations", type=int, default=10, help="profiled calls (default: 10)")
    profile_parser.add_argument("--trace", metavar="FILE", help="the Chrome trace to write; without it no profiler runs")
    profile_parser.set_defaults(run=_run_profile)
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
