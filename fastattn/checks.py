"""Argument checks shared by every public function.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, range or device) with a message that names the argument, says what
was expected and what was given.  They run before any computation, whatever the
backend.  Checks that read a tensor's values (the range of ``lengths``, a finite
``center``) run in eager mode only: under ``torch.compile`` they would be
data-dependent branches, so there only shapes, dtypes and devices are checked.
A shape's spelled-out ``meaning`` may be a function that builds it, called only for the
message: formatting a size that torch.compile traces symbolically would fix it to its
value (a recompile for every new size) or break the graph.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence, Union

import torch
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what torch.autocast casts
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

Meaning = Union[str, Callable[[], str]]  # what a shape means, or a function that spells it out


def describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def choice(name: str, value: object, choices: Sequence[object]) -> object:
    """One of ``choices`` (strings, or None): TypeError for another type, ValueError else."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def reads_values(*tensors: torch.Tensor) -> bool:
    """Whether value checks of ``tensors`` run here (eager mode) or are skipped (meta
    tensors and FakeTensors (FakeTensorMode, shape propagation), which have no values;
    tensors batched by torch.func.vmap, on which a branch is data-dependent control flow
    that vmap refuses; torch.compile tracing; CUDA graph capture, where reading a value
    would synchronise the capturing stream: a capture's warm-up run checks them)."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the functorch queries
        return False
    return (
        not any(tensor.is_meta or isinstance(tensor, FakeTensor) or _batched_by_vmap(tensor) for tensor in tensors)
        and not _capturing_cuda_graph()
    )


def _batched_by_vmap(tensor: torch.Tensor) -> bool:
    """Whether vmap batches ``tensor`` at any functorch level (under vmap(grad(...)) the
    batched tensor sits inside grad's wrapper)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def _capturing_cuda_graph() -> bool:
    # A capture needs torch's CUDA state initialized; is_initialized() is a flag, where
    # is_available() asks the driver for its devices at every call.
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def tensor(name: str, value: object) -> torch.Tensor:
    """``value`` when it is a dense tensor: the kernels and the reference index strided
    memory, so sparse, nested and MKL-DNN tensors are refused here by name (they failed
    deep inside torch, or with another argument's message)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(value)}")
    if value.is_nested or value.layout != torch.strided:
        kind = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")
    return value


def float_tensor(name: str, value: object) -> torch.Tensor:
    value = tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {describe(value)}"
        )
    return value


def integer_tensor(name: str, value: object) -> torch.Tensor:
    value = tensor(name, value)
    if value.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {describe(value)}")
    return value


def bool_tensor(name: str, value: object) -> torch.Tensor:
    value = tensor(name, value)
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {describe(value)}")
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return value


# Sizes and windows stay far from int64 overflow in index arithmetic (p_t + window).
LARGEST_INT = 2**31 - 1


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """An integer in range (a NumPy integer too, as torch's int arguments take), as an int."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    value = int(value)
    if not minimum <= value <= LARGEST_INT:
        raise ValueError(f"{name} must be in [{minimum}, {LARGEST_INT}], got {value}")
    return value


def finite_number(name: str, value: object) -> float:
    """A finite real number (a NumPy scalar too, as torch's float arguments take), as a float."""
    # type() first: an isinstance against the numbers ABCs costs about 0.3 us a call.
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a number, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int | None], meaning: Meaning) -> None:
    """``expected`` may hold ``None`` for a free size; ``meaning`` spells it out."""
    actual = value.shape
    if actual == expected:  # the common case, one comparison
        return
    if len(actual) != len(expected):
        raise ValueError(f"{name} must have shape {spelled(meaning)}, got {describe(value)}")
    for want, got in zip(expected, actual):  # a loop: any() over a generator cost 0.6 us, this 0.4
        if want is not None and want != got:
            raise ValueError(f"{name} must have shape {spelled(meaning)}, got {describe(value)}")


def spelled(meaning: Meaning) -> str:
    """The text of a shape's ``meaning`` (see the module's note)."""
    return meaning() if callable(meaning) else meaning


def like(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    """``value`` must share ``reference``'s device and dtype; inside ``torch.autocast`` for
    their device, any two of float16, bfloat16 and float32 (the ops cast them to one)."""
    same_device(name, value, reference_name, reference)
    if value.dtype != reference.dtype and not autocast_casts(value, reference):
        raise TypeError(
            f"{name} must have the same dtype as {reference_name} ({reference.dtype}), "
            f"got {describe(value)}"
        )


def float_like(name: str, value: object, reference_name: str, reference: torch.Tensor) -> torch.Tensor:
    """:func:`float_tensor` then :func:`like`, for a ``reference`` that passed
    :func:`float_tensor`: a dense tensor of its dtype and device passes both at once."""
    if (
        isinstance(value, torch.Tensor)
        and value.dtype == reference.dtype
        and value.device == reference.device
        and value.layout == torch.strided
        and not value.is_nested
    ):
        return value
    float_tensor(name, value)
    like(name, value, reference_name, reference)
    return value


def autocast_casts(*tensors: torch.Tensor) -> bool:
    """Whether ``torch.autocast`` is on for the tensors' device and casts all of them."""
    return torch.is_autocast_enabled(tensors[0].device.type) and all(t.dtype in AUTOCAST_DTYPES for t in tensors)


def same_device(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(
            f"{name} must be on the same device as {reference_name} ({reference.device}), "
            f"got {describe(value)}"
        )
