"""The Python side of the compiled ops (torch.ops.fastattn.*): fake registrations
(through ``fake_kernels.register_fake``; the autograd ones are C++, csrc/autograd.cpp),
and the backend functions plugged into ``fastattn.backends``.

Imported by ``fastattn._extension`` once ``fastattn._C`` has loaded.  The CPU kernels
compute in float32 or float64: the attention kernels take float16 and bfloat16 inputs
and compute them in float32, and so do the cells' gate maths (their GEMMs run in the input
dtype); the layers run float32 copies of them (``in_float32``), the outputs back in the
input dtype.
"""

from __future__ import annotations

import functools

import torch

from fastattn import backends
from fastattn.ops import attention, decoder_step, higher_order, recurrent

LOW_PRECISION = (torch.float16, torch.bfloat16)


def in_float32(function):
    """Run ``function`` on float32 copies of float16/bfloat16 tensors, cast floating outputs back."""

    @functools.wraps(function)
    def run(*arguments, **keywords):
        low = next(
            (a.dtype for a in (*arguments, *keywords.values()) if isinstance(a, torch.Tensor) and a.dtype in LOW_PRECISION),
            None,
        )
        if low is None:
            return function(*arguments, **keywords)

        def up(value):
            return value.float() if isinstance(value, torch.Tensor) and value.dtype == low else value

        def down(value):
            return value.to(low) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        result = function(*map(up, arguments), **{name: up(value) for name, value in keywords.items()})
        return tuple(map(down, result)) if isinstance(result, tuple) else down(result)

    return run


BACKEND_FUNCTIONS = {
    "attention": attention.attention,
    "additive_attention": attention.additive_attention,
    "hard_attention": attention.hard_attention,
    "scaled_dot_product_attention": attention.scaled_dot_product_attention,
    "lstm_cell": recurrent.lstm_cell,
    "gru_cell": recurrent.gru_cell,
    "lstm_layer": recurrent.lstm_layer,
    "gru_layer": recurrent.gru_layer,
}


ATTENTION_OPS = ("attention", "additive_attention", "hard_attention", "scaled_dot_product_attention")
CELL_OPS = ("lstm_cell", "gru_cell")


def register_backend(
    name: str, device_types: tuple[str, ...], *, native_low_precision: tuple[str, ...] = tuple(BACKEND_FUNCTIONS)
) -> None:
    """Plug every op into backend ``name`` for tensors on ``device_types``; float16 /
    bfloat16 inputs run in float32 unless the kernels take them (the ops in ``native_low_precision``)."""
    for op, function in BACKEND_FUNCTIONS.items():
        backends.register(op, name, device_types)(function if op in native_low_precision else in_float32(function))
    # It answers None for other dtypes, and the module composes the step with the ops above.
    native_step = all(op in native_low_precision for op in BACKEND_FUNCTIONS)
    step_dtypes = decoder_step.FLOAT_DTYPES + (LOW_PRECISION if native_step else ())
    step = functools.partial(decoder_step.attention_decoder_step, dtypes=step_dtypes)
    backends.register("attention_decoder_step", name, device_types)(step)
    backends.mark_available(name)
