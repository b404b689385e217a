"""The LSTM/GRU ops of fastattn._C seen from Python: fake (meta) registrations (their
autograd is C++, csrc/autograd.cpp), and the backend functions for the "lstm_cell", "gru_cell",
"lstm_layer" and "gru_layer" ops.

The kernels have no LSTM projection (``proj_size``): a layer with ``w_hr`` runs the
reference, which is what torch.nn does too (cuDNN has no fused projection either).
"""

from __future__ import annotations

import torch

from fastattn import reference
from fastattn.ops.fake_kernels import contiguous_like, contiguous_like_or_empty, register_fake


# ---------------------------------------------------------------- fake (meta) kernels


@register_fake("fastattn::lstm_cell_forward")
def _lstm_cell_forward_fake(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return contiguous_like(c), contiguous_like(c), c.new_empty(c.shape[0], 4 * c.shape[1])


@register_fake("fastattn::lstm_cell_backward")
def _lstm_cell_backward_fake(grad_h_next, grad_c_next, x, h, c, w_ih, w_hh, b_ih, b_hh, c_next, saved):
    return (
        contiguous_like(x), contiguous_like(h), contiguous_like(c), contiguous_like(w_ih),
        contiguous_like(w_hh), contiguous_like_or_empty(b_ih, x), contiguous_like_or_empty(b_hh, x),
    )


@register_fake("fastattn::gru_cell_forward")
def _gru_cell_forward_fake(x, h, w_ih, w_hh, b_ih, b_hh):
    return contiguous_like(h), h.new_empty(h.shape[0], 4 * h.shape[1])


@register_fake("fastattn::gru_cell_backward")
def _gru_cell_backward_fake(grad_h_next, x, h, w_ih, w_hh, b_ih, b_hh, saved):
    return (
        contiguous_like(x), contiguous_like(h), contiguous_like(w_ih), contiguous_like(w_hh),
        contiguous_like_or_empty(b_ih, x), contiguous_like_or_empty(b_hh, x),
    )


@register_fake("fastattn::lstm_layer_forward")
def _lstm_layer_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    steps, batch, hidden = x.shape[0], x.shape[1], c0.shape[1]
    return (
        x.new_empty(steps, batch, hidden), contiguous_like(h0), contiguous_like(c0),
        x.new_empty(steps, batch, 5 * hidden),
    )


@register_fake("fastattn::lstm_layer_backward")
def _lstm_layer_backward_fake(
    grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, output, saved
):
    return (
        contiguous_like(x), contiguous_like(h0), contiguous_like(c0), contiguous_like(w_ih),
        contiguous_like(w_hh), contiguous_like_or_empty(b_ih, x), contiguous_like_or_empty(b_hh, x),
    )


@register_fake("fastattn::gru_layer_forward")
def _gru_layer_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    steps, batch, hidden = x.shape[0], x.shape[1], h0.shape[1]
    return x.new_empty(steps, batch, hidden), contiguous_like(h0), x.new_empty(steps, batch, 4 * hidden)


@register_fake("fastattn::gru_layer_backward")
def _gru_layer_backward_fake(grad_output, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, output, saved):
    return (
        contiguous_like(x), contiguous_like(h0), contiguous_like(w_ih), contiguous_like(w_hh),
        contiguous_like_or_empty(b_ih, x), contiguous_like_or_empty(b_hh, x),
    )


# ---------------------------------------------------------------- backend functions


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    h_next, c_next, _ = torch.ops.fastattn.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh)
    return h_next, c_next


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.ops.fastattn.gru_cell_forward(x, h, w_ih, w_hh, b_ih, b_hh)[0]


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, reverse=False):
    if w_hr is not None:
        return reference.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    output, h_n, c_n, _ = torch.ops.fastattn.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    return output, h_n, c_n


def gru_layer(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, reverse=False):
    output, h_n, _ = torch.ops.fastattn.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    return output, h_n
