"""Gradients of gradients (torch.autograd.grad with create_graph=True): the fused ops'
backward kernels are not differentiable, so with create_graph=True their autograd
takes the gradients from the ops' differentiable forms (torch.ops.fastattn.*_reference,
fastattn/ops/higher_order.py).  Checked against the reference backend: the first
gradients taken so must equal the kernels' own, and the second ones the reference's
(they were zeros, with a deprecation warning, before); and by gradgradcheck.  The
Triton LSTM/GRU steps, whose kernels keep no gate pre-activations, take such a backward
from the reference's maths (fastattn/ops/triton_recurrent.py).
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import backends
from tests.problems import key_dim_for, score_parameters

F64 = torch.float64
BATCH, QUERIES, KEYS, DIM = 2, 3, 5, 4


def _available(names):
    return [name for name in names if backends.unavailable_reason(name) is None]


KERNEL_BACKENDS = _available(("cpu", "triton"))
# The dtype each backend's kernels run the tests in: Triton runs float64 on the reference.
KERNEL_DTYPES = {"cpu": F64, "triton": torch.float32}
pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend is built")

# (score, masking): every score, the masks, a local-p window with its Gaussian factor
# (the centers' gradient), the weights output and a single decoder step.
ATTENTION_CASES = {
    "dot-lengths": ("dot", {"lengths": torch.tensor([5, 0])}),
    "scaled_dot-causal": ("scaled_dot", {"causal": True}),
    "general-padding": ("general", {"key_padding_mask": torch.tensor([[False, True, False, False, True]] * 2)}),
    # centers off the integers: the window's edges, where the weights jump, are not crossed
    # by gradgradcheck's finite differences
    "additive-local_p": ("additive", {"window": 1, "center": torch.tensor([[0.5, 2.3, 3.6], [3.7, 1.2, 0.4]], dtype=F64)}),
    "cosine-local_m": ("cosine", {"window": 1, "gaussian": True}),
    "location-weights": ("location", {"return_weights": True}),
    "additive-step": ("additive", {"step": True, "lengths": torch.tensor([4, 2])}),
}


def attention_problem(name, dtype=F64, device="cpu"):
    score, masking = ATTENTION_CASES[name]
    masking = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in masking.items()}
    generator = torch.Generator().manual_seed(len(name))
    queries = () if masking.pop("step", False) else (QUERIES,)
    key_dim = key_dim_for(score, DIM, 6)
    query = torch.randn(BATCH, *queries, DIM, dtype=dtype, generator=generator)
    keys = torch.randn(BATCH, KEYS if score != "scaled_dot" else QUERIES, key_dim, dtype=dtype, generator=generator)
    parameters = score_parameters(score, DIM, key_dim, dtype=dtype, generator=generator)
    if "center" in masking:
        masking["center"] = masking["center"].to(dtype)
    tensors = {"query": query, "keys": keys, **parameters}
    if "center" in masking:
        tensors["center"] = masking.pop("center")
    tensors = {key: tensor.to(device).requires_grad_() for key, tensor in tensors.items()}
    return score, tensors, masking


def attention_outputs(backend, score, tensors, masking):
    with fastattn.backend(backend):
        result = fastattn.attention(score=score, **tensors, **masking)
    return result if isinstance(result, tuple) else (result,)


def _first_and_second_gradients(backend, name, dtype=F64, device="cpu"):
    """(gradients of a random weighting of the outputs, taken with create_graph=True;
    the gradients of a random weighting of those) over every input tensor."""
    score, tensors, masking = attention_problem(name, dtype, device)
    outputs = attention_outputs(backend, score, tensors, masking)
    generator = torch.Generator().manual_seed(7)

    def weighting(like):
        return torch.randn(like.shape, dtype=dtype, generator=generator).to(device)

    loss = sum((output * weighting(output)).sum() for output in outputs)
    inputs = list(tensors.values())
    first = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    mixed = sum((g * weighting(g)).sum() for g in first if g is not None)
    second = torch.autograd.grad(mixed, inputs, allow_unused=True)
    return first, second


def _assert_all_close(actual, expected):
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_second_derivatives_are_the_references(backend, name):
    first, second = _first_and_second_gradients(backend, name, KERNEL_DTYPES[backend])
    expected_first, expected_second = _first_and_second_gradients("reference", name, KERNEL_DTYPES[backend])
    _assert_all_close(first, expected_first)
    _assert_all_close(second, expected_second)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in second)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["dot-lengths", "additive-local_p"])
def test_first_gradients_with_a_graph_equal_the_kernels_own(backend, name):
    score, tensors, masking = attention_problem(name, KERNEL_DTYPES[backend])
    outputs = attention_outputs(backend, score, tensors, masking)
    grad_output = torch.randn_like(outputs[0])
    with_graph = torch.autograd.grad(outputs[0], list(tensors.values()), grad_output, create_graph=True)
    without = torch.autograd.grad(outputs[0], list(tensors.values()), grad_output)
    _assert_all_close(with_graph, without)
    assert all(g.requires_grad for g in with_graph)


@pytest.mark.parametrize("name", ["additive-local_p", "cosine-local_m"])
def test_cpu_attention_passes_gradgradcheck(name):
    if backends.unavailable_reason("cpu") is not None:
        pytest.skip(backends.unavailable_reason("cpu"))
    score, tensors, masking = attention_problem(name)
    names = list(tensors)

    def attend(*inputs):
        return attention_outputs("cpu", score, dict(zip(names, inputs)), masking)[0]

    assert torch.autograd.gradgradcheck(attend, tuple(tensors.values()))


RECURRENT_MODULES = {
    "lstm-cell": lambda: fastattn.nn.LSTMCell(3, 4),
    "gru-cell": lambda: fastattn.nn.GRUCell(3, 4),
    "lstm-bidirectional": lambda: fastattn.nn.LSTM(3, 4, num_layers=2, bidirectional=True),
    "gru-no-bias": lambda: fastattn.nn.GRU(3, 4, bias=False),
}


def _recurrent_gradients(backend, name, dtype=F64, lengths=None, device="cpu"):
    torch.manual_seed(0)
    module = RECURRENT_MODULES[name]().to(device, dtype)
    cell = name.endswith("cell")
    x = torch.randn(*((2,) if cell else (5, 2)), 3, dtype=dtype).to(device).requires_grad_()
    h = torch.randn(2, 4, dtype=dtype).to(device).requires_grad_()  # a state, so that w_hh counts in a cell
    with fastattn.backend(backend):
        if lengths is not None:
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
            output = torch.nn.utils.rnn.pad_packed_sequence(module(packed)[0])[0]
        elif cell:
            output = module(x, (h, h.cos()) if name.startswith("lstm") else h)
            output = output[0] if isinstance(output, tuple) else output
        else:
            output = module(x)[0]
    inputs = [x, *module.parameters()] + ([h] if cell else [])
    first = torch.autograd.grad(output.pow(2).sum(), inputs, create_graph=True)
    second = torch.autograd.grad(sum(g.sin().sum() for g in first), inputs)
    return first, second


@pytest.mark.parametrize("name", list(RECURRENT_MODULES))
def test_recurrent_second_derivatives_are_the_references(name):
    if backends.unavailable_reason("cpu") is not None:
        pytest.skip(backends.unavailable_reason("cpu"))
    lengths = torch.tensor([5, 3]) if name == "lstm-bidirectional" else None
    first, second = _recurrent_gradients("cpu", name, lengths=lengths)
    expected_first, expected_second = _recurrent_gradients("reference", name, lengths=lengths)
    _assert_all_close(first, expected_first)
    _assert_all_close(second, expected_second)
    assert all(torch.count_nonzero(g) > 0 for g in second)


@pytest.mark.parametrize("name", list(RECURRENT_MODULES))
def test_triton_recurrent_second_derivatives_are_the_references(name):
    """Cells (both GEMMs in the step kernel) and layers (the input projection, then the
    layer op's time loop): the first gradients with a graph and the second ones, in float32."""
    if backends.unavailable_reason("triton") is not None:
        pytest.skip(backends.unavailable_reason("triton"))
    lengths = torch.tensor([5, 3]) if name == "lstm-bidirectional" else None
    first, second = _recurrent_gradients("triton", name, torch.float32, lengths)
    expected_first, expected_second = _recurrent_gradients("reference", name, torch.float32, lengths)
    _assert_all_close(first, expected_first)
    _assert_all_close(second, expected_second)
    assert all(torch.count_nonzero(g) > 0 for g in second)


def test_the_triton_recurrent_backward_ops_refuse_to_be_differentiated():
    if backends.unavailable_reason("triton") is not None:
        pytest.skip(backends.unavailable_reason("triton"))
    h = torch.randn(2, 4, requires_grad=True)
    saved = torch.rand(2, 16)
    states, layer_saved = torch.randn(4, 2, 4, requires_grad=True), torch.rand(3, 2, 16)
    w_hh = torch.randn(16, 4)
    for grads in (
        torch.ops.fastattn.triton_lstm_pointwise_backward(h, h, h, h, saved),
        torch.ops.fastattn.triton_lstm_layer_backward(states, states, states, layer_saved, w_hh, None, False),
        torch.ops.fastattn.triton_gru_layer_backward(states, states, layer_saved, w_hh[:12], None, True),
    ):
        with pytest.raises(RuntimeError, match="backward ops have no derivative"):
            grads[0].sum().backward()


def _reference_op_samples():
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, dtype=F64, generator=generator, requires_grad=True)

    query, keys, values = randn(2, 3, 4), randn(2, 5, 4), randn(2, 5, 6)
    yield torch.ops.fastattn.attention_reference.default, (
        query, keys, values, None, None, "dot", 0.5, torch.tensor([5, 0]), None, False, None, None, False)
    yield torch.ops.fastattn.attention_reference.default, (
        query, randn(1, 5, 4), values, randn(4), randn(4), "additive", 1.0, None, None, False, 1,
        randn(2, 3), True)
    x, h, c = randn(2, 3), randn(2, 4), randn(2, 4)
    yield torch.ops.fastattn.lstm_cell_reference.default, (x, h, c, randn(16, 3), randn(16, 4), randn(16), None)
    yield torch.ops.fastattn.gru_cell_reference.default, (x, h, randn(12, 3), randn(12, 4), None, randn(12))
    xs = randn(5, 2, 3)
    yield torch.ops.fastattn.lstm_layer_reference.default, (
        xs, h, c, randn(16, 3), randn(16, 4), randn(16), randn(16), torch.tensor([5, 2]), True)
    yield torch.ops.fastattn.gru_layer_reference.default, (
        xs, h, randn(12, 3), randn(12, 4), None, None, None, False)


@pytest.mark.parametrize("op, arguments", list(_reference_op_samples()) if KERNEL_BACKENDS else [])
def test_opcheck_reference_ops(op, arguments):
    torch.library.opcheck(op, arguments)


# The gpu test's cases (benchmarks/triton_compile_problems.py compiles their Triton launches
# ahead of gpu_check.sh's test run).
GPU_ATTENTION_CASES = ["dot-lengths", "additive-local_p", "cosine-local_m", "additive-step"]


def _on_the_gpu(backend):
    reason = "no CUDA device" if not torch.cuda.is_available() else backends.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"needs a CUDA device and the {backend} backend: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", GPU_ATTENTION_CASES)
def test_gpu_attention_second_derivatives_are_the_references(backend, name):
    _on_the_gpu(backend)
    first, second = _first_and_second_gradients(backend, name, torch.float32, "cuda")
    expected_first, expected_second = _first_and_second_gradients("reference", name, torch.float32, "cuda")
    _assert_all_close(first, expected_first)
    _assert_all_close(second, expected_second)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(RECURRENT_MODULES))
def test_gpu_recurrent_second_derivatives_are_the_references(name):
    _on_the_gpu("cuda")
    lengths = torch.tensor([5, 3]) if name == "lstm-bidirectional" else None
    first, second = _recurrent_gradients("cuda", name, torch.float32, lengths, "cuda")
    expected_first, expected_second = _recurrent_gradients("reference", name, torch.float32, lengths, "cuda")
    _assert_all_close(first, expected_first)
    _assert_all_close(second, expected_second)
