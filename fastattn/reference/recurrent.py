"""Reference LSTM and GRU: the specification every fast recurrent kernel is tested against.

Plain, differentiable PyTorch written line for line with the equations in the
documentation of ``torch.nn.LSTM`` and ``torch.nn.GRU`` (same gate order, same
parameter layout), for any floating-point dtype.  Every function works on
canonical shapes only: a batch dimension is always present and sequences are
time-major ``(T, B, features)``.  Argument checking and the unbatched,
batch-first, multi-layer and packed forms live in ``fastattn.functional`` and
``fastattn.nn``.

A layer walks the time steps in a Python loop.  With ``lengths``, sequence ``b``
only updates its state at steps ``t < lengths[b]``; at later steps its state is
frozen and its output is zero.  ``reverse=True`` walks from ``T - 1`` down to 0,
so each sequence starts at its own last valid step, as packed sequences do in
``torch.nn``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

State = tuple[Tensor, ...]


def lstm_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step: x (B, I), h (B, Hout), c (B, H) -> (h' (B, H), c' (B, H)).

    Weights are stacked in torch's gate order i, f, g, o: w_ih (4H, I), w_hh (4H, Hout).
    """
    return lstm_update(F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), c)  # W_i* x + b_i*, W_h* h + b_h*


def lstm_update(input_gates: Tensor, hidden_gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM equations from W_i* x + b_i* and W_h* h + b_h* (B, 4H each) and c (B, H)."""
    x_i, x_f, x_g, x_o = input_gates.chunk(4, dim=1)
    h_i, h_f, h_g, h_o = hidden_gates.chunk(4, dim=1)
    i = torch.sigmoid(x_i + h_i)
    f = torch.sigmoid(x_f + h_f)
    g = torch.tanh(x_g + h_g)
    o = torch.sigmoid(x_o + h_o)
    c_next = f * c + i * g
    h_next = o * torch.tanh(c_next)
    return h_next, c_next


def gru_cell(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """One GRU step: x (B, I), h (B, H) -> h' (B, H).

    Weights are stacked in torch's gate order r, z, n: w_ih (3H, I), w_hh (3H, H).
    """
    return gru_update(F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), h)  # W_i* x + b_i*, W_h* h + b_h*


def gru_update(input_gates: Tensor, hidden_gates: Tensor, h: Tensor) -> Tensor:
    """The GRU equations from W_i* x + b_i* and W_h* h + b_h* (B, 3H each) and h (B, H)."""
    x_r, x_z, x_n = input_gates.chunk(3, dim=1)
    h_r, h_z, h_n = hidden_gates.chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def lstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one LSTM layer over a sequence.

    x (T, B, I), h0 (B, Hout), c0 (B, H) -> (out (T, B, Hout), h_n (B, Hout), c_n (B, H)).
    ``w_hr`` (Hout, H) is the projection of ``proj_size``: h = (o * tanh(c)) @ w_hr.T.
    """

    def step(x_t: Tensor, state: State) -> State:
        h_next, c_next = lstm_cell(x_t, *state, w_ih, w_hh, b_ih, b_hh)
        if w_hr is not None:
            h_next = h_next @ w_hr.T
        return h_next, c_next

    out, (h_n, c_n) = _run_over_time(step, x, (h0, c0), lengths, reverse)
    return out, h_n, c_n


def gru_layer(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One direction of one GRU layer over a sequence.

    x (T, B, I), h0 (B, H) -> (out (T, B, H), h_n (B, H)).
    """

    def step(x_t: Tensor, state: State) -> State:
        return (gru_cell(x_t, *state, w_ih, w_hh, b_ih, b_hh),)

    out, (h_n,) = _run_over_time(step, x, (h0,), lengths, reverse)
    return out, h_n


def _run_over_time(
    step: Callable[[Tensor, State], State],
    x: Tensor,
    state: State,
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, State]:
    """Apply ``step`` at every time step; the first element of the state is the output.
    -> (outputs (T, B, ·), final state)."""
    states = states_over_time(step, x, state, lengths, reverse)
    h_states = torch.stack([state[0] for state in states])
    return outputs_of_states(h_states, lengths, reverse), states[0 if reverse else -1]


def states_over_time(
    step: Callable[[Tensor, State], State],
    x: Tensor,
    state: State,
    lengths: Tensor | None,
    reverse: bool,
) -> list[State]:
    """Apply ``step`` at every time step -> the T + 1 states in time order: ``states[t]``
    and ``states[t + 1]`` are the states on either side of step t (before and after it;
    after and before it when ``reverse``).  Sequence ``b`` keeps its state at steps
    ``t >= lengths[b]``."""
    inputs = x.unbind(0)  # one gradient buffer for all steps (x[t] would zero-fill one per step)
    order = range(len(inputs))
    states = [state]
    for t in reversed(order) if reverse else order:
        new_state = step(inputs[t], state)
        if lengths is not None:
            running = (t < lengths).unsqueeze(1)  # (B, 1): sequence still running at step t
            new_state = tuple(torch.where(running, new, old) for new, old in zip(new_state, state))
        state = new_state
        states.append(state)
    if reverse:
        states.reverse()
    return states


def outputs_of_states(h_states: Tensor, lengths: Tensor | None, reverse: bool) -> Tensor:
    """A layer's outputs (T, B, H) from its h states (T + 1, B, H) in the time order of
    ``states_over_time``: the state after each step, zero at steps ``t >= lengths[b]``."""
    outputs = h_states[:-1] if reverse else h_states[1:]
    if lengths is None:
        return outputs
    steps = torch.arange(outputs.shape[0], device=outputs.device)
    return torch.where((steps.unsqueeze(1) < lengths).unsqueeze(2), outputs, 0)
