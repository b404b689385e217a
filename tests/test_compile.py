"""torch.compile(fullgraph=True) over the functional API and the nn modules: no graph
breaks, same results as eager, on every backend that runs CPU tensors here."""

import pytest
import torch
import torch._dynamo.testing

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


def test_transposed_inputs_compile_forward_and_backward(backend_name):
    """The fake kernels' outputs are contiguous, as the kernels': fakes that copied a
    transposed state's or center's strides failed torch.compile's check of the real
    outputs (lstm_cell, gru_cell with a .view of the output, attention's center gradient)."""
    x, h, c = torch.randn(4, 3).t(), torch.randn(5, 3).t(), torch.randn(5, 3).t()
    w_lstm, u_lstm, w_gru, u_gru = torch.randn(20, 4), torch.randn(20, 5), torch.randn(15, 4), torch.randn(15, 5)
    center = (torch.rand(3, 2) * 4).t()
    query, keys = torch.randn(2, 3, 4), torch.randn(4, 5, 2).permute(2, 1, 0)

    def loss(x, c, center):
        h_next, c_next = fastattn.lstm_cell(x, (h, c), w_lstm, u_lstm)
        h_gru = fastattn.gru_cell(x, c, w_gru, u_gru).view(-1)
        context = fastattn.attention(query, keys, window=2, center=center)
        return h_next.square().sum() + c_next.sum() + h_gru.sum() + context.square().sum()

    leaves = [t.requires_grad_() for t in (x, c, center)]
    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_recurrent_modules_on_packed_sequences(backend_name):
    """A PackedSequence input: its batch size is read from batch_sizes once (two reads were
    two unbacked sizes under torch.compile, which the layer op's check of lengths (B,)
    could not prove equal).  Traced by dynamo and AOTAutograd, not lowered by inductor:
    torch 2.11's cannot lower the scatter of a data-dependent number of rows (2.13's can)."""
    lstm, gru = fastattn.nn.LSTM(4, 3, bidirectional=True), fastattn.nn.GRU(4, 3, num_layers=2)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([2, 5, 3]),
                                                     enforce_sorted=False)

    def run(packed):
        output, (h, c) = lstm(packed)
        gru_output, h_gru = gru(packed)
        return output.data, h, c, gru_output.data, h_gru

    expected = run(packed)
    actual = torch.compile(run, fullgraph=True, backend="aot_eager")(packed)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


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


def _decoder_loop():
    decoder = fastattn.nn.AttentionDecoderCell(4, 6, 5)

    def two_steps(y, keys, lengths):
        cache = decoder.precompute(keys)
        output, state, _ = decoder(y, None, cache, lengths=lengths)
        output, state, _ = decoder(y, state, cache, lengths=lengths)  # a given state is checked
        return output

    return two_steps, lambda size: (torch.randn(size, 4), torch.randn(size, 7, 5), torch.arange(size) % 8)


def _padded_attention():
    def attend(query, keys, mask):
        return fastattn.attention(query, keys, key_padding_mask=mask, return_weights=True)

    def inputs(size):
        mask = torch.arange(size + 2) >= torch.arange(2).unsqueeze(1) + size  # row 1 sees one key more
        return torch.randn(2, 3, 5), torch.randn(2, size + 2, 5), mask

    return attend, inputs


def _local_p_attention():
    def attend(query, keys, center):
        return fastattn.attention(query, keys, window=2, center=center)

    return attend, lambda size: (torch.randn(2, size, 5), torch.randn(2, 11, 5), torch.rand(2, size) * 11)


def _lstm_with_a_state():
    lstm = fastattn.nn.LSTM(4, 6, num_layers=2)

    def run(x, h, c):
        return lstm(x, (h, c))[0]

    return run, lambda size: (torch.randn(5, size, 4), torch.randn(2, size, 6), torch.randn(2, size, 6))


def _cell_with_a_state():
    def step(x, h, w_ih, w_hh):
        return fastattn.gru_cell(x, h, w_ih, w_hh)

    return step, lambda size: (torch.randn(size, 3), torch.randn(size, 4), torch.randn(12, 3), torch.randn(12, 4))


@pytest.mark.parametrize("case", [_decoder_loop, _padded_attention, _local_p_attention, _lstm_with_a_state,
                                  _cell_with_a_state])
def test_dynamic_shapes_compile_one_graph(backend_name, case):
    """torch.compile(dynamic=True) over the sizes that change between batches (B, S, T):
    one graph for all of them, matching eager.  The shape checks had formatted their
    messages up front, which fixed each size (a recompile per batch size, per T) or, for
    key_padding_mask, broke the graph."""
    function, inputs = case()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(function, backend=counter, fullgraph=True, dynamic=True)
    graphs = []
    for size in (9, 10, 13):  # no size equal to another dimension (dynamo's duck sizing would pair them)
        arguments = inputs(size)
        torch.testing.assert_close(compiled(*arguments), function(*arguments), rtol=1e-5, atol=1e-5)
        graphs.append(counter.frame_count)
    assert graphs[1:] == graphs[:1] * 2, f"graphs compiled after each call: {graphs}"


def test_export_with_a_dynamic_source_length(backend_name):
    """torch.export with S (and B, T) dynamic: the source size was read with Size.numel(),
    which fixed S at the example's ("you marked S as dynamic but your code specialized it")."""
    from torch.export import Dim

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.local_p = fastattn.nn.Attention(8, 8, score="dot", window=1, local="p")

        def forward(self, query, keys, lengths):
            return fastattn.attention(query, keys, lengths=lengths) + self.local_p(query, keys, lengths=lengths)[0]

    module = Attend()
    batch, queries, source = Dim("batch", min=1, max=16), Dim("queries", min=1, max=32), Dim("source", min=2, max=64)
    example = (torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.tensor([5, 2]))
    exported = torch.export.export(module, example, dynamic_shapes=(
        {0: batch, 1: queries}, {0: batch, 1: source}, {0: batch}))
    other = (torch.randn(3, 4, 8), torch.randn(3, 9, 8), torch.tensor([9, 1, 6]))
    torch.testing.assert_close(exported.module()(*other), module(*other))


def test_compiled_graphs_hold_the_kernel_ops():
    """Outside a torch.func transform, the graph torch.compile traces calls the cpu backend's
    ops themselves, not the reference's PyTorch (a check that routes ops inside compiled
    transforms to the reference once sent every compiled call there)."""
    if "cpu" not in cpu_backends():
        pytest.skip("needs fastattn._C")
    torch._dynamo.reset()
    graphs = []

    def capture(graph, example_inputs):
        graphs.append(graph)
        return graph

    lstm = fastattn.nn.LSTM(4, 6)

    def run(query, keys, x):
        return fastattn.attention(query, keys, score="scaled_dot"), lstm(x)[0]

    with fastattn.backend("cpu"):
        torch.compile(run, fullgraph=True, backend=capture)(torch.randn(2, 3, 5), torch.randn(2, 5, 5), torch.randn(3, 2, 4))
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    for op in ("fastattn.attention_forward", "fastattn.lstm_layer_forward"):
        assert any(target.startswith(op) for target in targets), (op, targets)
