"""The LSTM/GRU ops of fastattn._C seen from Python: fake (meta) and autograd
registrations, and the backend functions for the "lstm_cell", "gru_cell",
"lstm_layer" and "gru_layer" ops.

The kernels have no LSTM projection (``proj_size``): a layer with ``w_hr`` runs the
reference, which is what torch.nn does too (cuDNN has no fused projection either).
"""

from __future__ import annotations

import torch

from fastattn import reference


def _empty_or_like(tensor, like):
    return torch.empty_like(tensor) if tensor is not None else like.new_empty(0)


def _none_if_absent(grad, tensor):
    return grad if tensor is not None else None


def _contiguous_or_zeros(grad, like):
    """The gradient of an output, or zeros when it had none: the forwards set
    ``materialize_grads`` off so that autograd never fills a zero gradient for their
    ``saved`` output (the size of the gate activations of every step)."""
    return grad.contiguous() if grad is not None else torch.zeros_like(like)


# ---------------------------------------------------------------- fake (meta) kernels


@torch.library.register_fake("fastattn::lstm_cell_forward")
def _lstm_cell_forward_fake(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return torch.empty_like(c), torch.empty_like(c), c.new_empty(c.shape[0], 4 * c.shape[1])


@torch.library.register_fake("fastattn::lstm_cell_backward")
def _lstm_cell_backward_fake(grad_h_next, grad_c_next, x, h, c, w_ih, w_hh, b_ih, b_hh, c_next, saved):
    return (
        torch.empty_like(x), torch.empty_like(h), torch.empty_like(c), torch.empty_like(w_ih),
        torch.empty_like(w_hh), _empty_or_like(b_ih, x), _empty_or_like(b_hh, x),
    )


@torch.library.register_fake("fastattn::gru_cell_forward")
def _gru_cell_forward_fake(x, h, w_ih, w_hh, b_ih, b_hh):
    return torch.empty_like(h), h.new_empty(h.shape[0], 4 * h.shape[1])


@torch.library.register_fake("fastattn::gru_cell_backward")
def _gru_cell_backward_fake(grad_h_next, x, h, w_ih, w_hh, b_ih, b_hh, saved):
    return (
        torch.empty_like(x), torch.empty_like(h), torch.empty_like(w_ih), torch.empty_like(w_hh),
        _empty_or_like(b_ih, x), _empty_or_like(b_hh, x),
    )


@torch.library.register_fake("fastattn::lstm_layer_forward")
def _lstm_layer_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    steps, batch, hidden = x.shape[0], x.shape[1], c0.shape[1]
    return (
        x.new_empty(steps, batch, hidden), torch.empty_like(h0), torch.empty_like(c0),
        x.new_empty(steps, batch, 5 * hidden),
    )


@torch.library.register_fake("fastattn::lstm_layer_backward")
def _lstm_layer_backward_fake(
    grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, output, saved
):
    return (
        torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_ih),
        torch.empty_like(w_hh), _empty_or_like(b_ih, x), _empty_or_like(b_hh, x),
    )


@torch.library.register_fake("fastattn::gru_layer_forward")
def _gru_layer_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    steps, batch, hidden = x.shape[0], x.shape[1], h0.shape[1]
    return x.new_empty(steps, batch, hidden), torch.empty_like(h0), x.new_empty(steps, batch, 4 * hidden)


@torch.library.register_fake("fastattn::gru_layer_backward")
def _gru_layer_backward_fake(grad_output, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, output, saved):
    return (
        torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih), torch.empty_like(w_hh),
        _empty_or_like(b_ih, x), _empty_or_like(b_hh, x),
    )


# ---------------------------------------------------------------- autograd


def _save_lstm_cell(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, output[1], output[2])


def _lstm_cell_backward(ctx, grad_h_next, grad_c_next, _grad_saved):
    x, h, c, w_ih, w_hh, b_ih, b_hh, c_next, saved = ctx.saved_tensors
    grads = torch.ops.fastattn.lstm_cell_backward(
        _contiguous_or_zeros(grad_h_next, c_next), _contiguous_or_zeros(grad_c_next, c_next),
        x, h, c, w_ih, w_hh, b_ih, b_hh, c_next, saved,
    )
    return (*grads[:5], _none_if_absent(grads[5], b_ih), _none_if_absent(grads[6], b_hh))


def _save_gru_cell(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, output[1])


def _gru_cell_backward(ctx, grad_h_next, _grad_saved):
    x, h, w_ih, w_hh, b_ih, b_hh, saved = ctx.saved_tensors
    grad_h_next = _contiguous_or_zeros(grad_h_next, h)
    grads = torch.ops.fastattn.gru_cell_backward(grad_h_next, x, h, w_ih, w_hh, b_ih, b_hh, saved)
    return (*grads[:4], _none_if_absent(grads[4], b_ih), _none_if_absent(grads[5], b_hh))


def _save_lstm_layer(ctx, inputs, output):
    *tensors, reverse = inputs
    ctx.reverse = reverse
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors, output[0], output[3])


def _lstm_layer_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_saved):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, output, saved = ctx.saved_tensors
    grads = torch.ops.fastattn.lstm_layer_backward(
        _contiguous_or_zeros(grad_output, output), _contiguous_or_zeros(grad_h_n, h0),
        _contiguous_or_zeros(grad_c_n, c0), x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, ctx.reverse, output, saved,
    )
    return (*grads[:5], _none_if_absent(grads[5], b_ih), _none_if_absent(grads[6], b_hh), None, None)


def _save_gru_layer(ctx, inputs, output):
    *tensors, reverse = inputs
    ctx.reverse = reverse
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors, output[0], output[2])


def _gru_layer_backward(ctx, grad_output, grad_h_n, _grad_saved):
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, saved = ctx.saved_tensors
    grads = torch.ops.fastattn.gru_layer_backward(
        _contiguous_or_zeros(grad_output, output), _contiguous_or_zeros(grad_h_n, h0), x, h0, w_ih, w_hh, b_ih, b_hh,
        lengths, ctx.reverse, output, saved,
    )
    return (*grads[:4], _none_if_absent(grads[4], b_ih), _none_if_absent(grads[5], b_hh), None, None)


torch.library.register_autograd("fastattn::lstm_cell_forward", _lstm_cell_backward, setup_context=_save_lstm_cell)
torch.library.register_autograd("fastattn::gru_cell_forward", _gru_cell_backward, setup_context=_save_gru_cell)
torch.library.register_autograd("fastattn::lstm_layer_forward", _lstm_layer_backward, setup_context=_save_lstm_layer)
torch.library.register_autograd("fastattn::gru_layer_forward", _gru_layer_backward, setup_context=_save_gru_layer)


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
