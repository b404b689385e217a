"""``fastattn train TASK ...`` and ``fastattn eval CHECKPOINT ...``: the zoo's subcommands.

``train`` reads its TASK first, then parses the rest with that task's own flags
(``fastattn train reverse --help`` lists them), so a task's module is imported only when
it is trained.  User errors (a missing or malformed file, a bad option value) print one
line on stderr and give exit status 1; a malformed command line gives status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastattn.data import DataError
from fastattn.zoo.checkpoint import CheckpointError
from fastattn.zoo.registry import TASKS, task_class
from fastattn.zoo.task import TaskError

USER_ERRORS = (TaskError, DataError, CheckpointError)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Adds ``train`` and ``eval`` to the ``fastattn`` command's subcommands."""
    train_parser = commands.add_parser(
        "train", help="train a zoo model (fastattn train TASK --help: its flags)",
        description="Train a zoo model; `fastattn train TASK --help` lists the flags of TASK.",
    )
    train_parser.add_argument("task", choices=tuple(TASKS), metavar="TASK", help=", ".join(TASKS))
    train_parser.add_argument("options", nargs=argparse.REMAINDER, help="the task's flags")
    train_parser.set_defaults(run=_run_train, task_parser_class=type(train_parser))

    eval_parser = commands.add_parser("eval", help="evaluate a checkpoint of fastattn train")
    eval_parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    eval_parser.add_argument("--data", metavar="FILE", help="data the model has not seen (default: its task's test split)")
    eval_parser.add_argument("--out", type=Path, metavar="DIR",
                             help="metrics.json and hypotheses.txt go here (default: eval/ beside the checkpoint)")
    eval_parser.add_argument("--plot-attention", type=Path, metavar="FILE.png", help="the first example's attention map")
    eval_parser.add_argument("--device", help="default: the one it was trained on, cpu when that is missing")
    eval_parser.add_argument("--batch-size", type=int, metavar="N")
    eval_parser.set_defaults(run=_run_eval)


def task_parser(task: str, parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The full parser of ``fastattn train TASK``: the trainer's common flags, then the task's."""
    from fastattn.zoo.trainer import add_common_arguments

    parser = parser_class(prog=f"fastattn train {task}", description=f"Train the {task} task.")
    add_common_arguments(parser)
    task_class(task).add_arguments(parser)
    return parser


def _run_train(arguments: argparse.Namespace) -> int:
    from fastattn.zoo.trainer import train

    args = task_parser(arguments.task, arguments.task_parser_class).parse_args(arguments.options)
    args.task = arguments.task
    return _reported(lambda: train(args))


def _run_eval(arguments: argparse.Namespace) -> int:
    from fastattn.zoo.trainer import evaluate_checkpoint

    return _reported(lambda: evaluate_checkpoint(
        arguments.checkpoint, data=arguments.data, out=arguments.out or arguments.checkpoint.parent / "eval",
        plot_attention=arguments.plot_attention,
        device=arguments.device, batch_size=arguments.batch_size,
    ))


def _reported(command) -> int:
    """Runs ``command``; prints its headline metric, or a user error on one line (status 1)."""
    try:
        metrics = command()
    except USER_ERRORS as error:
        print(f"fastattn: error: {error}", file=sys.stderr)
        return 1
    if metrics:
        headline = metrics["headline_metric"]
        print(f"{metrics['task']}: {headline} {metrics[headline]:.4f} on the {metrics['split']} split; "
              f"report in {Path(metrics['out']) / 'metrics.json'}")
    return 0
