"""The functional API: thin, checked entry points that dispatch to a backend."""

from fastattn.functional.attention import (
    additive_attention,
    attention,
    hard_attention,
    scaled_dot_product_attention,
)
from fastattn.functional.recurrent import gru_cell, lstm_cell

__all__ = [
    "attention",
    "additive_attention",
    "hard_attention",
    "scaled_dot_product_attention",
    "lstm_cell",
    "gru_cell",
]
