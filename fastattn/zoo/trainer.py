"""The generic training loop behind ``fastattn train`` and the evaluation behind ``fastattn eval``.

What a task does not do: Adam with gradient-norm clipping and a cosine learning-rate decay
over the run (its epochs, or its time budget when that ends it sooner), epochs and ``--time-budget``
(training stops at the first step boundary past the budget, then the model is still
evaluated), a tqdm bar (loss, tokens/s, ETA), DDP when run under ``torchrun`` (gloo on
CPU, nccl on GPU: every rank reads the same batch sequence and takes every
WORLD_SIZE-th batch), atomic checkpoints with the optimiser state (rank 0 writes them,
after every epoch and when training stops) and ``--resume`` from them, and the report:
``metrics.json``, ``hypotheses.txt`` and the task's figures in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastattn.zoo import checkpoint
from fastattn.zoo.registry import task_class
from fastattn.zoo.task import Task, TaskError, unwrapped

METRICS_FILE = "metrics.json"
LARGEST_SEED = 2**31 - 1  # what every task's data generators take (numpy's and torch's seeds, the digit splits)
FINAL_LEARNING_RATE = 0.05  # of --lr, at the end of a cosine schedule
HYPOTHESES_FILE = "hypotheses.txt"


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch done, by all ranks together
    step: int = 0  # optimiser steps
    tokens: int = 0  # target tokens trained on: rank 0's count times the number of ranks
    train_seconds: float = 0.0  # over every run that led here (--resume adds up)
    steps_per_epoch: int = 0  # of each rank, known once an epoch has been completed
    budget_seconds: float = 0.0  # wall time of the training loops of earlier runs (--resume), against --time-budget
    recent_loss: float = float("nan")  # exponential moving average of the training loss


@dataclass(frozen=True)
class Processes:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def largest(self, values: list[float], device: torch.device) -> list[float]:
        """Each value's maximum over the ranks (every rank gets the same answer)."""
        if self.size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()


def start_processes(device_name: str) -> tuple[Processes, torch.device]:
    """Joins the ``torchrun`` process group when there is one; -> (processes, this rank's device)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_name)
    if size == 1:
        return Processes(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size()), device


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fastattn train TASK`` that every task has."""
    parser.add_argument("--data", metavar="FILE", help="input data, for tasks that read a file (translate: a TSV)")
    parser.add_argument("--epochs", type=int, default=10, metavar="N")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="stop training after this long (then evaluate); default: no limit")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="per process")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                        help=f"cosine (default): from --lr down to {FINAL_LEARNING_RATE * 100:.0f}%% of it over the run "
                        "(its epochs, or --time-budget when that ends it sooner; the epochs count once the "
                        "first has given their length, so without a budget the first epoch runs at --lr)")
    parser.add_argument("--clip-norm", type=float, default=1.0, metavar="NORM", help="gradient-norm clipping")
    parser.add_argument("--amp", choices=("bfloat16", "float16"), default=None,
                        help="mixed precision: the training forward under torch.autocast in this dtype "
                        "(float16 with a gradient scaler); default: off")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads per process (default 1: the zoo's small models run fastest on one)")
    parser.add_argument("--seed", type=int, default=0, help=f"data and initialisation seed, 0 to {LARGEST_SEED} (default 0)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="metrics.json, hypotheses, checkpoint and figures go here (default: runs/TASK)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt, optimiser state included")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_common_arguments(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise TaskError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed <= LARGEST_SEED:
        raise TaskError(f"--seed must be in [0, {LARGEST_SEED}], got {args.seed}")
    for name in ("lr", "clip_norm", "time_budget"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise TaskError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise TaskError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TaskError(f"--device {args.device}: no CUDA device is available")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Trains ``args.task`` as the flags say, then evaluates it; -> the metrics (rank 0; {} elsewhere)."""
    started = time.monotonic()
    check_common_arguments(args)
    torch.set_num_threads(args.threads)
    args.mode = "train"
    args.out = Path(args.out) if args.out is not None else Path("runs") / args.task
    checkpoint_path = args.out / checkpoint.FILE_NAME
    saved = checkpoint.load(checkpoint_path) if args.resume else None
    if saved is not None and saved["task"] != args.task:
        raise TaskError(f"{checkpoint_path} is a checkpoint of task {saved['task']!r}, not {args.task!r}")
    if saved is not None:
        check_resumed_flags(args, saved["args"])
    processes, device = start_processes(args.device)
    try:
        torch.manual_seed(args.seed)
        task = task_class(args.task)(args, device, None if saved is None else saved["task_state"])
        output_folder(args.out)  # after the task has checked its flags: a failed train leaves no folder behind
        model = task.model
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        progress = Progress()
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            progress = Progress(**saved["progress"])
        trained = torch.nn.parallel.DistributedDataParallel(model) if processes.size > 1 else model
        run = _TrainingRun(task, trained, optimizer, progress, processes, device, args, checkpoint_path)
        if saved is not None and saved.get("scaler"):  # empty when saved without --amp float16
            run.scaler.load_state_dict(saved["scaler"])
        if saved is not None and "rng" in saved:  # the noise and samples the run would draw next
            restore_global_rng_state(saved["rng"], device)
        stopped_by = run.epochs()
        recent_loss = progress.recent_loss
        # The DDP wrapper's reducer holds the process group: free it while the group is
        # alive (freed after destroy_process_group, gloo's teardown can hang), and let no
        # rank leave before every rank is done with its collectives.
        del run, trained
        if processes.size > 1:
            dist.barrier()
            print(f"rank {processes.rank} of {processes.size}: finished after {progress.step} steps ({stopped_by})", flush=True)
        if not processes.is_main:
            return {}
        metrics = evaluate_and_report(task, args.out, plot_to=args.out)
        metrics.update(
            loss_train=recent_loss, steps=progress.step, epochs_completed=progress.epoch,
            tokens=progress.tokens, tokens_per_second=progress.tokens / max(progress.train_seconds, 1e-9),
            train_seconds=progress.train_seconds, wall_seconds=time.monotonic() - started, stopped_by=stopped_by,
            processes=processes.size, device=str(device), checkpoint=str(checkpoint_path),
        )
        _write_json(args.out / METRICS_FILE, metrics)
        return metrics
    finally:
        if processes.size > 1:
            dist.destroy_process_group()


class _TrainingRun:
    """The loop over epochs and steps, and its checkpoints."""

    def __init__(self, task: Task, model, optimizer, progress: Progress, processes: Processes, device, args, path: Path):
        self.task, self.model, self.optimizer, self.progress = task, model, optimizer, progress
        self.processes, self.device, self.args, self.checkpoint_path = processes, device, args, path
        self.autocast_dtype = None if args.amp is None else getattr(torch, args.amp)
        # float16 gradients can underflow: the loss is scaled up, the gradients back down
        # before clipping (a scaler that is not enabled passes everything through).
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "float16")
        self.saved_at_step = progress.step if args.resume else -1
        self.started = time.monotonic()

    def budget_used(self) -> float:
        """The share of ``--time-budget`` spent (0 without one), the largest over the ranks."""
        elapsed = self.progress.budget_seconds + time.monotonic() - self.started
        used = 0.0 if self.args.time_budget is None else elapsed / self.args.time_budget
        return self.processes.largest([used], self.device)[0]

    def epochs(self) -> str:
        """Trains until ``--epochs`` are done or the time budget is spent; -> "epochs" or "time_budget"."""
        args, progress = self.args, self.progress
        bar = tqdm(desc=f"{self.task.name} epoch {progress.epoch + 1}", unit="step", dynamic_ncols=True,
                   disable=args.quiet or not self.processes.is_main, mininterval=1.0,
                   bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]")
        stopped_by = "epochs"
        self.model.train()
        while progress.epoch < args.epochs:
            generator = torch.Generator().manual_seed(args.seed * 100_003 + progress.epoch)
            batches = self.task.batches("train", args.batch_size, generator)
            for batch in _shard(batches, self.processes, skip=progress.batch):
                budget_used = self.budget_used()
                if budget_used >= 1:
                    stopped_by = "time_budget"
                    break
                self._step(batch, budget_used)
                bar.update()
                bar.set_postfix_str(self._postfix(budget_used), refresh=False)
            else:
                # progress.batch now counts every batch of the epoch, those before a --resume too
                progress.steps_per_epoch = progress.steps_per_epoch or progress.batch // self.processes.size
                progress.epoch, progress.batch = progress.epoch + 1, 0
                remaining = progress.steps_per_epoch * (args.epochs - progress.epoch)
                bar.total = bar.n + remaining
                bar.set_description(f"{self.task.name} epoch {min(progress.epoch + 1, args.epochs)}")
                self.save()
                continue
            break
        bar.close()
        self.save()
        return stopped_by

    def learning_rate(self, budget_used: float) -> float:
        """--lr, decayed along a cosine to FINAL_LEARNING_RATE of it as the run advances:
        by steps over the planned epochs (once an epoch's length is known) or by the share
        of the time budget used, whichever is further along."""
        if self.args.lr_schedule == "constant":
            return self.args.lr
        done = budget_used
        if self.progress.steps_per_epoch:
            done = max(done, self.progress.step / (self.progress.steps_per_epoch * self.args.epochs))
        cosine = 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        return self.args.lr * (FINAL_LEARNING_RATE + (1 - FINAL_LEARNING_RATE) * cosine)

    def _step(self, batch, budget_used: float) -> None:
        began = time.monotonic()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(budget_used)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss, count = self.task.loss(self.model, batch)
        if not torch.isfinite(loss):
            raise TaskError(f"the training loss became {loss.item()} at step {self.progress.step + 1}; try a lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        value = loss.item()
        recent = self.progress.recent_loss
        self.progress.recent_loss = value if math.isnan(recent) else 0.98 * recent + 0.02 * value
        self.progress.step += 1
        self.progress.batch += self.processes.size
        self.progress.tokens += count * self.processes.size
        self.progress.train_seconds += time.monotonic() - began

    def _postfix(self, budget_used: float) -> str:
        progress = self.progress
        steps_per_epoch = progress.steps_per_epoch
        rate = progress.tokens / max(progress.train_seconds, 1e-9)
        remaining = []
        if steps_per_epoch:
            steps_left = steps_per_epoch * (self.args.epochs - progress.epoch) - progress.batch // self.processes.size
            remaining.append(steps_left * progress.train_seconds / max(progress.step, 1))
        if self.args.time_budget is not None:
            remaining.append(max(0.0, (1 - budget_used) * self.args.time_budget))
        eta = f", ETA {tqdm.format_interval(min(remaining))}" if remaining else ""
        return f"loss {self.progress.recent_loss:.4f}, lr {self.optimizer.param_groups[0]['lr']:.2g}, {rate:,.0f} tokens/s{eta}"

    def save(self) -> None:
        """Rank 0 writes the checkpoint, unless it already holds this step."""
        if not self.processes.is_main or self.saved_at_step == self.progress.step:
            return
        model = unwrapped(self.model)
        progress = asdict(self.progress)
        progress["budget_seconds"] += time.monotonic() - self.started
        checkpoint.save(
            {
                "task": self.args.task,
                "args": plain_arguments(self.args),
                "task_state": self.task.state_dict(),
                "model": model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "progress": progress,
                "rng": global_rng_state(self.device),
            },
            self.checkpoint_path,
        )
        self.saved_at_step = self.progress.step
        tqdm.write(f"checkpoint saved: {self.checkpoint_path} (step {self.progress.step})")


def _shard(batches: Iterable, processes: Processes, skip: int) -> Iterator:
    """This rank's batches: of each run of ``processes.size`` consecutive batches, the
    rank-th; an incomplete last run is dropped, so every rank takes as many steps.
    The first ``skip`` batches (done before a resume) are passed over."""
    group = []
    for index, batch in enumerate(batches):
        if index < skip:
            continue
        group.append(batch)
        if len(group) == processes.size:
            yield group[processes.rank]
            group = []


def evaluate_and_report(task: Task, out_dir: Path, plot_to: Path | None, split: str = "test") -> dict[str, Any]:
    """Evaluates ``task.model`` on ``split``; writes the hypotheses and figures; -> the metrics
    (the task's, the mean test loss per token/item, the figure paths)."""
    model = task.model
    model.eval()
    with torch.no_grad():
        metrics, hypotheses = task.evaluate(model, split)
        total, count = 0.0, 0
        for batch in task.batches(split, task.args.batch_size, torch.Generator().manual_seed(0)):
            loss, items = task.loss(model, batch)
            total, count = total + loss.item() * items, count + items
        figures = task.plot(model, split, plot_to) if plot_to is not None else []
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / HYPOTHESES_FILE).write_text("".join(line + "\n" for line in hypotheses), encoding="utf-8")
    headline = task.headline_metric
    return {
        "task": task.name, "split": split, "headline_metric": headline, headline: metrics[headline],
        **metrics, "loss": total / max(count, 1), "figures": [str(path) for path in figures], "out": str(out_dir),
    }


def load_task(checkpoint_file: Path, *, data: str | None = None, device: str | None = None,
              batch_size: int | None = None) -> Task:
    """The task and trained model of a checkpoint, in eval mode: ``data`` (when given) is its
    test split, vocabularies and sizes come from the checkpoint."""
    saved = checkpoint.load(checkpoint_file)
    args = argparse.Namespace(**saved["args"])
    # --data FILE: the examples to evaluate, all of them; without it the task's own test
    # split (for translate: of the corpus it trained on, split as in training).
    args.mode, args.evaluate_all_of_data = "eval", data is not None
    if data is not None:
        args.data = data
    if device is not None:
        args.device = device  # checked below: a CUDA device asked for must exist
    elif torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        args.device = "cpu"  # the device it was trained on is missing here
    if batch_size is not None:
        args.batch_size = batch_size
    check_common_arguments(args)
    torch.set_num_threads(args.threads)
    task = task_class(saved["task"])(args, torch.device(args.device), saved["task_state"])
    task.model.load_state_dict(saved["model"])
    task.model.eval()
    return task


def evaluate_checkpoint(checkpoint_file: Path, *, data: str | None, out: Path, plot_attention: Path | None,
                        device: str | None, batch_size: int | None) -> dict[str, Any]:
    """``fastattn eval``: the checkpoint's model on ``data`` (or its task's own test split)."""
    started = time.monotonic()
    task = load_task(checkpoint_file, data=data, device=device, batch_size=batch_size)
    if plot_attention is not None and not task.draws_attention:
        raise no_attention_figure(task)  # before any work: its figures are not attention maps
    if plot_attention is not None:
        if plot_attention.is_dir():
            raise TaskError(f"--plot-attention {plot_attention}: a folder, expected the path of a PNG file to write")
        output_folder(plot_attention.parent, flag="--plot-attention")  # a path that cannot be written fails now
    output_folder(out)  # after the checkpoint is read: a failed eval leaves no folder behind
    metrics = evaluate_and_report(task, out, plot_to=out)
    if plot_attention is not None:
        if not metrics["figures"]:
            raise no_attention_figure(task)
        try:
            shutil.move(metrics["figures"][0], plot_attention)  # also across file systems
        except OSError as error:
            raise TaskError(f"--plot-attention {plot_attention}: cannot write the file ({error.strerror})") from None
        metrics["figures"][0] = str(plot_attention)
    metrics.update(checkpoint=str(checkpoint_file), data=data, wall_seconds=time.monotonic() - started)
    _write_json(out / METRICS_FILE, metrics)
    return metrics


def no_attention_figure(task: Task) -> TaskError:
    return TaskError(f"--plot-attention: this {task.name} model draws no attention figure")


# What a resumed run may change: how long it runs, where and how it reports.  Every other
# flag made the model, its data or its optimisation, which the checkpoint carries on.
RESUMABLE_FLAGS = frozenset({"epochs", "time_budget", "resume", "out", "quiet", "device", "threads", "mode", "task"})


def check_resumed_flags(args: argparse.Namespace, saved_flags: dict[str, Any]) -> None:
    """--resume continues the run the checkpoint holds: a changed model, data or
    optimisation flag is refused (it would be silently ignored, and recorded as if used)."""
    def comparable(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    given = plain_arguments(args)
    changed = [
        f"--{name.replace('_', '-')} {given[name]!r} (the checkpoint's: {saved_flags[name]!r})"
        for name in sorted(given.keys() & saved_flags.keys() - RESUMABLE_FLAGS)
        if comparable(given[name]) != comparable(saved_flags[name])
    ]
    if changed:
        raise TaskError(f"--resume continues the checkpoint's run, whose flags differ: {'; '.join(changed)}")


def output_folder(path: Path, flag: str = "--out") -> Path:
    """``--out`` (or the folder of ``flag``'s file), created before any training or evaluation
    (once the flags and the data are checked), so that a path that cannot be a folder fails
    at once rather than when the first checkpoint or report is written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TaskError(f"{flag} {path}: cannot make the folder ({error.strerror})") from None
    return path


def global_rng_state(device: torch.device) -> dict[str, Any]:
    """torch's global generators (a denoising autoencoder's noise, hard attention's
    samples draw from them), checkpointed so that a resumed run draws what the
    uninterrupted one would."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_global_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def plain_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as plain values (what a checkpoint keeps); paths become strings."""
    plain = {}
    for name, value in vars(args).items():
        if isinstance(value, Path):
            value = str(value)
        if value is None or isinstance(value, (str, int, float, bool, list, tuple)):
            plain[name] = value
    return plain


def _write_json(path: Path, contents: dict[str, Any]) -> None:
    """Strict JSON: NaN and infinities (a loss with no step behind it) become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite_or_none(contents), indent=2, default=str, allow_nan=False) + "\n", encoding="utf-8")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {name: _finite_or_none(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value
