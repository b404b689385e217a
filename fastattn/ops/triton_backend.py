"""Plugs the Triton kernels into ``fastattn.backends`` as backend ``"triton"``.

It runs CUDA tensors when a GPU is present; under Triton's interpreter
(``TRITON_INTERPRET=1``, set by the tests on a machine without a GPU) it also runs
CPU tensors, so the tests can call it explicitly.  ``"auto"`` never picks it for CPU
tensors (``backends.AUTO_ORDER``).  Attention reuses ``fastattn.ops.attention``'s
mapping of the six scores onto the kernels; float64 inputs run the reference (Triton's
kernels here compute float32/float16/bfloat16, accumulating in float32).  Inside
``torch.autocast`` every backend function runs in the autocast dtype: its floating
tensors are cast (local-p centers to float32), then it runs with autocast off (the Triton ops have no autocast
kernels).  The casts go through torch's autocast cache (``torch.ops.fastattn.autocast_cast``,
with the C++ extension loaded): a float32 parameter is cast once per autocast region,
not at every step of a decoder, as torch's own layers do; while ``torch.compile``
traces, and without the extension, they are plain ``.to`` casts.
"""

from __future__ import annotations

import functools

import torch

from fastattn import backends
from fastattn.info import BACKEND_NOTES

FLOAT64_NOTE = "float64 inputs run the reference (the Triton kernels take float32, float16 and bfloat16)"


def _in_kernel_dtypes(function, reference_function):
    """``function``, with float64 inputs sent to ``reference_function`` and, inside
    ``torch.autocast``, its floating tensors cast to the autocast dtype (see the module
    docstring)."""

    @functools.wraps(function)
    def run(*arguments, **keywords):
        tensors = [a for a in (*arguments, *keywords.values()) if isinstance(a, torch.Tensor)]
        if any(tensor.dtype == torch.float64 for tensor in tensors):
            return reference_function(*arguments, **keywords)
        device_type = tensors[0].device.type
        if not torch.is_autocast_enabled(device_type):
            return function(*arguments, **keywords)
        dtype = torch.get_autocast_dtype(device_type)
        cached_cast = None if torch.compiler.is_compiling() else getattr(torch.ops.fastattn, "autocast_cast", None)

        def cast(value):
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                return value
            if cached_cast is None:
                return value.to(dtype)
            return cached_cast(value)

        arguments = [cast(a) for a in arguments]
        # local-p centers are positions: float32, which every query dtype takes (center_dtypes)
        keywords = {
            name: value.float() if name == "center" and value is not None else cast(value)
            for name, value in keywords.items()
        }
        with torch.autocast(device_type, enabled=False):  # cast above, inside autocast: cached
            return function(*arguments, **keywords)

    return run


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
    BACKEND_NOTES["triton"] = FLOAT64_NOTE
