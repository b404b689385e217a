"""Plugs the Triton kernels into ``fastattn.backends`` as backend ``"triton"``.

It runs CUDA tensors when a GPU is present; under Triton's interpreter
(``TRITON_INTERPRET=1``, set by the tests on a machine without a GPU) it also runs
CPU tensors, so the tests can call it explicitly.  ``"auto"`` never picks it for CPU
tensors (``backends.AUTO_ORDER``).  Attention reuses ``fastattn.ops.attention``'s
mapping of the six scores onto the kernels; float64 inputs run the reference (Triton's
kernels here compute float32/float16/bfloat16, accumulating in float32).  Inside
``torch.autocast`` every backend function runs in the autocast dtype, its floating
tensors cast through torch's autocast cache (the Triton ops have no autocast kernels:
:func:`fastattn.backends.in_autocast_dtype`).
"""

from __future__ import annotations

import functools

import torch

from fastattn import backends
from fastattn.info import BACKEND_NOTES

REFERENCE_NOTE = (
    "float64 inputs run the reference (the Triton kernels take float32, float16 and bfloat16), and so does "
    "attention whose features pass what the kernels hold on chip (triton_attention.fits_on_chip: float32 "
    "Dv > 1024 with gradients, say)"
)


def _in_kernel_dtypes(function, reference_function):
    """``function``, with float64 inputs sent to ``reference_function`` and, inside
    ``torch.autocast``, run in the autocast dtype (:func:`fastattn.backends.in_autocast_dtype`)."""
    return backends.in_autocast_dtype(function, float64_to=reference_function)


def _backend_functions() -> dict:
    from fastattn.ops import attention, triton_attention, triton_hard, triton_recurrent

    fused = triton_attention.fused
    return {
        "attention": functools.partial(attention.attention, fused=fused),
        "additive_attention": functools.partial(attention.additive_attention, fused=fused),
        "hard_attention": functools.partial(
            attention.hard_attention, fused=fused, outputs=triton_hard.hard_attention_outputs
        ),
        "scaled_dot_product_attention": functools.partial(attention.scaled_dot_product_attention, fused=fused),
        "lstm_cell": triton_recurrent.lstm_cell,
        "gru_cell": triton_recurrent.gru_cell,
        "lstm_layer": triton_recurrent.lstm_layer,
        "gru_layer": triton_recurrent.gru_layer,
    }


def load() -> None:
    """Register the backend, or record why it cannot run here."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        backends.mark_unavailable("triton", f"Triton is not installed ({error}); `pip install triton`")
        return
    from fastattn.ops.triton_launch import INTERPRETED

    if not torch.cuda.is_available() and not INTERPRETED:
        backends.mark_unavailable("triton", "the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for tests)")
        return
    register(("cuda", "cpu") if INTERPRETED else ("cuda",))


def register(device_types: tuple[str, ...]) -> None:
    """Register the Triton implementation of every op for tensors of ``device_types`` and
    mark the backend available (``load``; the compile check also routes CPU tensors here,
    to record the launches a GPU run makes)."""
    reference_functions = {op: backends.implementation(op, "cpu", "reference") for op in backends.OPS}
    for op, function in _backend_functions().items():
        backends.register(op, "triton", device_types)(_in_kernel_dtypes(function, reference_functions[op]))
    backends.mark_available("triton")
    BACKEND_NOTES["triton"] = REFERENCE_NOTE
