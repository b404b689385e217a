"""The reference implementations: plain PyTorch, the specification of every kernel.

Importing this package registers each function as the ``"reference"`` backend of
its op, runnable on any device; inside ``torch.autocast`` it runs in the autocast dtype,
as the other backends do (:func:`fastattn.backends.in_autocast_dtype`).
"""

from fastattn import backends
from fastattn.reference.attention import additive_attention, attention, scaled_dot_product_attention
from fastattn.reference.hard import hard_attention
from fastattn.reference.recurrent import gru_cell, gru_layer, lstm_cell, lstm_layer

_REFERENCE_OPS = {
    "attention": attention,
    "additive_attention": additive_attention,
    "hard_attention": hard_attention,
    "scaled_dot_product_attention": scaled_dot_product_attention,
    "lstm_cell": lstm_cell,
    "gru_cell": gru_cell,
    "lstm_layer": lstm_layer,
    "gru_layer": gru_layer,
}
for _op, _function in _REFERENCE_OPS.items():
    backends.register(_op, "reference", None)(backends.in_autocast_dtype(_function))

__all__ = list(_REFERENCE_OPS)
