"""torch.compile(fullgraph=True) over the functional API and the nn modules: no graph
breaks, same results as eager, on every backend that runs CPU tensors here."""

import pytest
import torch

import fastattn
from tests.problems import cpu_backends


@pytest.fixture(params=cpu_backends())
def backend_name(request):
    torch._dynamo.reset()
    with fastattn.backend(request.param):
        yield request.param


def assert_compiles_like_eager(function, *arguments):
    expected = function(*arguments)
    actual = torch.compile(function, fullgraph=True)(*arguments)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_attention_functional(backend_name):
    query, keys = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    lengths = torch.tensor([5, 2])

    def attend(query, keys, lengths):
        return fastattn.attention(query, keys, score="scaled_dot", lengths=lengths, window=2, return_weights=True)

    assert_compiles_like_eager(attend, query, keys, lengths)


def test_attention_module_and_its_backward(backend_name):
    module = fastattn.nn.Attention(6, 5, score="additive")
    query, keys = torch.randn(3, 6, requires_grad=True), torch.randn(3, 4, 5)

    def step(query, keys):
        context, weights = module(query, keys, lengths=torch.tensor([4, 1, 3]))
        return context.sum() + weights.square().sum()

    eager = torch.autograd.grad(step(query, keys), query)[0]
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True)(query, keys), query)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_recurrent_modules(backend_name):
    lstm, cell = fastattn.nn.LSTM(4, 6, num_layers=2, bidirectional=True), fastattn.nn.GRUCell(4, 6)
    x = torch.randn(5, 3, 4)

    def run(x):
        output, (h, c) = lstm(x)
        return output, h, c, cell(x[0])

    assert_compiles_like_eager(run, x)


def test_attention_decoder_cell(backend_name):
    decoder = fastattn.nn.AttentionDecoderCell(4, 6, 5)
    cache = decoder.precompute(torch.randn(2, 7, 5))

    def step(y):
        output, state, weights = decoder(y, None, cache, lengths=torch.tensor([7, 2]))
        return output, weights

    assert_compiles_like_eager(step, torch.randn(2, 4))


def assert_gradients_compile_like_eager(loss, inputs):
    """The gradients of ``loss(*inputs)`` (a scalar) with respect to ``inputs``, eager
    and through torch.compile(fullgraph=True): AOTAutograd traces the ops' autograd."""
    eager = torch.autograd.grad(loss(*inputs), inputs)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*inputs), inputs)
    for actual, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_recurrent_modules_backward(backend_name):
    lstm, gru = fastattn.nn.LSTM(4, 6, bidirectional=True), fastattn.nn.GRU(4, 6)
    lstm_cell, gru_cell = fastattn.nn.LSTMCell(4, 6), fastattn.nn.GRUCell(4, 6)
    x = torch.randn(5, 3, 4, requires_grad=True)

    def loss(x, *parameters):
        output, (h, c) = lstm(x)
        h_cell, c_cell = lstm_cell(x[0])
        return (output.square().sum() + h.sum() + c.sum() + gru(x)[0].sum() + (h_cell * c_cell).sum()
                + gru_cell(x[1]).square().sum())

    parameters = [*lstm.parameters(), *gru.parameters(), *lstm_cell.parameters(), *gru_cell.parameters()]
    assert_gradients_compile_like_eager(loss, (x, *parameters))


def test_attention_decoder_cell_backward(backend_name):
    decoder = fastattn.nn.AttentionDecoderCell(4, 6, 5)
    keys, y = torch.randn(2, 7, 5, requires_grad=True), torch.randn(2, 4, requires_grad=True)

    def loss(y, keys, *parameters):
        output, state, weights = decoder(y, None, decoder.precompute(keys), lengths=torch.tensor([7, 2]))
        return output.square().sum() + state[1].sum() + weights.square().sum()

    assert_gradients_compile_like_eager(loss, (y, keys, *decoder.parameters()))
