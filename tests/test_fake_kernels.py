"""The fake (meta) kernels of the C++ ops check what the kernels check: a direct
``torch.ops.fastattn.*`` call with a bad shape or dtype raises on meta tensors and under
FakeTensorMode (torch.compile, export) as it does on real CPU tensors, with the same
error (a TypeError for a dtype, a ValueError otherwise) naming the op and the argument.  They had returned outputs of made-up shapes, so a
compiled graph traced a call that fails at run time."""

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastattn import backends

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

F64 = torch.float64
BATCH, QUERIES, SOURCE, FEATURES, VALUE_FEATURES = 2, 3, 5, 4, 6
STEPS, INPUT, HIDDEN = 3, 5, 7


def _randn(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(sum(shape)))


def _attention(score="dot", **changes):
    arguments = dict(
        query=_randn(BATCH, QUERIES, FEATURES), keys=_randn(BATCH, SOURCE, FEATURES),
        values=_randn(BATCH, SOURCE, VALUE_FEATURES), v=None, bias=None, score=score, scale=1.0,
        lengths=torch.tensor([5, 2]), key_padding_mask=None, causal=False, window=None, center=None, gaussian=False,
        return_weights=True,
    )
    if score == "additive":
        arguments.update(v=_randn(FEATURES), bias=_randn(FEATURES))
    return arguments | changes


def _attention_backward(values_are_keys=False, **changes):
    """attention_backward's arguments at attention_forward's outputs; with values_are_keys,
    of a forward given the keys as its values."""
    forward = _attention()
    if values_are_keys:
        forward["values"] = forward["keys"]
    context, weights, logsumexp = torch.ops.fastattn.attention_forward(*forward.values())
    del forward["return_weights"]
    arguments = dict(grad_context=torch.randn_like(context), grad_weights=torch.randn_like(weights))
    arguments.update(forward, logsumexp=logsumexp, values_are_keys=values_are_keys)
    return arguments | changes


def _cell(cell, backward=False, **changes):
    gates = 4 if cell == "lstm" else 3
    arguments = dict(x=_randn(BATCH, INPUT), h=_randn(BATCH, HIDDEN))
    if cell == "lstm":
        arguments["c"] = _randn(BATCH, HIDDEN)
    arguments.update(w_ih=_randn(gates * HIDDEN, INPUT), w_hh=_randn(gates * HIDDEN, HIDDEN),
                     b_ih=_randn(gates * HIDDEN), b_hh=_randn(gates * HIDDEN))
    if backward:
        outputs = getattr(torch.ops.fastattn, f"{cell}_cell_forward")(*arguments.values())
        gradients = dict(grad_h_next=torch.randn_like(outputs[0]))
        if cell == "lstm":
            gradients["grad_c_next"] = torch.randn_like(outputs[1])
            arguments["c_next"] = outputs[1]
        arguments = gradients | arguments | dict(saved=outputs[-1])
    return arguments | changes


def _layer(cell, backward=False, **changes):
    gates = 4 if cell == "lstm" else 3
    arguments = dict(x=_randn(STEPS, BATCH, INPUT), h0=_randn(BATCH, HIDDEN))
    if cell == "lstm":
        arguments["c0"] = _randn(BATCH, HIDDEN)
    arguments.update(w_ih=_randn(gates * HIDDEN, INPUT), w_hh=_randn(gates * HIDDEN, HIDDEN),
                     b_ih=_randn(gates * HIDDEN), b_hh=_randn(gates * HIDDEN), lengths=torch.tensor([3, 1]),
                     reverse=False)
    if backward:
        output, h_n, *states, saved = getattr(torch.ops.fastattn, f"{cell}_layer_forward")(*arguments.values())
        gradients = dict(grad_output=torch.randn_like(output), grad_h_n=torch.randn_like(h_n))
        if cell == "lstm":
            gradients["grad_c_n"] = torch.randn_like(states[0])
        arguments = gradients | arguments | dict(output=output, saved=saved)
    return arguments | changes


def _decoder_step(**changes):
    """An LSTM Luong step (input feeding) with the additive score over projected keys."""
    attention_features = 8
    arguments = dict(
        y=_randn(BATCH, INPUT), h=_randn(BATCH, HIDDEN), c=_randn(BATCH, HIDDEN), attentional=_randn(BATCH, HIDDEN),
        keys=_randn(BATCH, SOURCE, attention_features), values=_randn(BATCH, SOURCE, VALUE_FEATURES),
        query_weight=_randn(HIDDEN, attention_features), v=_randn(attention_features), bias=_randn(attention_features),
        score="additive", scale=1.0, lengths=torch.tensor([5, 3]), key_padding_mask=None,
        w_ih=_randn(4 * HIDDEN, INPUT + HIDDEN), w_hh=_randn(4 * HIDDEN, HIDDEN), b_ih=None, b_hh=None,
        w_combine=_randn(HIDDEN, VALUE_FEATURES + HIDDEN), input_feeding=True,
    )
    return arguments | changes


def _hard_outputs(backward=False, **changes):
    """hard_attention_outputs' arguments (weights, index, values); with backward, its
    backward's (grad_context, grad_log_prob, weights, index)."""
    weights = torch.softmax(_randn(BATCH, QUERIES, SOURCE), dim=-1)
    index = torch.tensor([[0, 4, 2], [1, 1, 3]])
    if not backward:
        return dict(weights=weights, index=index, values=_randn(BATCH, SOURCE, VALUE_FEATURES)) | changes
    return dict(grad_context=_randn(BATCH, QUERIES, VALUE_FEATURES), grad_log_prob=_randn(BATCH, QUERIES),
                weights=weights, index=index) | changes


def _case(op, name, make, message_op=None, error=ValueError):
    """A call of ``op`` on ``make()``'s arguments (made in the test, where the ops exist)
    whose argument ``name`` is bad, named in a message of ``message_op`` (default: op), an
    ``error``: a TypeError for a dtype, a ValueError otherwise (API.md, section 6)."""
    return pytest.param(op, message_op or op, name, make, error, id=f"{op}-{name}")


CASES = [
    _case("attention_forward", "query", lambda: _attention(query=_randn(BATCH, FEATURES))),
    _case("attention_forward", "keys", lambda: _attention(keys=_randn(3, SOURCE, FEATURES))),
    _case("attention_forward", "keys", lambda: _attention(keys=_randn(BATCH, SOURCE, FEATURES + 1))),
    _case("attention_forward", "keys", lambda: _attention(keys=_randn(BATCH, SOURCE, FEATURES, dtype=torch.float32)),
          error=TypeError),
    _case("attention_forward", "values", lambda: _attention(values=_randn(BATCH, SOURCE - 1, VALUE_FEATURES))),
    _case("attention_forward", "v", lambda: _attention("additive", v=_randn(FEATURES + 1))),
    _case("attention_forward", "bias", lambda: _attention("additive", bias=_randn(1, FEATURES))),
    _case("attention_forward", "lengths", lambda: _attention(lengths=torch.tensor([5, 2, 1]))),
    _case("attention_forward", "lengths", lambda: _attention(lengths=torch.tensor([5.0, 2.0])), error=TypeError),
    _case("attention_forward", "key_padding_mask",
          lambda: _attention(key_padding_mask=torch.zeros(BATCH, SOURCE + 1, dtype=torch.bool))),
    _case("attention_forward", "center", lambda: _attention(window=1, center=_randn(BATCH, QUERIES + 1))),
    _case("attention_backward", "grad_context",
          lambda: _attention_backward(grad_context=_randn(BATCH, QUERIES, VALUE_FEATURES + 1))),
    _case("attention_backward", "grad_weights",
          lambda: _attention_backward(grad_weights=_randn(BATCH, QUERIES, SOURCE - 1))),
    # float32: a float64 query's logsumexp is float64 (the accumulation dtype)
    _case("attention_backward", "logsumexp", lambda: _attention_backward(logsumexp=torch.zeros(BATCH, QUERIES)),
          error=TypeError),
    _case("attention_backward", "keys", lambda: _attention_backward(keys=_randn(1, SOURCE, FEATURES + 1))),
    # keys shared by the batch, (1, S, D), are not values (N, S, D)
    _case("attention_backward", "values_are_keys",
          lambda: _attention_backward(values_are_keys=True, keys=_randn(1, SOURCE, FEATURES))),
    _case("sample_positions", "weights", lambda: dict(weights=_randn(QUERIES, SOURCE), sample=False, generator=None)),
    _case("hard_attention_outputs", "weights", lambda: _hard_outputs(weights=_randn(BATCH, SOURCE))),
    _case("hard_attention_outputs", "index",
          lambda: _hard_outputs(index=torch.zeros(BATCH, QUERIES + 1, dtype=torch.long))),
    _case("hard_attention_outputs", "index",
          lambda: _hard_outputs(index=torch.zeros(BATCH, QUERIES, dtype=torch.int32)), error=TypeError),
    _case("hard_attention_outputs", "values", lambda: _hard_outputs(values=_randn(BATCH, SOURCE + 1, VALUE_FEATURES))),
    _case("hard_attention_outputs", "values",
          lambda: _hard_outputs(values=torch.zeros(BATCH, SOURCE, VALUE_FEATURES, dtype=torch.int64)), error=TypeError),
    _case("hard_attention_outputs_backward", "grad_context",
          lambda: _hard_outputs(True, grad_context=_randn(BATCH + 1, QUERIES, VALUE_FEATURES))),
    _case("hard_attention_outputs_backward", "grad_log_prob",
          lambda: _hard_outputs(True, grad_log_prob=_randn(BATCH, QUERIES, dtype=torch.float32)), error=TypeError),
    _case("fast_tanh", "x", lambda: dict(x=_randn(QUERIES)), error=TypeError),
    _case("lstm_cell_forward", "h", lambda: _cell("lstm", h=_randn(BATCH + 1, HIDDEN))),
    _case("lstm_cell_forward", "c", lambda: _cell("lstm", c=_randn(BATCH, HIDDEN, dtype=torch.float32)),
          error=TypeError),
    _case("lstm_cell_forward", "w_ih", lambda: _cell("lstm", w_ih=_randn(4 * HIDDEN, INPUT + 1))),
    _case("lstm_cell_forward", "w_hh", lambda: _cell("lstm", w_hh=_randn(4 * HIDDEN, HIDDEN + 1))),
    _case("lstm_cell_forward", "b_hh", lambda: _cell("lstm", b_hh=_randn(4 * HIDDEN + 1))),
    _case("lstm_cell_backward", "saved", lambda: _cell("lstm", True, saved=_randn(BATCH, 5 * HIDDEN))),
    _case("lstm_cell_backward", "c_next", lambda: _cell("lstm", True, c_next=_randn(1, HIDDEN))),
    _case("gru_cell_forward", "h", lambda: _cell("gru", h=_randn(BATCH + 1, HIDDEN))),
    _case("gru_cell_forward", "w_hh", lambda: _cell("gru", w_hh=_randn(4 * HIDDEN, HIDDEN))),
    _case("gru_cell_backward", "grad_h_next", lambda: _cell("gru", True, grad_h_next=_randn(BATCH, HIDDEN + 1))),
    _case("gru_cell_backward", "saved", lambda: _cell("gru", True, saved=_randn(BATCH, 3 * HIDDEN))),
    _case("lstm_layer_forward", "h0", lambda: _layer("lstm", h0=_randn(BATCH + 1, HIDDEN))),
    _case("lstm_layer_forward", "c0", lambda: _layer("lstm", c0=_randn(BATCH, HIDDEN - 1))),
    _case("lstm_layer_forward", "w_ih", lambda: _layer("lstm", w_ih=_randn(4 * HIDDEN, INPUT - 1))),
    _case("lstm_layer_forward", "lengths", lambda: _layer("lstm", lengths=torch.tensor([3]))),
    _case("lstm_layer_backward", "saved", lambda: _layer("lstm", True, saved=_randn(STEPS, BATCH, 4 * HIDDEN))),
    _case("lstm_layer_backward", "output", lambda: _layer("lstm", True, output=_randn(STEPS + 1, BATCH, HIDDEN))),
    _case("gru_layer_forward", "w_hh", lambda: _layer("gru", w_hh=_randn(3 * HIDDEN + 1, HIDDEN))),
    _case("gru_layer_forward", "b_ih", lambda: _layer("gru", b_ih=_randn(3 * HIDDEN, dtype=torch.float32)),
          error=TypeError),
    _case("gru_layer_backward", "grad_output",
          lambda: _layer("gru", True, grad_output=_randn(STEPS, BATCH, HIDDEN + 1))),
    _case("gru_layer_backward", "grad_h_n", lambda: _layer("gru", True, grad_h_n=_randn(BATCH, 1))),
]


def _message(op_name, name):
    """The C++ kernels' messages ("op: name must ...", "op: expected name of ...") and the
    fake kernels' ("fastattn::op: name must ...")."""
    return rf"\b{op_name}: (expected )?{re.escape(name)} "


def _on(arguments, convert):
    return [convert(value) if isinstance(value, torch.Tensor) else value for value in arguments.values()]


@pytest.mark.parametrize("op_name, message_op, name, make_arguments, error", CASES)
def test_a_bad_argument_is_refused_by_name_on_cpu_meta_and_fake_tensors(op_name, message_op, name, make_arguments,
                                                                       error):
    op, arguments = getattr(torch.ops.fastattn, op_name), make_arguments()
    with pytest.raises(error, match=_message(message_op, name)):
        op(*arguments.values())
    with pytest.raises(error, match=_message(message_op, name)):
        op(*_on(arguments, lambda tensor: tensor.to("meta")))
    mode = FakeTensorMode()
    fakes = _on(arguments, mode.from_tensor)
    with mode, pytest.raises(error, match=_message(message_op, name)):
        op(*fakes)


GOOD = {
    "attention_forward": lambda: _attention(),
    "attention_forward-additive": lambda: _attention("additive"),
    "attention_backward": lambda: _attention_backward(),
    "attention_backward-no-grad_weights": lambda: _attention_backward(grad_weights=None),
    "attention_backward-values-are-keys": lambda: _attention_backward(values_are_keys=True),
    "hard_attention_outputs": lambda: _hard_outputs(),
    # under autocast the weights are in the low-precision dtype, the values as given
    "hard_attention_outputs-other-dtypes": lambda: _hard_outputs(
        weights=torch.softmax(_randn(BATCH, QUERIES, SOURCE), dim=-1).to(torch.bfloat16),
        values=_randn(BATCH, SOURCE, VALUE_FEATURES, dtype=torch.float32)),
    "hard_attention_outputs_backward": lambda: _hard_outputs(True),
    "hard_attention_outputs_backward-no-grad_context": lambda: _hard_outputs(True, grad_context=None),
    "hard_attention_outputs_backward-no-grad_log_prob": lambda: _hard_outputs(True, grad_log_prob=None),
    "lstm_cell_forward": lambda: _cell("lstm"),
    # An LSTM cell's h may be wider than its state (w_hh (4H, H')), as the kernels take it.
    "lstm_cell_forward-wide-h": lambda: _cell("lstm", h=_randn(BATCH, HIDDEN + 2), w_hh=_randn(4 * HIDDEN, HIDDEN + 2)),
    "lstm_cell_backward": lambda: _cell("lstm", True),
    "gru_cell_forward": lambda: _cell("gru"),
    "gru_cell_backward": lambda: _cell("gru", True),
    "lstm_layer_forward": lambda: _layer("lstm"),
    "lstm_layer_backward": lambda: _layer("lstm", True),
    "gru_layer_forward": lambda: _layer("gru"),
    "gru_layer_backward": lambda: _layer("gru", True),
    "attention_decoder_step_inference": lambda: _decoder_step(),
    "attention_decoder_step_inference-gru-bahdanau": lambda: _decoder_step(
        c=None, w_ih=_randn(3 * HIDDEN, INPUT + VALUE_FEATURES), w_hh=_randn(3 * HIDDEN, HIDDEN), input_feeding=False,
    ),
    "attention_decoder_step_inference-local-p": lambda: _decoder_step(
        score="dot", v=None, bias=None, window=2, position_weight=_randn(HIDDEN, 3), position_v=_randn(3),
    ),
}


@pytest.mark.parametrize("name", GOOD)
def test_good_arguments_pass_the_fake_kernels_with_the_kernels_shapes(name):
    op, arguments = getattr(torch.ops.fastattn, name.split("-")[0]), GOOD[name]()
    with torch.no_grad():
        expected = op(*arguments.values())
    got = op(*_on(arguments, lambda tensor: tensor.to("meta")))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in expected]
