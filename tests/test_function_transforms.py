"""torch.func transforms (grad, jacrev, jvp, vmap, functional_call) and forward-mode
AD (torch.autograd.forward_ad) over fastattn.

The kernel ops' autograd is C++ (csrc/autograd.cpp), which functorch refuses to run
("cannot use C++ torch::autograd::Function with functorch transforms") and which has
no jvp, so ``fastattn.backends.implementation`` runs the reference for the tensors a
transform wraps or that carry a tangent.  Each result is checked against plain
autograd on the kernel backend: the same derivatives, through the kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call, grad, jacrev, jvp, vmap

import fastattn
from fastattn import backends

F64 = torch.float64
KERNEL_BACKENDS = [name for name in ("cpu", "triton") if backends.unavailable_reason(name) is None]
pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend is built")


def _randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _kernel_dtype(backend):
    """float64 for the cpu kernels; float32 for Triton's, which run float64 on the reference."""
    return torch.float32 if backend == "triton" else F64


def _tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}


QUERY, KEYS, LENGTHS = _randn(2, 3, 4), _randn(2, 5, 4, seed=1), torch.tensor([5, 2])
W_QUERY, W_KEY, V = _randn(6, 4, seed=2), _randn(6, 4, seed=3), _randn(6, seed=4)


def _attend(query):
    keys, w_query, w_key, v = (tensor.to(query.dtype) for tensor in (KEYS, W_QUERY, W_KEY, V))
    return fastattn.attention(query, keys, score="additive", w_query=w_query, w_key=w_key, v=v, lengths=LENGTHS)


def _autograd_gradient(function, point):
    point = point.detach().requires_grad_()
    return torch.autograd.grad(function(point).sum(), point)[0]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grad_jacrev_and_jvp_of_attention_are_the_kernels_derivatives(backend):
    dtype = _kernel_dtype(backend)
    query = QUERY.to(dtype)
    with fastattn.backend(backend):
        expected = _autograd_gradient(_attend, query)
        by_grad = grad(lambda q: _attend(q).sum())(query)
        by_jacrev = jacrev(lambda q: _attend(q).sum())(query)
        _, by_jvp = jvp(lambda q: _attend(q).sum(), (query,), (torch.ones_like(query),))
    tolerance = _tolerance(dtype)
    torch.testing.assert_close(by_grad, expected, **tolerance)
    torch.testing.assert_close(by_jacrev, expected, **tolerance)
    torch.testing.assert_close(by_jvp, expected.sum(), **tolerance)


@pytest.mark.skipif(backends.unavailable_reason("cpu") is not None, reason="needs the cpu backend")
def test_forward_mode_tangents_are_the_kernels_derivatives():
    """<J t, u> of the tangent against <t, J^T u> of the kernels' backward, for attention
    and a two-layer LSTM."""
    lstm = fastattn.nn.LSTM(4, 3, num_layers=2).double()
    for function, point in ((_attend, QUERY), (lambda x: lstm(x)[0], _randn(5, 2, 4, seed=9))):
        tangent = _randn(*point.shape, seed=10)
        with fastattn.backend("cpu"):
            with forward_ad.dual_level():
                jvp_tangent = forward_ad.unpack_dual(function(forward_ad.make_dual(point, tangent))).tangent
            weighting = _randn(*jvp_tangent.shape, seed=11)
            leaf = point.detach().requires_grad_()
            vjp = torch.autograd.grad(function(leaf), leaf, weighting)[0]
        torch.testing.assert_close((jvp_tangent * weighting).sum(), (tangent * vjp).sum())


def _kernel_op_calls():
    """(name, function of a tensor put first, that tensor) for each differentiable kernel op."""
    x, h, c = _randn(2, 4, seed=12), _randn(2, 3, seed=13), _randn(2, 3, seed=14)
    sequence, lstm_weights, gru_weights = _randn(5, 2, 4, seed=15), _randn(12, 4, seed=16), _randn(9, 4, seed=17)
    lstm_hidden, gru_hidden = _randn(12, 3, seed=18), _randn(9, 3, seed=19)
    ops = torch.ops.fastattn
    return [
        ("attention_forward", lambda q: ops.attention_forward(q, KEYS, KEYS, None, None, "dot", 1.0, LENGTHS, None,
                                                              False, None, None, False, False), QUERY),
        ("lstm_cell_forward", lambda t: ops.lstm_cell_forward(t, h, c, lstm_weights, lstm_hidden, None, None), x),
        ("gru_cell_forward", lambda t: ops.gru_cell_forward(t, h, gru_weights, gru_hidden, None, None), x),
        ("lstm_layer_forward", lambda t: ops.lstm_layer_forward(t, h, c, lstm_weights, lstm_hidden, None, None,
                                                                None, False), sequence),
        ("gru_layer_forward", lambda t: ops.gru_layer_forward(t, h, gru_weights, gru_hidden, None, None, None, False),
         sequence),
    ]


KERNEL_OP_CALLS = _kernel_op_calls()


@pytest.mark.skipif(backends.unavailable_reason("cpu") is not None, reason="needs the cpu backend")
@pytest.mark.parametrize("name, call, point", KERNEL_OP_CALLS, ids=[name for name, _, _ in KERNEL_OP_CALLS])
def test_the_kernel_ops_refuse_a_forward_mode_tangent_rather_than_drop_it(name, call, point):
    """Called directly, with no input needing a gradient, a kernel op skips its autograd
    Function (csrc/autograd.cpp); an input with a tangent must still reach the Function,
    which refuses it (no jvp), rather than return outputs without their tangent."""
    plain = call(point)
    assert all(output.grad_fn is None for output in plain)
    with forward_ad.dual_level():
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            call(forward_ad.make_dual(point, torch.ones_like(point)))
    leaf = point.detach().requires_grad_()
    assert call(leaf)[0].grad_fn is not None, name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vmap_of_attention_and_sdpa_equals_the_loop(backend):
    dtype = _kernel_dtype(backend)
    queries, keys = torch.stack([QUERY, QUERY.flip(1), QUERY * 2]).to(dtype), KEYS.to(dtype)
    with fastattn.backend(backend):
        mapped = vmap(lambda q: fastattn.attention(q, keys, score="scaled_dot", lengths=LENGTHS))(queries)
        looped = torch.stack([fastattn.attention(q, keys, score="scaled_dot", lengths=LENGTHS) for q in queries])
        mapped_sdpa = vmap(lambda q: fastattn.scaled_dot_product_attention(q, keys, keys))(queries)
        looped_sdpa = torch.stack([fastattn.scaled_dot_product_attention(q, keys, keys) for q in queries])
    torch.testing.assert_close(mapped, looped, **_tolerance(dtype))
    torch.testing.assert_close(mapped_sdpa, looped_sdpa, **_tolerance(dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vmap_over_lengths_and_window_centers_equals_the_loop(backend):
    """Mapped lengths and centers: their value checks (range, finite) had branched on
    batched tensors, which vmap refuses as data-dependent control flow."""
    dtype = _kernel_dtype(backend)
    queries, keys = torch.stack([QUERY, QUERY.flip(1), QUERY * 2]).to(dtype), KEYS.to(dtype)
    lengths = torch.tensor([[5, 2], [3, 0], [1, 5]])
    centers = torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(1), dtype=dtype) * 5
    with fastattn.backend(backend):
        for name, mapped_argument, options in (("lengths", lengths, {}), ("center", centers, {"window": 1})):
            def attend(query, argument, name=name, options=options):
                return fastattn.attention(query, keys, score="scaled_dot", **{name: argument}, **options)

            mapped = vmap(attend)(queries, mapped_argument)
            looped = torch.stack([attend(q, argument) for q, argument in zip(queries, mapped_argument)])
            torch.testing.assert_close(mapped, looped, msg=lambda m, n=name: f"{n}: {m}", **_tolerance(dtype))


def _module_cases():
    keys = _randn(2, 5, 4, seed=5)
    yield "lstm", fastattn.nn.LSTM(3, 4, num_layers=2, bidirectional=True), lambda m: m(_randn(5, 2, 3, seed=6))[0]
    yield "gru_cell", fastattn.nn.GRUCell(3, 4), lambda m: m(_randn(2, 3, seed=6), _randn(2, 4, seed=7))
    yield "attention", fastattn.nn.Attention(4, 4, score="general"), lambda m: m(QUERY, keys, lengths=LENGTHS)[0]
    yield "decoder_cell", fastattn.nn.AttentionDecoderCell(3, 4, 4, score="additive"), (
        lambda m: m(_randn(2, 3, seed=8), None, m.attention.precompute(keys), lengths=LENGTHS)[0]
    )


class _Running(torch.nn.Module):
    """``run(module)`` as a forward, so that functional_call can swap the module's parameters."""

    def __init__(self, module, run):
        super().__init__()
        self.module, self.run = module, run

    def forward(self):
        return self.run(self.module)


@pytest.mark.skipif(backends.unavailable_reason("cpu") is not None, reason="needs the cpu backend")
@pytest.mark.parametrize("name, module, run", list(_module_cases()), ids=[case[0] for case in _module_cases()])
def test_grad_over_parameters_by_functional_call_is_the_kernels(name, module, run):
    running = _Running(module.double(), run)
    parameters = {key: value.detach() for key, value in running.named_parameters()}
    with fastattn.backend("cpu"):
        by_grad = grad(lambda p: functional_call(running, p, ()).sum())(parameters)
        running().sum().backward()
    for key, parameter in running.named_parameters():
        torch.testing.assert_close(by_grad[key], parameter.grad, msg=key)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_per_sample_gradients_with_lengths_and_local_p_equal_the_loop(backend):
    """vmap(grad(...)): the batched lengths sit inside grad's wrapper, where the value
    checks did not see them and branched on them (vmap's data-dependent control flow error)."""
    dtype = _kernel_dtype(backend)
    queries, keys = _randn(4, 1, 3, 8, dtype=dtype), _randn(4, 1, 6, 8, seed=1, dtype=dtype)
    lengths = torch.tensor([[6], [3], [1], [5]])
    local_p = fastattn.nn.Attention(8, 8, window=1, local="p").to(dtype)
    with fastattn.backend(backend):
        def attend(query, keys, lengths):
            return (fastattn.attention(query, keys, lengths=lengths) + local_p(query, keys, lengths=lengths)[0]).sum()

        mapped = vmap(grad(attend))(queries, keys, lengths)
        looped = torch.stack([_autograd_gradient(lambda q, i=i: attend(q, keys[i], lengths[i]), queries[i])
                              for i in range(4)])
    torch.testing.assert_close(mapped, looped, **_tolerance(dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_transforms_run_the_reference_inside_them(backend):
    """torch.compile(torch.func.grad(...), fullgraph=True): dynamo traces the transform
    with the ops' tensors wrapped, so the ops must run the reference there too; the
    kernels' C++ autograd failed the trace ("cannot use C++ torch::autograd::Function
    with functorch transforms")."""
    torch._dynamo.reset()
    dtype = _kernel_dtype(backend)
    query = QUERY.to(dtype)
    gru = fastattn.nn.GRU(4, 3).to(dtype)
    parameters = {key: value.detach() for key, value in gru.named_parameters()}
    sequence = _randn(5, 2, 4, seed=9, dtype=dtype)
    with fastattn.backend(backend):
        compiled_grad = torch.compile(grad(lambda q: _attend(q).square().sum()), backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled_grad(query), _autograd_gradient(lambda q: _attend(q).square().sum(), query),
                                   **_tolerance(dtype))
        by_grad = torch.compile(grad(lambda p: functional_call(gru, p, (sequence,))[0].sum()), backend="aot_eager",
                                fullgraph=True)(parameters)
        gru(sequence)[0].sum().backward()
    for key, parameter in gru.named_parameters():
        torch.testing.assert_close(by_grad[key], parameter.grad, msg=key, **_tolerance(dtype))
