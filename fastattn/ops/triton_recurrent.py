"""The Triton LSTM/GRU ops and the backend functions "lstm_cell", "gru_cell",
"lstm_layer", "gru_layer" of backend "triton".

A cell step is one launch at every batch size: both GEMMs x @ W_ih^T and h @ W_hh^T, the
biases and the update run in the kernel, whose pre-activations stay in float32.  Its
backward: a fused pointwise kernel, then torch's GEMMs.

A layer projects the input of every time step in one launch (float32,
``triton_input_projection``); then one op runs its whole time loop
(``triton_lstm_layer`` / ``triton_gru_layer``), a launch a step that reads its slice of
that projection in place of x @ W_ih^T, writes its states straight into the layer's
(T + 1, B, H) state buffers and keeps a finished sequence's state itself (``lengths``);
the layer's outputs are those states.  Its backward (``triton_*_layer_backward``) makes
a step the pointwise kernel's launch and one GEMM (h's gradient through W_hh); the
weights' gradients are then one GEMM each over every step.  The time loop is Python's,
not yet a persistent kernel.  An LSTM layer with a projection (``w_hr``) runs the
reference.
"""

import functools
from typing import Callable, Optional

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
from fastattn.ops.triton_eager import triton_op
from fastattn.ops.triton_launch import (
    LAUNCH_PLANS,
    Launcher,
    RepeatedLaunch,
    ceil_div,
    contiguous_or_none,
    dot_precision,
    pointer_or,
)
from fastattn.reference.recurrent import gru_update, lstm_update, outputs_of_states, states_over_time

LAUNCHERS = {  # kernel name -> Launcher
    **{
        kernel.__name__: Launcher(kernel, RECURRENT_POINTWISE)
        for kernel in (lstm_pointwise_backward_kernel, gru_pointwise_backward_kernel)
    },
    **{kernel.__name__: Launcher(kernel, RECURRENT_STEP) for kernel in (lstm_step_kernel, gru_step_kernel)},
    input_projection_kernel.__name__: Launcher(input_projection_kernel, INPUT_PROJECTION),
}


def _grid(batch: int, hidden: int):
    return lambda meta: (ceil_div(batch, meta["BLOCK_B"]), ceil_div(hidden, meta["BLOCK_H"]))


def _step_launches(kernel, batch, hidden, **constexprs) -> RepeatedLaunch:
    """``launch(*arguments)``: a step kernel's launch over (batch blocks, hidden blocks) at
    each step of a layer's time loop, whose arguments are same-shaped views from one step to
    the next (B and H come after them)."""
    return RepeatedLaunch(LAUNCHERS[kernel.__name__], _grid(batch, hidden), (batch, hidden), **constexprs)


def _cell_launch(op: str, kernel, gates: int, state_name: str, tensors: dict[str, Optional[Tensor]],
                 constexprs: Callable[[], dict], scalars: tuple = ()) -> tuple[RepeatedLaunch, list[Optional[Tensor]]]:
    """A cell op's launch of ``kernel`` over (batch blocks, hidden blocks) for the layout of
    its ``tensors`` (by name), checked (``triton_checks.cell``) once a layout (``LAUNCH_PLANS``),
    and the tensors contiguous, as the kernel indexes them.  The launch takes the kernel's
    tensor arguments; LENGTHS is the last (unread outside a layer: HAS_LENGTHS false), then
    come t = 0, ``scalars``, B and H, and the ``constexprs()``."""
    values = tuple(tensors.values())

    def plan() -> RepeatedLaunch:
        triton_checks.cell(op, gates, state_name, tensors)
        batch, hidden = tensors[state_name].shape
        return RepeatedLaunch(LAUNCHERS[kernel.__name__], _grid(batch, hidden), (0, *scalars, batch, hidden),
                              **constexprs())

    return LAUNCH_PLANS.get(op, values, (), plan), [contiguous_or_none(tensor) for tensor in values]


def _layer_checked(op: str, gates: int, **tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """A layer op's tensors, checked (triton_checks.layer) and contiguous."""
    triton_checks.layer(op, gates, tensors)
    return [contiguous_or_none(tensor) for tensor in tensors.values()]


def _outside_a_layer() -> dict:
    """A pointwise backward kernel's constexprs for one cell step."""
    return dict(IN_LAYER=False, HAS_LENGTHS=False, ROUNDED_COPY=False)


def _step_flags(h: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], lengths: Optional[Tensor] = None,
                projected: bool = False):
    """A step kernel's constexprs: x is the input, or in a layer its float32 projection."""
    return dict(
        PROJECTED_INPUT=projected, HAS_INPUT_BIAS=b_ih is not None, HAS_HIDDEN_BIAS=b_hh is not None,
        HAS_LENGTHS=lengths is not None, DOT_PRECISION=dot_precision(h.dtype),
    )


def _input_gradients(grad_gates: Tensor, x: Tensor, w: Tensor, has_bias: bool):
    """The gradients of (x, w, b) through x w^T + b from the result's (float32)."""
    grad_bias = grad_gates.sum(0).to(x.dtype) if has_bias else None
    grad_gates = grad_gates.to(x.dtype)
    return grad_gates @ w, grad_gates.T @ x, grad_bias


# ---------------------------------------------------------------- input projection


@triton_op("fastattn::triton_input_projection")
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
    ctx.save_for_backward(*inputs)  # x, w, b


def _input_projection_backward(ctx, grad):
    x, w, b = ctx.saved_tensors
    return _input_gradients(grad, x, w, b is not None)


triton_input_projection.register_autograd(_input_projection_backward, setup_context=_save_input_projection)


# ---------------------------------------------------------------- LSTM


@triton_op("fastattn::triton_lstm_step")
def triton_lstm_step(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """A whole LSTM step in one launch -> (h', c', saved (B, 4H) float32)."""
    launch, (x, h, c, w_ih, w_hh, b_ih, b_hh) = _cell_launch(
        "triton_lstm_step", lstm_step_kernel, 4, "c", dict(x=x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh),
        lambda: _step_flags(h, b_ih, b_hh), (x.shape[1],),
    )
    batch, hidden = c.shape
    h_next, c_next = torch.empty_like(c), torch.empty_like(c)
    saved = c.new_empty(batch, 4 * hidden, dtype=torch.float32)
    launch(x, h, c, w_ih, w_hh, pointer_or(b_ih, x), pointer_or(b_hh, x), h_next, c_next, saved, x)
    return h_next, c_next, saved


@triton_op("fastattn::triton_lstm_pointwise_backward")
def triton_lstm_pointwise_backward(
    grad_h_next: Tensor, grad_c_next: Tensor, c: Tensor, c_next: Tensor, saved: Tensor
) -> tuple[Tensor, Tensor]:
    """-> (gradient of the pre-activation gates (B, 4H) float32, gradient of c)."""
    launch, (grad_h_next, grad_c_next, c, c_next, saved) = _cell_launch(
        "triton_lstm_pointwise_backward", lstm_pointwise_backward_kernel, 4, "c",
        dict(grad_h_next=grad_h_next, grad_c_next=grad_c_next, c=c, c_next=c_next, saved=saved), _outside_a_layer,
    )
    grad_gates = torch.empty_like(saved)
    grad_c = torch.empty_like(c)
    # OUTSIDE_GRAD_H, OUTSIDE_GRAD_C, GRAD_H and GRAD_GATES_ROUNDED unused outside a layer
    launch(grad_h_next, grad_c_next, c, c_next, saved, grad_gates, grad_c, c, c, c, c, c)
    return grad_gates, grad_c


def _no_derivative(ctx, *grads):
    raise RuntimeError(
        "fastattn's Triton LSTM/GRU backward ops have no derivative: a gradient taken with create_graph=True "
        "through the Triton LSTM/GRU step and layer ops comes from the reference's maths instead"
    )


# The backward ops keep no gate pre-activations: differentiated, they raise rather than
# return nothing (the step and layer ops never differentiate them, see _differentiable_backward).
torch.library.register_autograd("fastattn::triton_lstm_pointwise_backward", _no_derivative)


def _lstm_step_maths(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return lstm_update(F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), c)


def _gru_step_maths(x, h, w_ih, w_hh, b_ih, b_hh):
    return (gru_update(F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), h),)


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
    grad_gates, grad_c = triton_lstm_pointwise_backward(grad_h_next, grad_c_next, c, c_next, saved)
    grad_x, grad_w_ih, grad_b_ih = _input_gradients(grad_gates, x, w_ih, b_ih is not None)
    grad_b_hh = grad_gates.sum(0).to(h.dtype) if b_hh is not None else None
    grad_gates = grad_gates.to(h.dtype)
    return grad_x, grad_gates @ w_hh, grad_c, grad_w_ih, grad_gates.T @ h, grad_b_ih, grad_b_hh


triton_lstm_step.register_autograd(_lstm_step_backward, setup_context=_save_lstm_step)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """The "lstm_cell" op: one launch."""
    h_next, c_next, _ = triton_lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    return h_next, c_next


# ---------------------------------------------------------------- GRU


@triton_op("fastattn::triton_gru_pointwise_backward")
def triton_gru_pointwise_backward(grad_h_next: Tensor, h: Tensor, saved: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> gradients of the gates' input and hidden parts (B, 3H each, float32) and the
    direct part of h's (B, H)."""
    launch, (grad_h_next, h, saved) = _cell_launch(
        "triton_gru_pointwise_backward", gru_pointwise_backward_kernel, 3, "h",
        dict(grad_h_next=grad_h_next, h=h, saved=saved), _outside_a_layer,
    )
    batch, hidden = h.shape
    grad_gates_x = h.new_empty(batch, 3 * hidden, dtype=torch.float32)
    grad_gates_h = h.new_empty(batch, 3 * hidden, dtype=torch.float32)
    grad_h = torch.empty_like(h)
    # OUTSIDE_GRAD_H and GRAD_GATES_H_ROUNDED unused outside a layer
    launch(grad_h_next, h, saved, grad_gates_x, grad_gates_h, grad_h, h, h, h)
    return grad_gates_x, grad_gates_h, grad_h


@triton_op("fastattn::triton_gru_step")
def triton_gru_step(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """A whole GRU step in one launch -> (h', saved (B, 4H) float32)."""
    launch, (x, h, w_ih, w_hh, b_ih, b_hh) = _cell_launch(
        "triton_gru_step", gru_step_kernel, 3, "h", dict(x=x, h=h, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh),
        lambda: _step_flags(h, b_ih, b_hh), (x.shape[1],),
    )
    batch, hidden = h.shape
    h_next = torch.empty_like(h)
    saved = h.new_empty(batch, 4 * hidden, dtype=torch.float32)
    launch(x, h, w_ih, w_hh, pointer_or(b_ih, x), pointer_or(b_hh, x), h_next, saved, x)
    return h_next, saved


torch.library.register_autograd("fastattn::triton_gru_pointwise_backward", _no_derivative)


def _save_gru_step(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])  # x, h, w_ih, w_hh, b_ih, b_hh, saved


def _gru_step_backward(ctx, grad_h_next, _grad_saved):
    x, h, w_ih, w_hh, b_ih, b_hh, saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return _differentiable_backward(_gru_step_maths, (x, h, w_ih, w_hh, b_ih, b_hh), (grad_h_next,))
    grad_h_next = torch.zeros_like(h) if grad_h_next is None else grad_h_next
    grad_gates_x, grad_gates_h, grad_h = triton_gru_pointwise_backward(grad_h_next, h, saved)
    grad_x, grad_w_ih, grad_b_ih = _input_gradients(grad_gates_x, x, w_ih, b_ih is not None)
    grad_b_hh = grad_gates_h.sum(0).to(h.dtype) if b_hh is not None else None
    grad_gates_h = grad_gates_h.to(h.dtype)
    return grad_x, grad_h + grad_gates_h @ w_hh, grad_w_ih, grad_gates_h.T @ h, grad_b_ih, grad_b_hh


triton_gru_step.register_autograd(_gru_step_backward, setup_context=_save_gru_step)


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """The "gru_cell" op: one launch."""
    return triton_gru_step(x, h, w_ih, w_hh, b_ih, b_hh)[0]


# ---------------------------------------------------------------- layers


def _steps(steps: int, reverse: bool) -> list[tuple[int, int, int]]:
    """(t, before, after) for each step of a layer, in the order the layer runs them: the
    time step and the indices in the (T + 1, ...) state buffers of the states before and
    after it (``fastattn.reference.recurrent.states_over_time``'s order)."""
    if reverse:
        return [(t, t + 1, t) for t in range(steps - 1, -1, -1)]
    return [(t, t, t + 1) for t in range(steps)]


def _projected(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor]) -> Tensor:
    """x (T, B, I) -> x W_ih^T + b_ih (T, B, gates*H) float32, every step in one launch."""
    steps, batch, inputs = x.shape
    projection = triton_input_projection(x.reshape(steps * batch, inputs), w_ih, b_ih)
    return projection.view(steps, batch, w_ih.shape[0])


def _initial_states(steps: int, reverse: bool, *initial: Tensor) -> list[Tensor]:
    """A (T + 1, B, H) state buffer for each initial state, holding it where the layer starts."""
    buffers = [state.new_empty(steps + 1, *state.shape) for state in initial]
    for buffer, state in zip(buffers, initial):
        buffer[steps if reverse else 0] = state
    return buffers


def _rounds_gates(w_hh: Tensor) -> bool:
    """Whether a backward step writes its gates' gradient (float32) in w_hh's dtype too, for
    h's GEMM through W_hh (the kernels' ROUNDED_COPY)."""
    return w_hh.dtype != torch.float32


def _rounded_gates(grad_gates: Tensor, w_hh: Tensor) -> Tensor:
    """Where that copy goes: the float32 gradient itself for float32."""
    return torch.empty_like(grad_gates, dtype=w_hh.dtype) if _rounds_gates(w_hh) else grad_gates


def _recurrent_weight_gradients(grad_gates: Tensor, h_states: Tensor, has_bias: bool, reverse: bool):
    """The gradients of W_hh and b_hh from those of every step's h W_hh^T + b_hh (T, B,
    gates*H, float32): one GEMM with the h before each step for all steps, and b_hh's sum in float32."""
    h_before = (h_states[1:] if reverse else h_states[:-1]).flatten(0, 1)
    grad_gates = grad_gates.flatten(0, 1)
    grad_bias = grad_gates.sum(0).to(h_states.dtype) if has_bias else None
    return grad_gates.to(h_states.dtype).T @ h_before, grad_bias


def _or_zeros(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


@triton_op("fastattn::triton_lstm_layer")
def triton_lstm_layer(
    projected: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], lengths: Optional[Tensor],
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """An LSTM layer's time loop, one launch a step -> (h states, c states (T + 1, B, H)
    in time order, saved (T, B, 4H) float32).  projected: x W_ih^T + b_ih (T, B, 4H)
    float32 (``triton_input_projection``); sequence b keeps its state at steps t >= lengths[b]."""
    projected, h0, c0, w_hh, b_hh, lengths = _layer_checked(
        "triton_lstm_layer", 4, projected=projected, h0=h0, c0=c0, w_hh=w_hh, b_hh=b_hh, lengths=lengths
    )
    (steps, batch, gates), hidden = projected.shape, h0.shape[1]
    h_states, c_states = _initial_states(steps, reverse, h0, c0)
    saved = projected.new_empty(steps, batch, 4 * hidden)
    hs, cs, inputs, saves = h_states.unbind(0), c_states.unbind(0), projected.unbind(0), saved.unbind(0)
    launch = _step_launches(lstm_step_kernel, batch, hidden, **_step_flags(h0, None, b_hh, lengths, projected=True))
    for t, before, after in _steps(steps, reverse):
        launch(  # W_IH and B_IH unread: the step reads its projection
            inputs[t], hs[before], cs[before], w_hh, w_hh, w_hh, pointer_or(b_hh, w_hh), hs[after], cs[after],
            saves[t], pointer_or(lengths, w_hh), t, gates,
        )
    return h_states, c_states, saved


@triton_op("fastattn::triton_lstm_layer_backward")
def triton_lstm_layer_backward(
    grad_h_states: Tensor, grad_c_states: Tensor, c_states: Tensor, saved: Tensor, w_hh: Tensor,
    lengths: Optional[Tensor], reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The time loop of triton_lstm_layer's backward, a step one launch and h's GEMM
    through W_hh -> (gradient of every step's gates (T, B, 4H) float32, of h0, of c0)."""
    grad_h_states, grad_c_states, c_states, saved, w_hh, lengths = _layer_checked(
        "triton_lstm_layer_backward", 4, grad_h_states=grad_h_states, grad_c_states=grad_c_states,
        c_states=c_states, saved=saved, w_hh=w_hh, lengths=lengths,
    )
    steps, batch, hidden = *saved.shape[:2], w_hh.shape[1]
    grad_gates = saved.new_empty(steps, batch, 4 * hidden)
    grad_hs, grad_cs, cs = grad_h_states.unbind(0), grad_c_states.unbind(0), c_states.unbind(0)
    saves, grad_steps = saved.unbind(0), grad_gates.unbind(0)
    last = 0 if reverse else steps
    grad_h, grad_c = grad_hs[last].clone(), grad_cs[last].to(torch.float32, copy=True)  # c's in float32 over time
    launch = _step_launches(
        lstm_pointwise_backward_kernel, batch, hidden, IN_LAYER=True, HAS_LENGTHS=lengths is not None,
        ROUNDED_COPY=_rounds_gates(w_hh),
    )
    for t, before, after in reversed(_steps(steps, reverse)):
        grad_c_before, grad_h_kept = torch.empty_like(grad_c), torch.empty_like(grad_h)
        rounded = _rounded_gates(grad_steps[t], w_hh)
        launch(
            grad_h, grad_c, cs[before], cs[after], saves[t], grad_steps[t], grad_c_before, grad_hs[before],
            grad_cs[before], grad_h_kept, rounded, pointer_or(lengths, w_hh), t,
        )
        grad_h, grad_c = torch.addmm(grad_h_kept, rounded, w_hh), grad_c_before
    return grad_gates, grad_h, grad_c.to(c_states.dtype)


def _lstm_layer_maths(projected, h0, c0, w_hh, b_hh, lengths, reverse):
    def step(projected_t, state):
        return tuple(s.to(h0.dtype) for s in lstm_update(projected_t, F.linear(state[0], w_hh, b_hh), state[1]))

    return tuple(torch.stack(states) for states in zip(*states_over_time(step, projected, (h0, c0), lengths, reverse)))


def _save_layer(ctx, inputs, output):
    *tensors, ctx.reverse = inputs
    ctx.save_for_backward(*tensors, *output)


def _lstm_layer_backward(ctx, grad_h_states, grad_c_states, _grad_saved):
    projected, h0, c0, w_hh, b_hh, lengths, h_states, c_states, saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        maths = functools.partial(_lstm_layer_maths, lengths=lengths, reverse=ctx.reverse)
        grads = (grad_h_states, grad_c_states)
        return *_differentiable_backward(maths, (projected, h0, c0, w_hh, b_hh), grads), None, None
    grad_gates, grad_h0, grad_c0 = triton_lstm_layer_backward(
        _or_zeros(grad_h_states, h_states), _or_zeros(grad_c_states, c_states), c_states, saved, w_hh, lengths,
        ctx.reverse,
    )
    grad_w_hh, grad_b_hh = _recurrent_weight_gradients(grad_gates, h_states, b_hh is not None, ctx.reverse)
    return grad_gates, grad_h0, grad_c0, grad_w_hh, grad_b_hh, None, None


triton_lstm_layer.register_autograd(_lstm_layer_backward, setup_context=_save_layer)
torch.library.register_autograd("fastattn::triton_lstm_layer_backward", _no_derivative)


@triton_op("fastattn::triton_gru_layer")
def triton_gru_layer(
    projected: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], lengths: Optional[Tensor], reverse: bool
) -> tuple[Tensor, Tensor]:
    """A GRU layer's time loop, one launch a step -> (h states (T + 1, B, H) in time
    order, saved (T, B, 4H) float32).  projected: x W_ih^T + b_ih (T, B, 3H) float32;
    sequence b keeps its state at steps t >= lengths[b]."""
    projected, h0, w_hh, b_hh, lengths = _layer_checked(
        "triton_gru_layer", 3, projected=projected, h0=h0, w_hh=w_hh, b_hh=b_hh, lengths=lengths
    )
    (steps, batch, gates), hidden = projected.shape, h0.shape[1]
    (h_states,) = _initial_states(steps, reverse, h0)
    saved = projected.new_empty(steps, batch, 4 * hidden)
    hs, inputs, saves = h_states.unbind(0), projected.unbind(0), saved.unbind(0)
    launch = _step_launches(gru_step_kernel, batch, hidden, **_step_flags(h0, None, b_hh, lengths, projected=True))
    for t, before, after in _steps(steps, reverse):
        launch(  # W_IH and B_IH unread: the step reads its projection
            inputs[t], hs[before], w_hh, w_hh, w_hh, pointer_or(b_hh, w_hh), hs[after], saves[t],
            pointer_or(lengths, w_hh), t, gates,
        )
    return h_states, saved


@triton_op("fastattn::triton_gru_layer_backward")
def triton_gru_layer_backward(
    grad_h_states: Tensor, h_states: Tensor, saved: Tensor, w_hh: Tensor, lengths: Optional[Tensor], reverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The time loop of triton_gru_layer's backward, a step one launch and h's GEMM
    through W_hh -> (gradients of every step's gates' input and hidden parts (T, B, 3H
    each) float32, of h0)."""
    grad_h_states, h_states, saved, w_hh, lengths = _layer_checked(
        "triton_gru_layer_backward", 3, grad_h_states=grad_h_states, h_states=h_states, saved=saved, w_hh=w_hh,
        lengths=lengths,
    )
    steps, batch, hidden = *saved.shape[:2], w_hh.shape[1]
    grad_gates_x, grad_gates_h = (saved.new_empty(steps, batch, 3 * hidden) for _ in range(2))
    grad_hs, hs, saves = grad_h_states.unbind(0), h_states.unbind(0), saved.unbind(0)
    grad_steps_x, grad_steps_h = grad_gates_x.unbind(0), grad_gates_h.unbind(0)
    grad_h = grad_hs[0 if reverse else steps].clone()
    launch = _step_launches(
        gru_pointwise_backward_kernel, batch, hidden, IN_LAYER=True, HAS_LENGTHS=lengths is not None,
        ROUNDED_COPY=_rounds_gates(w_hh),
    )
    for t, before, after in reversed(_steps(steps, reverse)):
        grad_h_kept = torch.empty_like(grad_h)
        rounded = _rounded_gates(grad_steps_h[t], w_hh)
        launch(
            grad_h, hs[before], saves[t], grad_steps_x[t], grad_steps_h[t], grad_h_kept, grad_hs[before], rounded,
            pointer_or(lengths, w_hh), t,
        )
        grad_h = torch.addmm(grad_h_kept, rounded, w_hh)
    return grad_gates_x, grad_gates_h, grad_h


def _gru_layer_maths(projected, h0, w_hh, b_hh, lengths, reverse):
    def step(projected_t, state):
        return (gru_update(projected_t, F.linear(state[0], w_hh, b_hh), state[0]).to(h0.dtype),)

    return (torch.stack([state[0] for state in states_over_time(step, projected, (h0,), lengths, reverse)]),)


def _gru_layer_backward(ctx, grad_h_states, _grad_saved):
    projected, h0, w_hh, b_hh, lengths, h_states, saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        maths = functools.partial(_gru_layer_maths, lengths=lengths, reverse=ctx.reverse)
        return *_differentiable_backward(maths, (projected, h0, w_hh, b_hh), (grad_h_states,)), None, None
    grad_gates_x, grad_gates_h, grad_h0 = triton_gru_layer_backward(
        _or_zeros(grad_h_states, h_states), h_states, saved, w_hh, lengths, ctx.reverse
    )
    grad_w_hh, grad_b_hh = _recurrent_weight_gradients(grad_gates_h, h_states, b_hh is not None, ctx.reverse)
    return grad_gates_x, grad_h0, grad_w_hh, grad_b_hh, None, None


triton_gru_layer.register_autograd(_gru_layer_backward, setup_context=_save_layer)
torch.library.register_autograd("fastattn::triton_gru_layer_backward", _no_derivative)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, reverse=False):
    if w_hr is not None:
        return reference.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    h_states, c_states, _ = triton_lstm_layer(
        _projected(x, w_ih, b_ih), h0, c0, w_hh, b_hh, lengths, reverse
    )
    final = 0 if reverse else -1
    return outputs_of_states(h_states, lengths, reverse), h_states[final], c_states[final]


def gru_layer(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, reverse=False):
    h_states, _ = triton_gru_layer(_projected(x, w_ih, b_ih), h0, w_hh, b_hh, lengths, reverse)
    return outputs_of_states(h_states, lengths, reverse), h_states[0 if reverse else -1]
