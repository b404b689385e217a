"""The contract every trainable zoo task implements (one subclass per ``fastattn train TASK``).

A task owns its data and its model; the trainer (:mod:`fastattn.zoo.trainer`) owns
everything generic: the optimiser, gradient clipping, ``--time-budget``, the progress
bar, DDP under ``torchrun``, checkpoints and ``--resume``, ``metrics.json``, the
hypotheses file and ``fastattn eval``.  The trainer calls, in this order:

    Task.add_arguments(parser)            # once, when the command line is built
    task = Task(args, device)             # training: build the data splits and self.model
    task = Task(args, device, saved)      # eval/resume: ``saved`` is an earlier ``task.state_dict()``
    for batch in task.batches("train", batch_size, generator): loss, count = task.loss(model, batch)
    metrics, hypotheses = task.evaluate(task.model, "test")
    paths = task.plot(task.model, "test", out_dir)

Rules the trainer relies on:
- ``args`` holds the common flags (``data``, ``epochs``, ``time_budget``, ``batch_size``,
  ``lr``, ``device``, ``seed``, ``out``, ``resume``) plus the task's own, and ``args.mode``:
  ``"train"`` or ``"eval"``.  In eval mode with ``args.evaluate_all_of_data`` (``fastattn
  eval --data FILE``), that whole file is the ``"test"`` split (the model has not seen
  it); without it ``args.data`` is the training run's, split as in training.  Give task-specific defaults for the common
  flags with ``parser.set_defaults(lr=..., batch_size=..., epochs=...)`` in ``add_arguments``.
- With ``saved``, everything that shapes the model (vocabularies, sizes) comes from it,
  never from the data, so the checkpoint's weights fit; unseen words map to unknown.
- ``batches`` yields batches already on ``self.device``; the same ``generator`` state gives
  the same batches (DDP ranks shard that sequence, so it must not depend on the rank).
- ``loss`` calls ``model(...)`` (its forward) exactly once: under DDP ``model`` is the
  DDP wrapper, and the gradient sync hooks run only through forward.  Use
  :func:`unwrapped` for any other attribute of the model.
- ``evaluate`` and ``plot`` get the plain model, run under ``torch.no_grad()``, on rank 0.
- User errors (missing file, malformed data, bad option) raise :class:`TaskError` with a
  message that names the file/line or flag; the CLI prints it on one line and exits 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable

import torch

SPLITS = ("train", "valid", "test")


class TaskError(Exception):
    """A user error in a task's data or options; the message is shown on one line."""


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class Task:
    name: str = ""  # the TASK argument of ``fastattn train``
    headline_metric: str = ""  # a key of evaluate()'s metrics: "exact_match", "bleu", "mse", ...
    higher_is_better: bool = True  # of the headline metric
    draws_attention: bool = True  # whether plot() may draw attention maps (fastattn eval --plot-attention)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Task-specific flags, beyond the trainer's common ones (default: none)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, saved: dict[str, Any] | None = None):
        """Seeded data splits and ``self.model`` (on ``device``); see the module docstring."""
        self.args = args
        self.device = device
        self.model: torch.nn.Module

    def batches(self, split: str, batch_size: int, generator: torch.Generator) -> Iterable[Any]:
        """The batches of ``split`` in an order drawn from ``generator`` (the train split
        shuffled, the others may keep their order), on ``self.device``."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """-> (the scalar objective to minimise for this batch, the number of target
        tokens or items it covers: the trainer's tokens/s and loss averages count these)."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, split: str) -> tuple[dict[str, float], list[str]]:
        """-> (metrics, including ``headline_metric``; the hypotheses, one line each)."""
        raise NotImplementedError

    def plot(self, model: torch.nn.Module, split: str, out_dir: Path) -> list[Path]:
        """Writes figures (attention maps, reconstructions) as PNG under ``out_dir``."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What ``Task(args, device, saved=...)`` needs besides the model weights:
        vocabularies, sizes; plain Python values and tensors only (it goes in the checkpoint)."""
        return {}
