"""The Python side of the compiled ops (torch.ops.fastattn.*): fake registrations
(through ``fake_kernels.register_fake``; the autograd ones are C++, csrc/autograd.cpp),
and the backend functions plugged into ``fastattn.backends``.

Imported by ``fastattn._extension`` once ``fastattn._C`` has loaded.  The CPU kernels
compute in float32 or float64; float16 and bfloat16 inputs run in float32 and the
outputs come back in the input dtype.
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

        copies = {}  # by identity: a tensor passed twice (the keys as the values) is copied and saved once

        def up(value):
            if not (isinstance(value, torch.Tensor) and value.dtype == low):
                return value
            if id(value) not in copies:
                copies[id(value)] = value.float()
            return copies[id(value)]

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


def register_backend(name: str, device_types: tuple[str, ...], *, native_low_precision: bool = False) -> None:
    """Plug every op into backend ``name`` for tensors on ``device_types``; float16 /
    bfloat16 inputs run in float32 unless the kernels take them (``native_low_precision``)."""
    for op, function in BACKEND_FUNCTIONS.items():
        backends.register(op, name, device_types)(function if native_low_precision else in_float32(function))
    # It answers None for other dtypes, and the module composes the step with the ops above.
    step_dtypes = decoder_step.FLOAT_DTYPES + (LOW_PRECISION if native_low_precision else ())
    step = functools.partial(decoder_step.attention_decoder_step, dtypes=step_dtypes)
    backends.register("attention_decoder_step", name, device_types)(step)
    backends.mark_available(name)
