"""The Triton LSTM/GRU ops and the backend functions "lstm_cell", "gru_cell",
"lstm_layer", "gru_layer" of backend "triton".

A cell step is one launch at every batch size: both GEMMs x @ W_ih^T and h @ W_hh^T, the
biases and the update run in the kernel, whose pre-activations stay in float32.  A layer
projects the input of every time step in one launch (float32, ``triton_input_projection``),
then runs one launch a step that reads its slice of that projection in place of
x @ W_ih^T; the time loop is Python's (``fastattn.reference.recurrent``'s driver: lengths
and direction handled there), not yet a persistent kernel.  The backward runs a fused
pointwise kernel, then torch's GEMMs (a layer's input GEMMs once, over every step).  An
LSTM layer with a projection (``w_hr``) runs the reference.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import reference
from fastattn.kernels.recurrent_cells import (
    gru_pointwise_backward_kernel,
    gru_step_kernel,
    input_projection_kernel,
    lstm_pointwise_backward_kernel,
    lstm_step_kernel,
)
from fastattn.ops import triton_checks
from fastattn.ops.triton_configs import INPUT_PROJECTION, RECURRENT_POINTWISE, RECURRENT_STEP
from fastattn.ops.triton_launch import Launcher, ceil_div, contiguous_or_none, dot_precision, pointer_or
from fastattn.reference.recurrent import _run_over_time, gru_update, lstm_update

LAUNCHERS = {  # kernel name -> Launcher
    **{
        kernel.__name__: Launcher(kernel, RECURRENT_POINTWISE)
        for kernel in (lstm_pointwise_backward_kernel, gru_pointwise_backward_kernel)
    },
    **{kernel.__name__: Launcher(kernel, RECURRENT_STEP) for kernel in (lstm_step_kernel, gru_step_kernel)},
    input_projection_kernel.__name__: Launcher(input_projection_kernel, INPUT_PROJECTION),
}


def _launch(kernel, batch, hidden, *arguments, **constexprs):
    """Launch a cell kernel over (batch blocks, hidden blocks); its last two size arguments are B and H."""
    LAUNCHERS[kernel.__name__](
        lambda meta: (ceil_div(batch, meta["BLOCK_B"]), ceil_div(hidden, meta["BLOCK_H"])),
        *arguments, batch, hidden, **constexprs,
    )


def _checked(op: str, gates: int, state_name: str, **tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """The op's tensors, checked (triton_checks.cell) and contiguous, as the kernels index them."""
    triton_checks.cell(op, gates, state_name, tensors)
    return [contiguous_or_none(tensor) for tensor in tensors.values()]


def _step_flags(h: Tensor, w_ih: Optional[Tensor], b_ih: Optional[Tensor], b_hh: Optional[Tensor]):
    """A step kernel's constexprs: x is the input with w_ih, or its float32 projection without."""
    return dict(
        PROJECTED_INPUT=w_ih is None, HAS_INPUT_BIAS=b_ih is not None, HAS_HIDDEN_BIAS=b_hh is not None,
        DOT_PRECISION=dot_precision(h.dtype),
    )


def _input_gradients(grad_gates: Tensor, x: Tensor, w_ih: Optional[Tensor], has_input_bias: bool):
    """The gradients of (x, w_ih, b_ih) from those of the gates' input parts (float32):
    through x W_ih^T + b_ih, or, when the step was given its projection (w_ih None),
    the projection's own."""
    if w_ih is None:
        return grad_gates, None, None
    grad_bias = grad_gates.sum(0).to(x.dtype) if has_input_bias else None
    grad_gates = grad_gates.to(x.dtype)
    return grad_gates @ w_ih, grad_gates.T @ x, grad_bias


# ---------------------------------------------------------------- input projection


@torch.library.triton_op("fastattn::triton_input_projection", mutates_args=())
def triton_input_projection(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x (M, K) @ w^T (N, K) + b (N,) -> (M, N) float32, one launch: a layer's input part of
    every gate at every time step (M = T·B), which its steps read in float32."""
    triton_checks.projection("triton_input_projection", x, w, b)
    x, w, b = x.contiguous(), w.contiguous(), contiguous_or_none(b)
    (rows, inner), columns = x.shape, w.shape[0]
    out = x.new_empty(rows, columns, dtype=torch.float32)
    LAUNCHERS[input_projection_kernel.__name__](
        lambda meta: (ceil_div(rows, meta["BLOCK_M"]), ceil_div(columns, meta["BLOCK_N"])),
        x, w, pointer_or(b, x), out, inner, rows, columns, HAS_BIAS=b is not None, DOT_PRECISION=dot_precision(x.dtype),
    )
    return out


def _save_input_projection(ctx, inputs, output):
    x, w, b = inputs
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w)


def _input_projection_backward(ctx, grad):
    x, w = ctx.saved_tensors
    return _input_gradients(grad, x, w, ctx.has_bias)


torch.library.register_autograd(
    "fastattn::triton_input_projection", _input_projection_backward, setup_context=_save_input_projection
)


# ---------------------------------------------------------------- LSTM


@torch.library.triton_op("fastattn::triton_lstm_step", mutates_args=())
def triton_lstm_step(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Optional[Tensor], w_hh: Tensor, b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """A whole LSTM step in one launch -> (h', c', saved (B, 4H) float32).  x: the input
    (B, I) with w_ih, or without w_ih (and b_ih) its projection x W_ih^T + b_ih (B, 4H)
    float32 (``triton_input_projection``)."""
    x, h, c, w_ih, w_hh, b_ih, b_hh = _checked(
        "triton_lstm_step", 4, "c", x=x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh
    )
    batch, hidden = c.shape
    h_next, c_next = torch.empty_like(c), torch.empty_like(c)
    saved = c.new_empty(batch, 4 * hidden, dtype=torch.float32)
    _launch(
        lstm_step_kernel, batch, hidden, x, h, c, pointer_or(w_ih, x), w_hh, pointer_or(b_ih, x), pointer_or(b_hh, x),
        h_next, c_next, saved, x.shape[1], **_step_flags(h, w_ih, b_ih, b_hh),
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
    _launch(
        lstm_pointwise_backward_kernel, batch, hidden, grad_h_next, grad_c_next, c, c_next, saved, grad_gates, grad_c
    )
    return grad_gates, grad_c


def _no_derivative(ctx, *grads):
    raise RuntimeError(
        "fastattn's Triton LSTM/GRU pointwise backward kernels have no derivative: a gradient taken with "
        "create_graph=True through triton_lstm_step / triton_gru_step comes from the reference's maths instead"
    )


# These kernels keep no gate pre-activations: differentiated, they raise rather than
# return nothing (the step ops never differentiate them, see _differentiable_backward).
torch.library.register_autograd("fastattn::triton_lstm_pointwise_backward", _no_derivative)


def _input_gates(x: Tensor, w_ih: Optional[Tensor], b_ih: Optional[Tensor]) -> Tensor:
    """x W_ih^T + b_ih, or x itself when a step is given that projection (w_ih None)."""
    return x if w_ih is None else F.linear(x, w_ih, b_ih)


def _lstm_step_maths(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return lstm_update(_input_gates(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), c)


def _gru_step_maths(x, h, w_ih, w_hh, b_ih, b_hh):
    return (gru_update(_input_gates(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), h),)


def _differentiable_backward(step_maths, inputs, grads) -> tuple[Optional[Tensor], ...]:
    """The gradients of a step's ``inputs`` when the backward itself must be differentiable
    (create_graph=True: gradient penalties, Hessian-vector products): through the
    reference's maths (``step_maths``), recorded for a further backward.  Each input
    enters as an alias of its own, so that a tensor passed twice gets each use's gradient
    once, as the kernels' backward gives it."""
    aliases = [t.view_as(t) if t is not None and t.requires_grad else None for t in inputs]
    arguments = [alias if alias is not None else t for alias, t in zip(aliases, inputs)]
    pairs = [(output.to(grad.dtype), grad) for output, grad in zip(step_maths(*arguments), grads) if grad is not None]
    wanted = [alias for alias in aliases if alias is not None]
    if not pairs or not wanted:
        return (None,) * len(inputs)
    gradients = iter(torch.autograd.grad(
        [output for output, _ in pairs], wanted, [grad for _, grad in pairs], create_graph=True, allow_unused=True
    ))
    return tuple(next(gradients) if alias is not None else None for alias in aliases)


def _save_lstm_step(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1], output[2])  # x, h, c, w_ih, w_hh, b_ih, b_hh, c', saved


def _lstm_step_backward(ctx, grad_h_next, grad_c_next, _grad_saved):
    x, h, c, w_ih, w_hh, b_ih, b_hh, c_next, saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return _differentiable_backward(_lstm_step_maths, (x, h, c, w_ih, w_hh, b_ih, b_hh), (grad_h_next, grad_c_next))
    grad_h_next = torch.zeros_like(c) if grad_h_next is None else grad_h_next
    grad_c_next = torch.zeros_like(c) if grad_c_next is None else grad_c_next
    grad_gates, grad_c = torch.ops.fastattn.triton_lstm_pointwise_backward(grad_h_next, grad_c_next, c, c_next, saved)
    grad_x, grad_w_ih, grad_b_ih = _input_gradients(grad_gates, x, w_ih, b_ih is not None)
    grad_b_hh = grad_gates.sum(0).to(h.dtype) if b_hh is not None else None
    grad_gates = grad_gates.to(h.dtype)
    return grad_x, grad_gates @ w_hh, grad_c, grad_w_ih, grad_gates.T @ h, grad_b_ih, grad_b_hh


torch.library.register_autograd("fastattn::triton_lstm_step", _lstm_step_backward, setup_context=_save_lstm_step)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """The "lstm_cell" op: one launch."""
    h_next, c_next, _ = torch.ops.fastattn.triton_lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    return h_next, c_next


# ---------------------------------------------------------------- GRU


@torch.library.triton_op("fastattn::triton_gru_pointwise_backward", mutates_args=())
def triton_gru_pointwise_backward(grad_h_next: Tensor, h: Tensor, saved: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> gradients of the gates' input and hidden parts (B, 3H each, float32) and the
    direct part of h's (B, H)."""
    grad_h_next, h, saved = _checked(
        "triton_gru_pointwise_backward", 3, "h", grad_h_next=grad_h_next, h=h, saved=saved
    )
    batch, hidden = h.shape
    grad_gates_x = h.new_empty(batch, 3 * hidden, dtype=torch.float32)
    grad_gates_h = h.new_empty(batch, 3 * hidden, dtype=torch.float32)
    grad_h = torch.empty_like(h)
    _launch(gru_pointwise_backward_kernel, batch, hidden, grad_h_next, h, saved, grad_gates_x, grad_gates_h, grad_h)
    return grad_gates_x, grad_gates_h, grad_h


@torch.library.triton_op("fastattn::triton_gru_step", mutates_args=())
def triton_gru_step(
    x: Tensor, h: Tensor, w_ih: Optional[Tensor], w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """A whole GRU step in one launch -> (h', saved).  x: the input (B, I) with w_ih, or
    without w_ih (and b_ih) its projection x W_ih^T + b_ih (B, 3H) float32."""
    x, h, w_ih, w_hh, b_ih, b_hh = _checked(
        "triton_gru_step", 3, "h", x=x, h=h, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh
    )
    batch, hidden = h.shape
    h_next = torch.empty_like(h)
    saved = h.new_empty(batch, 4 * hidden, dtype=torch.float32)
    _launch(
        gru_step_kernel, batch, hidden, x, h, pointer_or(w_ih, x), w_hh, pointer_or(b_ih, x), pointer_or(b_hh, x),
        h_next, saved, x.shape[1], **_step_flags(h, w_ih, b_ih, b_hh),
    )
    return h_next, saved


torch.library.register_autograd("fastattn::triton_gru_pointwise_backward", _no_derivative)


def _save_gru_step(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])  # x, h, w_ih, w_hh, b_ih, b_hh, saved


def _gru_step_backward(ctx, grad_h_next, _grad_saved):
    x, h, w_ih, w_hh, b_ih, b_hh, saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return _differentiable_backward(_gru_step_maths, (x, h, w_ih, w_hh, b_ih, b_hh), (grad_h_next,))
    grad_h_next = torch.zeros_like(h) if grad_h_next is None else grad_h_next
    grad_gates_x, grad_gates_h, grad_h = torch.ops.fastattn.triton_gru_pointwise_backward(grad_h_next, h, saved)
    grad_x, grad_w_ih, grad_b_ih = _input_gradients(grad_gates_x, x, w_ih, b_ih is not None)
    grad_b_hh = grad_gates_h.sum(0).to(h.dtype) if b_hh is not None else None
    grad_gates_h = grad_gates_h.to(h.dtype)
    return grad_x, grad_h + grad_gates_h @ w_hh, grad_w_ih, grad_gates_h.T @ h, grad_b_ih, grad_b_hh


torch.library.register_autograd("fastattn::triton_gru_step", _gru_step_backward, setup_context=_save_gru_step)


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """The "gru_cell" op: one launch."""
    return torch.ops.fastattn.triton_gru_step(x, h, w_ih, w_hh, b_ih, b_hh)[0]


# ---------------------------------------------------------------- layers


def _projected(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor]) -> Tensor:
    """x (T, B, I) -> x W_ih^T + b_ih (T, B, gates*H) float32, every step in one launch."""
    steps, batch, inputs = x.shape
    projection = torch.ops.fastattn.triton_input_projection(x.reshape(steps * batch, inputs), w_ih, b_ih)
    return projection.view(steps, batch, w_ih.shape[0])


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, reverse=False):
    if w_hr is not None:
        return reference.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)

    def step(projected_t, state):
        return torch.ops.fastattn.triton_lstm_step(projected_t, *state, None, w_hh, None, b_hh)[:2]

    output, (h_n, c_n) = _run_over_time(step, _projected(x, w_ih, b_ih), (h0, c0), lengths, reverse)
    return output, h_n, c_n


def gru_layer(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, reverse=False):
    def step(projected_t, state):
        return (torch.ops.fastattn.triton_gru_step(projected_t, *state, None, w_hh, None, b_hh)[0],)

    output, (h_n,) = _run_over_time(step, _projected(x, w_ih, b_ih), (h0,), lengths, reverse)
    return output, h_n
