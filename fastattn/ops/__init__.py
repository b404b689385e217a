"""The Python side of the compiled ops (torch.ops.fastattn.*): fake registrations
(through ``fake_kernels.register_fake``; the autograd ones are C++, csrc/autograd.cpp),
and the backend functions plugged into ``fastattn.backends``.

Imported by ``fastattn._extension`` once ``fastattn._C`` has loaded.  Every kernel takes
float16 and bfloat16 inputs itself and returns the input dtype; the CPU kernels compute
them in float32, with bfloat16 GEMMs in bfloat16 where csrc/cpu says so.
"""

from __future__ import annotations

from fastattn import backends
from fastattn.ops import attention, decoder_step, higher_order, recurrent

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


def register_backend(name: str, device_types: tuple[str, ...]) -> None:
    """Plug every op into backend ``name`` for tensors on ``device_types``, and the fused
    decoder step, which composes them (where it answers None, the module composes the step
    with the ops above)."""
    for op, function in BACKEND_FUNCTIONS.items():
        backends.register(op, name, device_types)(function)
    backends.register("attention_decoder_step", name, device_types)(decoder_step.attention_decoder_step)
    backends.mark_available(name)
