"""The Triton LSTM/GRU ops and the backend functions "lstm_cell", "gru_cell",
"lstm_layer", "gru_layer" of backend "triton".

A step of at most ``FUSED_STEP_MAX_BATCH`` rows is one launch: both GEMMs x @ W_ih^T and
h @ W_hh^T, the biases and the update run in the kernel, whose pre-activations stay in
float32.  A larger step runs its GEMMs in torch and the pointwise part in one fused
kernel.  The backward runs a fused pointwise kernel, then torch's GEMMs.
Layers loop the cells over time in Python (``fastattn.reference.recurrent``'s driver:
lengths and direction handled there), not yet a persistent kernel; an LSTM layer
with a projection (``w_hr``) runs the reference.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from fastattn import reference
from fastattn.kernels.recurrent_cells import (
    gru_pointwise_backward_kernel,
    gru_pointwise_kernel,
    gru_step_kernel,
    lstm_pointwise_backward_kernel,
    lstm_pointwise_kernel,
    lstm_step_kernel,
)
from fastattn.ops import triton_checks
from fastattn.ops.triton_configs import RECURRENT_POINTWISE, RECURRENT_STEP
from fastattn.ops.triton_launch import Launcher, contiguous_or_none, dot_precision
from fastattn.reference.recurrent import _run_over_time

FUSED_STEP_MAX_BATCH = 64
LAUNCHERS = {  # kernel name -> Launcher
    **{
        kernel.__name__: Launcher(kernel, RECURRENT_POINTWISE)
        for kernel in (lstm_pointwise_kernel, lstm_pointwise_backward_kernel, gru_pointwise_kernel, gru_pointwise_backward_kernel)
    },
    **{kernel.__name__: Launcher(kernel, RECURRENT_STEP) for kernel in (lstm_step_kernel, gru_step_kernel)},
}


def _launch(kernel, batch, hidden, *arguments, **constexprs):
    """Launch a cell kernel over (batch blocks, hidden blocks); its last two size arguments are B and H."""
    LAUNCHERS[kernel.__name__](
        lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), triton.cdiv(hidden, meta["BLOCK_H"])),
        *arguments, batch, hidden, **constexprs,
    )


def _checked(op: str, gates: int, state_name: str, **tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """The op's tensors, checked (triton_checks.cell) and contiguous, as the kernels index them."""
    triton_checks.cell(op, gates, state_name, tensors)
    return [contiguous_or_none(tensor) for tensor in tensors.values()]


def _pointer(tensor: Optional[Tensor], stand_in: Tensor) -> Tensor:
    """An optional tensor argument of a kernel; ``stand_in`` (never read) when absent."""
    return stand_in if tensor is None else tensor


# ---------------------------------------------------------------- LSTM


@torch.library.triton_op("fastattn::triton_lstm_pointwise", mutates_args=())
def triton_lstm_pointwise(gates_x: Tensor, gates_h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x W_ih^T + b_ih, h W_hh^T + b_hh, c) -> (h', c', saved (B, 4H) float32)."""
    gates_x, gates_h, c = _checked("triton_lstm_pointwise", 4, "c", gates_x=gates_x, gates_h=gates_h, c=c)
    batch, hidden = c.shape
    h_next, c_next = torch.empty_like(c), torch.empty_like(c)
    saved = c.new_empty(batch, 4 * hidden, dtype=torch.float32)
    _launch(lstm_pointwise_kernel, batch, hidden, gates_x, gates_h, c, h_next, c_next, saved)
    return h_next, c_next, saved


@torch.library.triton_op("fastattn::triton_lstm_step", mutates_args=())
def triton_lstm_step(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """A whole LSTM step in one launch -> (h', c', saved)."""
    x, h, c, w_ih, w_hh, b_ih, b_hh = _checked(
        "triton_lstm_step", 4, "c", x=x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh
    )
    batch, hidden = c.shape
    h_next, c_next = torch.empty_like(c), torch.empty_like(c)
    saved = c.new_empty(batch, 4 * hidden, dtype=torch.float32)
    _launch(
        lstm_step_kernel, batch, hidden, x, h, c, w_ih, w_hh, _pointer(b_ih, x), _pointer(b_hh, x), h_next, c_next,
        saved, x.shape[1], HAS_INPUT_BIAS=b_ih is not None, HAS_HIDDEN_BIAS=b_hh is not None,
        DOT_PRECISION=dot_precision(h.dtype),
    )
    return h_next, c_next, saved


@torch.library.triton_op("fastattn::triton_lstm_pointwise_backward", mutates_args=())
def triton_lstm_pointwise_backward(
    grad_h_next: Tensor, grad_c_next: Tensor, c: Tensor, c_next: Tensor, saved: Tensor
) -> tuple[Tensor, Tensor]:
    """-> (gradient of the pre-activation gates (B, 4H) float32, gradient of c)."""
    grad_h_next, grad_c_next, c, c_next, saved = _checked(
        "triton_lstm_pointwise_backward", 4, "c", grad_h_next=grad_h_next, grad_c_next=grad_c_next, c=c,
        c_next=c_next, saved=saved,
    )
    batch, hidden = c.shape
    grad_gates = torch.empty_like(saved)
    grad_c = torch.empty_like(c)
    _launch(lstm_pointwise_backward_kernel, batch, hidden, grad_h_next, grad_c_next, c, c_next, saved, grad_gates, grad_c)
    return grad_gates, grad_c


def _no_second_derivative(ctx, *grads):
    raise RuntimeError(
        "fastattn's Triton LSTM/GRU kernels have no second derivative (a gradient taken with create_graph=True "
        "reached a fastattn LSTM/GRU run on the triton backend): run that module on the 'cuda' or 'reference' "
        "backend, whose gradients are differentiable"
    )


# Gradients of gradients would need the gate pre-activations, which these kernels do not
# keep: a second backward through them raises rather than returning nothing.
torch.library.register_autograd("fastattn::triton_lstm_pointwise_backward", _no_second_derivative)


def _lstm_gate_gradients(ctx, grad_h_next, grad_c_next):
    c, c_next, saved = ctx.saved_tensors[:3]
    grad_h_next = torch.zeros_like(c) if grad_h_next is None else grad_h_next
    grad_c_next = torch.zeros_like(c) if grad_c_next is None else grad_c_next
    return torch.ops.fastattn.triton_lstm_pointwise_backward(grad_h_next, grad_c_next, c, c_next, saved)


def _save_lstm_pointwise(ctx, inputs, output):
    ctx.gates_dtype = inputs[0].dtype
    ctx.save_for_backward(inputs[2], output[1], output[2])


def _lstm_pointwise_backward(ctx, grad_h_next, grad_c_next, _grad_saved):
    grad_gates, grad_c = _lstm_gate_gradients(ctx, grad_h_next, grad_c_next)
    grad_gates = grad_gates.to(ctx.gates_dtype)
    return grad_gates, grad_gates, grad_c


def _save_lstm_step(ctx, inputs, output):
    x, h, c, w_ih, w_hh, b_ih, b_hh = inputs
    ctx.biases = (b_ih is not None, b_hh is not None)
    ctx.save_for_backward(c, output[1], output[2], x, h, w_ih, w_hh)


def _lstm_step_backward(ctx, grad_h_next, grad_c_next, _grad_saved):
    x, h, w_ih, w_hh = ctx.saved_tensors[3:]
    grad_gates, grad_c = _lstm_gate_gradients(ctx, grad_h_next, grad_c_next)
    grad_bias = grad_gates.sum(0).to(h.dtype) if any(ctx.biases) else None
    grad_gates = grad_gates.to(h.dtype)
    return (
        grad_gates @ w_ih, grad_gates @ w_hh, grad_c, grad_gates.T @ x, grad_gates.T @ h,
        *(grad_bias if has_bias else None for has_bias in ctx.biases),
    )


torch.library.register_autograd(
    "fastattn::triton_lstm_pointwise", _lstm_pointwise_backward, setup_context=_save_lstm_pointwise
)
torch.library.register_autograd("fastattn::triton_lstm_step", _lstm_step_backward, setup_context=_save_lstm_step)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """The "lstm_cell" op: one fused launch for small batches, else cuBLAS GEMMs + fused pointwise."""
    if x.shape[0] <= FUSED_STEP_MAX_BATCH:
        h_next, c_next, _ = torch.ops.fastattn.triton_lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    else:
        gates_x, gates_h = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)
        h_next, c_next, _ = torch.ops.fastattn.triton_lstm_pointwise(gates_x, gates_h, c)
    return h_next, c_next


# ---------------------------------------------------------------- GRU


@torch.library.triton_op("fastattn::triton_gru_pointwise", mutates_args=())
def triton_gru_pointwise(gates_x: Tensor, gates_h: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """(x W_ih^T + b_ih, h W_hh^T + b_hh, h) -> (h', saved (B, 4H) float32)."""
    gates_x, gates_h, h = _checked("triton_gru_pointwise", 3, "h", gates_x=gates_x, gates_h=gates_h, h=h)
    batch, hidden = h.shape
    h_next = torch.empty_like(h)
    saved = h.new_empty(batch, 4 * hidden, dtype=torch.float32)
    _launch(gru_pointwise_kernel, batch, hidden, gates_x, gates_h, h, h_next, saved)
    return h_next, saved


@torch.library.triton_op("fastattn::triton_gru_pointwise_backward", mutates_args=())
def triton_gru_pointwise_backward(grad_h_next: Tensor, h: Tensor, saved: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> gradients of (gates_x, gates_h) (B, 3H) and the direct part of h's (B, H)."""
    grad_h_next, h, saved = _checked(
        "triton_gru_pointwise_backward", 3, "h", grad_h_next=grad_h_next, h=h, saved=saved
    )
    batch, hidden = h.shape
    grad_gates_x = h.new_empty(batch, 3 * hidden)
    grad_gates_h = h.new_empty(batch, 3 * hidden)
    grad_h = torch.empty_like(h)
    _launch(gru_pointwise_backward_kernel, batch, hidden, grad_h_next, h, saved, grad_gates_x, grad_gates_h, grad_h)
    return grad_gates_x, grad_gates_h, grad_h


@torch.library.triton_op("fastattn::triton_gru_step", mutates_args=())
def triton_gru_step(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """A whole GRU step in one launch -> (h', saved)."""
    x, h, w_ih, w_hh, b_ih, b_hh = _checked(
        "triton_gru_step", 3, "h", x=x, h=h, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh
    )
    batch, hidden = h.shape
    h_next = torch.empty_like(h)
    saved = h.new_empty(batch, 4 * hidden, dtype=torch.float32)
    _launch(
        gru_step_kernel, batch, hidden, x, h, w_ih, w_hh, _pointer(b_ih, x), _pointer(b_hh, x), h_next, saved,
        x.shape[1], HAS_INPUT_BIAS=b_ih is not None, HAS_HIDDEN_BIAS=b_hh is not None,
        DOT_PRECISION=dot_precision(h.dtype),
    )
    return h_next, saved


torch.library.register_autograd("fastattn::triton_gru_pointwise_backward", _no_second_derivative)


def _save_gru_pointwise(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], output[1])


def _gru_pointwise_backward(ctx, grad_h_next, _grad_saved):
    h, saved = ctx.saved_tensors
    grad_h_next = torch.zeros_like(h) if grad_h_next is None else grad_h_next
    return torch.ops.fastattn.triton_gru_pointwise_backward(grad_h_next, h, saved)


def _save_gru_step(ctx, inputs, output):
    x, h, w_ih, w_hh, b_ih, b_hh = inputs
    ctx.biases = (b_ih is not None, b_hh is not None)
    ctx.save_for_backward(h, output[1], x, w_ih, w_hh)


def _gru_step_backward(ctx, grad_h_next, _grad_saved):
    h, saved, x, w_ih, w_hh = ctx.saved_tensors
    grad_h_next = torch.zeros_like(h) if grad_h_next is None else grad_h_next
    grad_gates_x, grad_gates_h, grad_h = torch.ops.fastattn.triton_gru_pointwise_backward(grad_h_next, h, saved)
    return (
        grad_gates_x @ w_ih, grad_h + grad_gates_h @ w_hh, grad_gates_x.T @ x, grad_gates_h.T @ h,
        grad_gates_x.sum(0) if ctx.biases[0] else None, grad_gates_h.sum(0) if ctx.biases[1] else None,
    )


torch.library.register_autograd(
    "fastattn::triton_gru_pointwise", _gru_pointwise_backward, setup_context=_save_gru_pointwise
)
torch.library.register_autograd("fastattn::triton_gru_step", _gru_step_backward, setup_context=_save_gru_step)


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """The "gru_cell" op: one fused launch for small batches, else cuBLAS GEMMs + fused pointwise."""
    if x.shape[0] <= FUSED_STEP_MAX_BATCH:
        return torch.ops.fastattn.triton_gru_step(x, h, w_ih, w_hh, b_ih, b_hh)[0]
    gates_x, gates_h = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)
    return torch.ops.fastattn.triton_gru_pointwise(gates_x, gates_h, h)[0]


# ---------------------------------------------------------------- layers


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, reverse=False):
    if w_hr is not None:
        return reference.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)

    def step(x_t, state):
        return lstm_cell(x_t, *state, w_ih, w_hh, b_ih, b_hh)

    output, (h_n, c_n) = _run_over_time(step, x, (h0, c0), lengths, reverse)
    return output, h_n, c_n


def gru_layer(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, reverse=False):
    def step(x_t, state):
        return (gru_cell(x_t, *state, w_ih, w_hh, b_ih, b_hh),)

    output, (h_n,) = _run_over_time(step, x, (h0,), lengths, reverse)
    return output, h_n
