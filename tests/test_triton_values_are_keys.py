"""One tensor as both keys and values on the Triton backend (under the interpreter on a
machine without a GPU): the backward's key-value kernel writes dK + dV as that tensor's
one gradient (values_are_keys), which must be the sum of the two gradients the op gives
without the flag, and which autograd asks for exactly where keys is values."""

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.ops import triton_attention
from tests.problems import SCORES, score_parameters

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=str(backends.unavailable_reason("triton"))
)
BATCH, KEYS, FEATURES = 2, 21, 20  # two key blocks of 16, two feature tiles of 16 (additive)


def _op_arguments(kernel_score, queries):
    generator = torch.Generator().manual_seed(queries)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator)

    keys = tensor(BATCH, KEYS, FEATURES)
    additive = kernel_score == "additive"
    v, bias = (tensor(FEATURES), tensor(FEATURES)) if additive else (None, None)
    return (tensor(BATCH, queries, FEATURES), keys, keys, v, bias, kernel_score, 1.0 if additive else 0.4,
            torch.tensor([0, 13]), None, False, None, None, False)


@pytest.mark.parametrize("queries", [1, 19])  # a decode step and two query blocks
@pytest.mark.parametrize("kernel_score", ["dot", "cosine", "additive"])
def test_the_one_gradient_is_the_sum_of_the_key_and_value_gradients(kernel_score, queries):
    arguments = _op_arguments(kernel_score, queries)
    context, weights, row_stats = torch.ops.fastattn.triton_attention_forward(*arguments, True)
    generator = torch.Generator().manual_seed(2)
    grad_context, grad_weights = torch.randn(context.shape, generator=generator), torch.randn(weights.shape)
    apart = torch.ops.fastattn.triton_attention_backward(grad_context, grad_weights, *arguments, row_stats)
    one = torch.ops.fastattn.triton_attention_backward(grad_context, grad_weights, *arguments, row_stats, True)
    assert one[2].numel() == 0
    assert apart[1].abs().max() > 0 and apart[2].abs().max() > 0
    torch.testing.assert_close(one[1], apart[1] + apart[2], rtol=1e-5, atol=1e-5)
    for got, want in zip((one[0], *one[3:]), (apart[0], *apart[3:]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_values_are_keys_with_keys_shared_by_the_batch_is_refused():
    arguments = list(_op_arguments("dot", 3))
    arguments[1] = arguments[1][:1]  # (1, S, D): shared, no longer the values' shape
    context, _, row_stats = torch.ops.fastattn.triton_attention_forward(*arguments, False)
    with pytest.raises(ValueError, match="values_are_keys needs keys and values of one shape"):
        torch.ops.fastattn.triton_attention_backward(torch.ones_like(context), None, *arguments, row_stats, True)


@pytest.mark.parametrize("score", SCORES)
def test_autograd_sends_one_tensor_as_keys_and_values_down_as_one(score, monkeypatch):
    """fastattn.attention(query, h, h) on the triton backend: h's gradient is the
    reference's, and the backward is asked for it as one where the kernel is given h as
    both (the dot-product scores and the cosine); with a copy of h as the values, two."""
    flags = []

    def recording_backward(*arguments):
        flags.append(arguments[16] if len(arguments) > 16 else False)
        return backward(*arguments)

    backward = triton_attention.triton_attention_backward
    monkeypatch.setattr(triton_attention, "triton_attention_backward", recording_backward)
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(BATCH, 5, FEATURES, generator=generator, requires_grad=True)
    states = torch.randn(BATCH, KEYS, FEATURES, generator=generator, requires_grad=True)
    parameters = score_parameters(score, FEATURES, FEATURES, attention_dim=18, max_source_len=24,
                                  dtype=torch.float32, generator=generator)

    def gradients(backend_name, values):
        with fastattn.backend(backend_name):
            context = fastattn.attention(query, states, values, score=score, lengths=torch.tensor([KEYS, 9]),
                                         **parameters)
        projection = (context * torch.linspace(-1, 1, context.numel()).view_as(context)).sum()
        return torch.autograd.grad(projection, (query, states))

    expected = gradients("reference", states)
    got = gradients("triton", states)
    assert flags == [score in ("dot", "scaled_dot", "general", "cosine")]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=5e-5)
    flags.clear()
    gradients("triton", states.clone())
    assert flags == [False]
