"""Checkpoints of ``fastattn train``: written atomically, read back for ``--resume`` and ``fastattn eval``.

A checkpoint is one ``torch.save`` file holding the task name, the command-line
arguments, the task's ``state_dict()`` (vocabularies, sizes), the model and optimiser
states and the training progress.  :func:`save` writes a temporary file in the same
folder, flushes it to disk and renames it over the old one (``os.replace`` is atomic), so
a crash at any moment leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FILE_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """The checkpoint file is missing or is not a fastattn checkpoint."""


def save(contents: dict[str, Any], path: str | Path) -> Path:
    """Writes ``contents`` to ``path`` atomically: a complete new file, or the old one untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint is an ordinary file
        with os.fdopen(handle, "wb") as file:
            torch.save({"format_version": FORMAT_VERSION, **contents}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The contents :func:`save` wrote, tensors on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        contents = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({_reason(error)}; expected a {FILE_NAME} written by fastattn train)"
        ) from None
    if not isinstance(contents, dict) or contents.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a fastattn checkpoint (format version {FORMAT_VERSION} expected)")
    return contents


def _reason(error: Exception) -> str:
    """Why ``torch.load`` failed, in a few words: its weights_only refusals run over many lines."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"torch.load: {type(error).__name__}"
