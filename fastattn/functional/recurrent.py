"""LSTM and GRU: the public cell functions, the checks of every recurrent input,
and the multi-layer, bidirectional driver that ``fastattn.nn.LSTM`` and ``GRU`` run on.

The functions here only check their arguments and reshape them to the canonical
forms of the ops (a batch dimension always present, time-major sequences); the
maths runs in whichever implementation :func:`fastattn.backends.implementation`
returns for ``lstm_cell``, ``gru_cell``, ``lstm_layer`` or ``gru_layer``.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import backends, checks

LSTM_GATES = 4  # i, f, g, o
GRU_GATES = 3  # r, z, n


def lstm_cell(
    x: Tensor,
    hx: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One ``torch.nn.LSTMCell`` step.

    x (B, I) or (I,); hx = (h, c), each (B, H) or (H,); w_ih (4H, I), w_hh (4H, H),
    b_ih and b_hh (4H,) or None, gates stacked in the order i, f, g, o.
    Returns (h', c'), each shaped like h.
    """
    return run_lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh)


def gru_cell(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """One ``torch.nn.GRUCell`` step.

    x (B, I) or (I,); h (B, H) or (H,); w_ih (3H, I), w_hh (3H, H), b_ih and b_hh
    (3H,) or None, gates stacked in the order r, z, n.  Returns h', shaped like h.
    """
    return run_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, state_name="h")


def run_lstm_cell(
    x: Tensor,
    hx: tuple[Tensor, Tensor] | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    *,
    backend: str | None = None,
    input_name: str = "x",
) -> tuple[Tensor, Tensor]:
    """:func:`lstm_cell` as ``fastattn.nn.LSTMCell`` calls it: ``hx=None`` means zeros,
    ``backend`` overrides the setting in force, errors name the module's arguments."""
    h, c = (None, None) if hx is None else check_state_pair("hx", hx)
    states = {"hx[0]": h, "hx[1]": c}
    return _run_cell("lstm_cell", LSTM_GATES, x, states, (w_ih, w_hh, b_ih, b_hh), backend, input_name)


def run_gru_cell(
    x: Tensor,
    h: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    *,
    backend: str | None = None,
    input_name: str = "x",
    state_name: str = "hx",
) -> Tensor:
    """:func:`gru_cell` as ``fastattn.nn.GRUCell`` calls it (see :func:`run_lstm_cell`)."""
    states = {state_name: h}
    return _run_cell("gru_cell", GRU_GATES, x, states, (w_ih, w_hh, b_ih, b_hh), backend, input_name)


def _run_cell(
    op: str,
    gates: int,
    x: Tensor,
    states: dict[str, Tensor | None],
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    backend: str | None,
    input_name: str,
) -> Tensor | tuple[Tensor, ...]:
    """Check, add the batch dimension an unbatched step lacks, fill missing states
    with zeros, run the op and drop the batch dimension again."""
    hidden_size = check_cell_inputs(gates, x, states, *weights, input_name=input_name)
    batched = x.dim() == 2
    if not batched:
        x = x.unsqueeze(0)
        states = {name: None if state is None else state.unsqueeze(0) for name, state in states.items()}
    state_values = list(states.values())
    if any(state is None for state in state_values):  # only then: a buffer and a fill (a kernel on a GPU)
        zeros = x.new_zeros(x.shape[0], hidden_size)
        state_values = [zeros if state is None else state for state in state_values]
    arguments = (x, *state_values, *weights)
    result = backends.implementation(op, x.device.type, backend, inputs=arguments)(*arguments)
    if op == "lstm_cell":
        result = (result[0], _free_to_modify(result[1]))  # the kernels save c' for their backward
    if batched:
        return result
    if isinstance(result, tuple):
        return tuple(part.squeeze(0) for part in result)
    return result.squeeze(0)


def check_cell_inputs(
    gates: int,
    x: object,
    states: dict[str, object],
    w_ih: object,
    w_hh: object,
    b_ih: object,
    b_hh: object,
    *,
    input_name: str = "x",
) -> int:
    """Check one LSTM (``gates=4``) or GRU (``gates=3``) cell step; returns hidden_size.

    ``states`` maps each state's argument name to the tensor (or None: zeros).
    The weights are checked first, so that a wrong input is reported as such.
    """
    w_ih = checks.float_tensor("w_ih", w_ih)
    if w_ih.dim() != 2 or w_ih.shape[0] % gates != 0:
        raise ValueError(
            f"w_ih must have shape ({gates}*hidden_size, input_size), got {checks.describe(w_ih)}"
        )
    hidden_size, input_size = w_ih.shape[0] // gates, w_ih.shape[1]
    checks.float_like("w_hh", w_hh, "w_ih", w_ih)
    checks.shape(
        "w_hh",
        w_hh,
        (gates * hidden_size, hidden_size),
        lambda: f"({gates}*hidden_size, hidden_size) = {(gates * hidden_size, hidden_size)}",
    )
    for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
        if bias is not None:
            checks.float_like(name, bias, "w_ih", w_ih)
            checks.shape(name, bias, (gates * hidden_size,), lambda: f"({gates}*hidden_size,) = ({gates * hidden_size},)")
    x = checks.float_like(input_name, x, "w_ih", w_ih)
    checks.shape(
        input_name,
        x,
        (input_size,) if x.dim() == 1 else (None, input_size),
        lambda: f"(batch, input_size) or (input_size,), with input_size = {input_size} from w_ih",
    )
    batch_shape = tuple(x.shape[:-1])
    for name, state in states.items():
        if state is not None:
            checks.float_like(name, state, input_name, x)
            expected = batch_shape + (hidden_size,)
            checks.shape(
                name, state, expected, lambda: f"{expected} (like {input_name}, with hidden_size = {hidden_size})"
            )
    return hidden_size


def check_state_pair(name: str, value: object) -> tuple[object, object]:
    """An LSTM state must be a pair (h, c)."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple (h, c) of two tensors, got {checks.describe(value)}")
    if len(value) != 2:
        raise TypeError(
            f"{name} must be a tuple (h, c) of two tensors, got a {type(value).__name__} of {len(value)}"
        )
    return checks.tensor(f"{name}[0]", value[0]), checks.tensor(f"{name}[1]", value[1])


def check_sequence_input(
    name: str,
    value: object,
    *,
    input_size: int,
    weight_name: str,
    weight: Tensor,
    batch_first: bool,
    packed: bool,
) -> Tensor:
    """The input of ``nn.LSTM``/``nn.GRU``: a (T, B, I), batch-first (B, T, I) or
    unbatched (T, I) tensor with T >= 1, or the (N, I) data of a PackedSequence."""
    value = checks.float_tensor(name, value)  # weight: a module's parameter, of any dtype
    checks.like(name, value, weight_name, weight)
    if packed:
        checks.shape(f"{name}.data", value, (None, input_size), lambda: f"(total_length, {input_size})")
        return value
    if value.dim() not in (2, 3) or value.shape[-1] != input_size:
        layout = f"(batch, T, {input_size})" if batch_first else f"(T, batch, {input_size})"
        raise ValueError(
            f"{name} must have shape {layout} or (T, {input_size}) unbatched, got {checks.describe(value)}"
        )
    time_dim = 1 if value.dim() == 3 and batch_first else 0
    if value.shape[time_dim] == 0:
        raise ValueError(f"{name} must have at least one time step, got {checks.describe(value)}")
    return value


def check_initial_state(
    name: str, value: object, expected: tuple[int, ...], meaning: checks.Meaning, input_name: str, input: Tensor
) -> Tensor:
    """One initial state of ``nn.LSTM``/``nn.GRU``: ``meaning`` spells out ``expected``."""
    value = checks.float_like(name, value, input_name, input)
    checks.shape(name, value, expected, meaning)
    return value


def run_layers(
    layer_op: str,
    x: Tensor,
    initial_states: Sequence[Tensor],
    weights: Sequence[Sequence[tuple[Tensor | None, ...]]],
    *,
    lengths: Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Run a stack of recurrent layers of one or two directions, as ``torch.nn.LSTM``/``GRU`` do.

    ``layer_op`` is ``"lstm_layer"`` or ``"gru_layer"``; x (T, B, I), time-major;
    ``initial_states`` holds h0 (and c0 for an LSTM), each (num_layers * num_directions, B, size);
    ``weights[layer][direction]`` are that layer op's weight arguments
    (w_ih, w_hh, b_ih, b_hh and, for an LSTM, w_hr).  The directions' outputs are
    concatenated; in training, dropout is applied to every layer's input but the first.
    Returns (output (T, B, num_directions * Hout), final states shaped like ``initial_states``).
    """
    every_weight = (weight for layer in weights for direction in layer for weight in direction)  # read lazily
    run_layer = backends.implementation(
        layer_op, x.device.type, backend, inputs=itertools.chain((x,), initial_states, every_weight)
    )
    finals: list[list[Tensor]] = [[] for _ in initial_states]
    for depth, layer_weights in enumerate(weights):
        if depth > 0 and dropout > 0 and training:
            x = F.dropout(x, dropout, training=True)
        directions = len(layer_weights)
        outputs = []
        for direction, direction_weights in enumerate(layer_weights):
            index = depth * directions + direction
            layer_states = [state[index] for state in initial_states]
            output, *final = run_layer(x, *layer_states, *direction_weights, lengths, direction == 1)
            outputs.append(output)
            for store, state in zip(finals, final):
                store.append(state)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)  # one direction: no copy
    if directions == 1:
        x = _free_to_modify(x)  # the kernels save their output for their backward
    return x, [torch.stack(store) for store in finals]


def _free_to_modify(output: Tensor) -> Tensor:
    """``output`` as the caller may change it in place before the backward, as torch.nn's
    allow (``nn.ReLU(inplace=True)``, ``out += residual``, clipping c): a copy when it needs
    a gradient, since the kernel ops save the tensor they return for their backward, whose
    version check would then refuse to run."""
    return output.clone() if output.requires_grad else output
