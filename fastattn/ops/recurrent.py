"""The LSTM/GRU ops of fastattn._C seen from Python: fake (meta) registrations (their
autograd is C++, csrc/autograd.cpp), and the backend functions for the "lstm_cell", "gru_cell",
"lstm_layer" and "gru_layer" ops.

The kernels have no LSTM projection (``proj_size``): a layer with ``w_hr`` runs the
reference, which is what torch.nn does too (cuDNN has no fused projection either).
"""

from __future__ import annotations

import torch

from fastattn import reference
from fastattn.ops import triton_checks
from fastattn.ops.fake_kernels import contiguous_like, contiguous_like_or_empty, register_fake

GATES = {"lstm": 4, "gru": 3}
SAVED_WIDTHS = {"lstm": 5, "gru": 4}  # a layer's saved row, in units of H


# ---------------------------------------------------------------- fake (meta) kernels
#
# Each checks the shapes, dtypes and devices the kernels check (csrc/cpu/recurrent.cpp,
# csrc/cuda/binding.cpp), with the Triton ops' checks (triton_checks), never values: a
# call the kernels refuse fails at trace time too.


def _check_cell(op, cell, state_name, **tensors):
    """A cell op's tensors by name, as the kernels take them: B from x (B, I), each tensor in
    x's dtype on x's device; then the shapes of triton_checks.cell (H from the state), saved
    (B, 4H) in x's dtype, the LSTM's h of any width."""
    x = tensors["x"]
    triton_checks.float_tensor(op, "x", x, 2)
    for name, value in tensors.items():
        if value is not None:
            shape = (x.shape[0], None) if name == state_name else (None,) * value.dim()
            triton_checks.tensor(op, name, value, x, shape)
    triton_checks.cell(op, GATES[cell], state_name, tensors, saved_dtype=None, any_h_width=cell == "lstm")


def _check_layer(op, cell, x, w_hh, lengths, **tensors):
    """A layer op's tensors by name: x (T, B, I), H from w_hh (gates * H, H), lengths (B,) of
    an integer dtype on any device (the kernels move it), w_ih (gates * H, I), b_ih and b_hh
    (gates * H,), saved (T, B, width * H), output and grad_output (T, B, H), any other (B, H);
    all in x's dtype, on x's device."""
    triton_checks.float_tensor(op, "x", x, 3)
    gates = GATES[cell]
    triton_checks.float_tensor(op, "w_hh", w_hh, 2)
    if w_hh.shape[0] % gates:
        raise ValueError(f"fastattn::{op}: w_hh must be ({gates} * H, H), got shape {tuple(w_hh.shape)}")
    (steps, batch, inputs), hidden = x.shape, w_hh.shape[0] // gates
    triton_checks.optional_tensor(op, "lengths", lengths, x, (batch,), "integer", same_device=False)
    shapes = {
        "w_ih": (gates * hidden, inputs), "w_hh": (gates * hidden, hidden), "b_ih": (gates * hidden,),
        "b_hh": (gates * hidden,), "saved": (steps, batch, SAVED_WIDTHS[cell] * hidden),
        "output": (steps, batch, hidden), "grad_output": (steps, batch, hidden),
    }
    for name, value in dict(tensors, w_hh=w_hh).items():
        triton_checks.optional_tensor(op, name, value, x, shapes.get(name, (batch, hidden)))


@register_fake("fastattn::lstm_cell_forward")
def _lstm_cell_forward_fake(x, h, c, w_ih, w_hh, b_ih, b_hh):
    _check_cell("lstm_cell_forward", "lstm", "c", x=x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    return contiguous_like(c), contiguous_like(c), c.new_empty(c.shape[0], 4 * c.shape[1])


@register_fake("fastattn::lstm_cell_backward")
def _lstm_cell_backward_fake(grad_h_next, grad_c_next, x, h, c, w_ih, w_hh, b_ih, b_hh, c_next, saved):
    _check_cell("lstm_cell_backward", "lstm", "c", grad_h_next=grad_h_next, grad_c_next=grad_c_next, x=x, h=h, c=c,
                w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, c_next=c_next, saved=saved)
    return (
        contiguous_like(x), contiguous_like(h), contiguous_like(c), contiguous_like(w_ih),
        contiguous_like(w_hh), contiguous_like_or_empty(b_ih, x), contiguous_like_or_empty(b_hh, x),
    )


@register_fake("fastattn::gru_cell_forward")
def _gru_cell_forward_fake(x, h, w_ih, w_hh, b_ih, b_hh):
    _check_cell("gru_cell_forward", "gru", "h", x=x, h=h, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    return contiguous_like(h), h.new_empty(h.shape[0], 4 * h.shape[1])


@register_fake("fastattn::gru_cell_backward")
def _gru_cell_backward_fake(grad_h_next, x, h, w_ih, w_hh, b_ih, b_hh, saved):
    _check_cell("gru_cell_backward", "gru", "h", grad_h_next=grad_h_next, x=x, h=h, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih,
                b_hh=b_hh, saved=saved)
    return (
        contiguous_like(x), contiguous_like(h), contiguous_like(w_ih), contiguous_like(w_hh),
        contiguous_like_or_empty(b_ih, x), contiguous_like_or_empty(b_hh, x),
    )


@register_fake("fastattn::lstm_layer_forward")
def _lstm_layer_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    _check_layer("lstm_layer_forward", "lstm", x, w_hh, lengths, h0=h0, c0=c0, w_ih=w_ih, b_ih=b_ih, b_hh=b_hh)
    steps, batch, hidden = x.shape[0], x.shape[1], c0.shape[1]
    return (
        x.new_empty(steps, batch, hidden), contiguous_like(h0), contiguous_like(c0),
        x.new_empty(steps, batch, 5 * hidden),
    )


@register_fake("fastattn::lstm_layer_backward")
def _lstm_layer_backward_fake(
    grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, output, saved
):
    _check_layer("lstm_layer_backward", "lstm", x, w_hh, lengths, h0=h0, c0=c0, w_ih=w_ih, b_ih=b_ih, b_hh=b_hh,
                 grad_output=grad_output, grad_h_n=grad_h_n, grad_c_n=grad_c_n, output=output, saved=saved)
    return (
        contiguous_like(x), contiguous_like(h0), contiguous_like(c0), contiguous_like(w_ih),
        contiguous_like(w_hh), contiguous_like_or_empty(b_ih, x), contiguous_like_or_empty(b_hh, x),
    )


@register_fake("fastattn::gru_layer_forward")
def _gru_layer_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    _check_layer("gru_layer_forward", "gru", x, w_hh, lengths, h0=h0, w_ih=w_ih, b_ih=b_ih, b_hh=b_hh)
    steps, batch, hidden = x.shape[0], x.shape[1], h0.shape[1]
    return x.new_empty(steps, batch, hidden), contiguous_like(h0), x.new_empty(steps, batch, 4 * hidden)


@register_fake("fastattn::gru_layer_backward")
def _gru_layer_backward_fake(grad_output, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, output, saved):
    _check_layer("gru_layer_backward", "gru", x, w_hh, lengths, h0=h0, w_ih=w_ih, b_ih=b_ih, b_hh=b_hh,
                 grad_output=grad_output, grad_h_n=grad_h_n, output=output, saved=saved)
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
