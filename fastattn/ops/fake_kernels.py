"""``register_fake`` for fastattn's ops, with the one check every fake (meta) kernel shares,
and :func:`contiguous_like` / :func:`contiguous_like_or_empty`, how the fake kernels make
an output shaped like an input.

A fake kernel runs for FakeTensors (torch.compile, export) and for meta tensors; a
direct call that mixes meta tensors with real ones lands on it too (the Meta key
outranks CPU and CUDA), and its ``new_empty`` outputs would come back as real tensors
of uninitialised memory.  Such a call raises instead, naming the meta arguments, as
the kernels do for tensors on different devices.
"""

from __future__ import annotations

import functools
import inspect

import torch


def register_fake(op_name: str):
    """Decorator: ``fake`` as the fake kernel of ``op_name``, refusing meta tensors next to real ones."""

    def decorate(fake):
        signature = inspect.signature(fake)

        @functools.wraps(fake)
        def checked(*arguments, **keywords):
            tensors = {
                name: value for name, value in signature.bind(*arguments, **keywords).arguments.items()
                if isinstance(value, torch.Tensor)
            }
            on_meta = [name for name, tensor in tensors.items() if tensor.device.type == "meta"]
            if on_meta and len(on_meta) < len(tensors):
                devices = sorted({str(tensor.device) for tensor in tensors.values() if tensor.device.type != "meta"})
                raise ValueError(
                    f"{op_name}: every tensor must be on one device, got {', '.join(on_meta)} on meta "
                    f"next to tensors on {', '.join(devices)}"
                )
            return fake(*arguments, **keywords)

        return torch.library.register_fake(op_name)(checked)

    return decorate


def contiguous_like(tensor: torch.Tensor) -> torch.Tensor:
    """An output of ``tensor``'s shape, dtype and device with contiguous strides, as the
    kernels return whatever their inputs' strides (``torch.empty_like`` keeps a transposed
    input's strides: the fake and real outputs then disagree and torch.compile fails)."""
    return tensor.new_empty(tensor.shape)


def contiguous_like_or_empty(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """:func:`contiguous_like` of an optional input, or the empty tensor a kernel returns
    for the gradient of an absent one."""
    return contiguous_like(tensor) if tensor is not None else like.new_empty(0)
