"""The reference LSTM/GRU (fastattn.reference.recurrent) against torch.nn.

Outputs and gradients of every op against torch's own modules in float32 and
float64 on odd sizes, per-sequence lengths against torch's packed sequences,
and fp64 gradcheck of each op on tiny shapes.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastattn.reference import recurrent as reference

INPUT, HIDDEN, STEPS, BATCH = 5, 7, 9, 3
PROJECTION = 4
LENGTHS = [4, 9, 4]  # unsorted, with a tie
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-8)}
DTYPES = list(TOLERANCES)
LSTM_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
GRU_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def random_projection_gradients(outputs, inputs):
    """Gradients of <outputs, fixed random tensors> with respect to ``inputs``."""
    generator = torch.Generator().manual_seed(1)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum() for out in outputs)
    return torch.autograd.grad(loss, inputs)


def assert_same_values_and_gradients(expected, actual, inputs, dtype):
    tolerance = TOLERANCES[dtype]
    for want, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got, want, **tolerance)
    expected_gradients = random_projection_gradients(expected, inputs)
    actual_gradients = random_projection_gradients(actual, inputs)
    for want, got in zip(expected_gradients, actual_gradients, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


def random(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def layer_weights(module, names, reverse):
    suffix = "_l0_reverse" if reverse else "_l0"
    return [getattr(module, name + suffix, None) for name in names]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_matches_torch(dtype, bias):
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(INPUT, HIDDEN, bias=bias, dtype=dtype)
    x = random(BATCH, INPUT, dtype=dtype)
    h, c = random(BATCH, HIDDEN, dtype=dtype), random(BATCH, HIDDEN, dtype=dtype)
    expected = cell(x, (h, c))
    actual = reference.lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert_same_values_and_gradients(expected, actual, [x, h, c, *cell.parameters()], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell_matches_torch(dtype, bias):
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(INPUT, HIDDEN, bias=bias, dtype=dtype)
    x, h = random(BATCH, INPUT, dtype=dtype), random(BATCH, HIDDEN, dtype=dtype)
    expected = (cell(x, h),)
    actual = (reference.gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh),)
    assert_same_values_and_gradients(expected, actual, [x, h, *cell.parameters()], dtype)


def run_torch_bidirectional(module, x, states, lengths):
    """torch's one-layer bidirectional module on x (T, B, I), optionally packed with
    ``lengths``; returns output (T, B, 2 * Hout) zero-padded and the final states."""
    if lengths is None:
        return module(x, states)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    output, final = module(packed, states)
    return pad_packed_sequence(output, total_length=x.shape[0])[0], final


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("proj_size", [0, PROJECTION])
@pytest.mark.parametrize("lengths", [None, LENGTHS])
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_layer_matches_torch(dtype, proj_size, lengths, reverse):
    torch.manual_seed(0)
    module = torch.nn.LSTM(INPUT, HIDDEN, bidirectional=True, proj_size=proj_size, dtype=dtype)
    h_size = proj_size or HIDDEN
    x = random(STEPS, BATCH, INPUT, dtype=dtype)
    h0, c0 = random(2, BATCH, h_size, dtype=dtype), random(2, BATCH, HIDDEN, dtype=dtype)
    output, (h_n, c_n) = run_torch_bidirectional(module, x, (h0, c0), lengths)
    direction = int(reverse)
    expected = (output[..., direction * h_size : (direction + 1) * h_size], h_n[direction], c_n[direction])
    weights = layer_weights(module, LSTM_WEIGHTS, reverse)
    actual = reference.lstm_layer(
        x, h0[direction], c0[direction], *weights,
        lengths=None if lengths is None else torch.tensor(lengths), reverse=reverse,
    )
    used = [x, h0, c0, *(weight for weight in weights if weight is not None)]
    assert_same_values_and_gradients(expected, actual, used, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [None, LENGTHS])
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_layer_matches_torch(dtype, lengths, reverse):
    torch.manual_seed(0)
    module = torch.nn.GRU(INPUT, HIDDEN, bidirectional=True, dtype=dtype)
    x, h0 = random(STEPS, BATCH, INPUT, dtype=dtype), random(2, BATCH, HIDDEN, dtype=dtype)
    output, h_n = run_torch_bidirectional(module, x, h0, lengths)
    direction = int(reverse)
    expected = (output[..., direction * HIDDEN : (direction + 1) * HIDDEN], h_n[direction])
    weights = layer_weights(module, GRU_WEIGHTS, reverse)
    actual = reference.gru_layer(
        x, h0[direction], *weights,
        lengths=None if lengths is None else torch.tensor(lengths), reverse=reverse,
    )
    assert_same_values_and_gradients(expected, actual, [x, h0, *weights], dtype)


def test_layer_freezes_state_and_zeroes_output_after_the_length():
    torch.manual_seed(0)
    x, h0 = random(4, 2, 3), random(2, 5)
    weights = random(15, 3), random(15, 5), random(15), random(15)
    output, h_n = reference.gru_layer(x, h0, *weights, lengths=torch.tensor([4, 2]))
    short_output, short_h_n = reference.gru_layer(x[:2, 1:], h0[1:], *weights)
    assert torch.equal(output[2:, 1], torch.zeros_like(output[2:, 1]))
    torch.testing.assert_close(output[:2, 1:], short_output)
    torch.testing.assert_close(h_n[1:], short_h_n)


# Tiny shapes for gradcheck: input 2, hidden 3, projection 2, 3 steps, batch 2.
GRADCHECK_LENGTHS = [None, torch.tensor([3, 1])]


def test_lstm_cell_gradcheck():
    torch.manual_seed(0)
    arguments = (random(2, 2), random(2, 3), random(2, 3), random(12, 2), random(12, 3), random(12), random(12))
    assert torch.autograd.gradcheck(reference.lstm_cell, arguments)


def test_gru_cell_gradcheck():
    torch.manual_seed(0)
    arguments = (random(2, 2), random(2, 3), random(9, 2), random(9, 3), random(9), random(9))
    assert torch.autograd.gradcheck(reference.gru_cell, arguments)


@pytest.mark.parametrize("lengths", GRADCHECK_LENGTHS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("projected", [False, True])
def test_lstm_layer_gradcheck(lengths, reverse, projected):
    torch.manual_seed(0)
    h_size = 2 if projected else 3
    w_hr = random(h_size, 3) if projected else None
    x, h0, c0 = random(3, 2, 2), random(2, h_size), random(2, 3)
    arguments = (x, h0, c0, random(12, 2), random(12, h_size), random(12), random(12), w_hr)

    def layer(*tensors):
        return reference.lstm_layer(*tensors, lengths=lengths, reverse=reverse)

    assert torch.autograd.gradcheck(layer, arguments)


@pytest.mark.parametrize("lengths", GRADCHECK_LENGTHS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_layer_gradcheck(lengths, reverse):
    torch.manual_seed(0)
    arguments = (random(3, 2, 2), random(2, 3), random(9, 2), random(9, 3), random(9), random(9))

    def layer(*tensors):
        return reference.gru_layer(*tensors, lengths=lengths, reverse=reverse)

    assert torch.autograd.gradcheck(layer, arguments)
