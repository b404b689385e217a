"""One tensor as both keys and values (Bahdanau's and Luong's h_j): the autograd kernel asks
attention_backward for that tensor's one gradient (values_are_keys), which the CPU kernels
sum as they write it.  On every path of the kernel the op's grad_keys must be the sum of
the two gradients the op gives without the flag, and through autograd the gradient must
be the reference's."""

import pytest
import torch

import fastattn
from fastattn import backends
from tests.problems import SCORES, score_parameters

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

# (N, T, S, D) per path of csrc/cpu/attention.cpp's backward
PATHS = {
    "decode-step": (3, 1, 9, 7),  # one query row: each gradient row written once
    "rows": (3, 5, 9, 7),  # several rows summed into each gradient row
    "row-blocks": (3, 37, 9, 6),  # more than kRowBlock (32) rows: block sums, then added
    "matrix-multiply": (3, 17, 19, 130),  # D >= 128, T, S >= 16: the GEMM path (dot, cosine)
}
MASKS = ["lengths-and-padding", "local-gaussian"]


def _masking(name, batch, queries, source, generator):
    """The lengths give batch element 0 no key (fully masked rows)."""
    if name == "lengths-and-padding":
        padding = torch.zeros(batch, source, dtype=torch.bool)
        padding[1, ::3] = True
        return {"lengths": torch.tensor([0] + [source - 2] * (batch - 1)), "key_padding_mask": padding}
    center = torch.rand(batch, queries, generator=generator, dtype=torch.float64) * (source - 1) + 0.3
    return {"window": 2, "center": center, "gaussian": True}


def _op_arguments(kernel_score, path, mask, dtype):
    batch, queries, source, features = PATHS[path]
    generator = torch.Generator().manual_seed(queries * source + features)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    keys = tensor(batch, source, features)
    additive = kernel_score == "additive"
    v, bias = (tensor(features), tensor(features)) if additive else (None, None)
    masking = _masking(mask, batch, queries, source, generator)
    masking.setdefault("center", None)
    return (tensor(batch, queries, features), keys, keys, v, bias, kernel_score, 1.0 if additive else 0.6,
            masking.get("lengths"), masking.get("key_padding_mask"), False, masking.get("window"),
            None if masking["center"] is None else masking["center"].to(dtype), masking.get("gaussian", False))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel_score", ["dot", "cosine", "additive"])
def test_the_one_gradient_is_the_sum_of_the_key_and_value_gradients(kernel_score, path, mask, dtype):
    arguments = _op_arguments(kernel_score, path, mask, dtype)
    context, weights, logsumexp = torch.ops.fastattn.attention_forward(*arguments, True)
    generator = torch.Generator().manual_seed(3)
    grad_context = torch.randn(context.shape, generator=generator, dtype=torch.float64).to(dtype)
    grad_weights = torch.randn(weights.shape, generator=generator, dtype=torch.float64).to(dtype)
    for given_grad_weights in (grad_weights, None):
        apart = torch.ops.fastattn.attention_backward(grad_context, given_grad_weights, *arguments, logsumexp)
        one = torch.ops.fastattn.attention_backward(grad_context, given_grad_weights, *arguments, logsumexp, True)
        assert one[2].numel() == 0
        assert apart[1].abs().max() > 0 and apart[2].abs().max() > 0
        tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(one[1], apart[1] + apart[2], **tolerance)
        for got, want in zip((one[0], *one[3:]), (apart[0], *apart[3:]), strict=True):
            assert torch.equal(got, want)  # the other gradients do not move


def _reuse_poisoned_memory(shape, dtype):
    """Frees NaN-filled tensors of the gradients' shape, so that the op's uninitialised
    outputs (at::empty) likely reuse their memory: a row the kernel fails to write shows NaN."""
    poisoned = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(4)]
    del poisoned


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel_score", ["dot", "cosine", "additive"])
def test_values_without_features_are_not_taken_for_the_keys(kernel_score, path, dtype):
    """Hard attention runs the op on values of shape (N, S, 0), whose gradient's data pointer
    is null as the one values_are_keys leaves: the keys' gradient must still be written
    whole (the decode-step rows once got their key term added to uninitialised memory)."""
    arguments = list(_op_arguments(kernel_score, path, "local-gaussian", dtype))
    keys = arguments[1]
    results = []
    for value_dim in (0, 1):  # 1: zero values and a zero context gradient, the same gradients
        arguments[2] = keys.new_zeros(*keys.shape[:-1], value_dim)
        context, weights, logsumexp = torch.ops.fastattn.attention_forward(*arguments, True)
        grad_weights = torch.randn(weights.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
        _reuse_poisoned_memory(keys.shape, dtype)
        results.append(
            torch.ops.fastattn.attention_backward(torch.zeros_like(context), grad_weights, *arguments, logsumexp)
        )
    without_features, with_zero_values = results
    assert with_zero_values[1].abs().max() > 0
    for got, want in zip(without_features[:2], with_zero_values[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_opcheck_attention_backward_with_values_are_keys():
    arguments = _op_arguments("dot", "rows", "lengths-and-padding", torch.float64)
    context, weights, logsumexp = torch.ops.fastattn.attention_forward(*arguments, True)
    torch.library.opcheck(torch.ops.fastattn.attention_backward.default,
                          (torch.randn_like(context), torch.randn_like(weights), *arguments, logsumexp, True))


class _BackwardFlags(torch.utils._python_dispatch.TorchDispatchMode):
    """The values_are_keys of each attention_backward call that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.name() == "fastattn::attention_backward":
            self.flags.append(kwargs.get("values_are_keys", args[16] if len(args) > 16 else False))
        return func(*args, **kwargs)


@pytest.mark.parametrize("path", ["decode-step", "rows", "matrix-multiply"])
@pytest.mark.parametrize("score", SCORES)
def test_autograd_sends_one_tensor_as_keys_and_values_down_as_one(score, path):
    """fastattn.attention(query, h, h): the gradient of h is the reference's, and the
    backward is asked for it as one where the kernel is given h as both (the dot-product
    scores and the cosine; the general score's W_a goes to the query); h and a copy of it
    as the values: two gradients, as before."""
    batch, queries, source, features = PATHS[path]
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(batch, queries, features, generator=generator, dtype=torch.float64, requires_grad=True)
    states = torch.randn(batch, source, features, generator=generator, dtype=torch.float64, requires_grad=True)
    parameters = score_parameters(score, features, features, attention_dim=7, max_source_len=source,
                                  generator=generator)
    lengths = torch.tensor([source, 1] + [source - 3] * (batch - 2))

    def gradients(backend_name, values):
        with fastattn.backend(backend_name):
            context = fastattn.attention(query, states, values, score=score, lengths=lengths, **parameters)
        projection = (context * torch.linspace(-1, 1, context.numel(), dtype=torch.float64).view_as(context)).sum()
        return torch.autograd.grad(projection, (query, states))

    expected = gradients("reference", states)
    with _BackwardFlags() as calls:
        got = gradients("cpu", states)
    assert calls.flags == [score in ("dot", "scaled_dot", "general", "cosine")]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    with _BackwardFlags() as calls:
        gradients("cpu", states.clone())
    assert calls.flags == [False]


@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("score", ["scaled_dot", "cosine"])
def test_gradcheck_of_one_tensor_as_keys_and_values(score, queries):
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, queries, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    states = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True)

    def function(query, states):
        with fastattn.backend("cpu"):
            return fastattn.attention(query, states, states, score=score, scale=0.8 if score == "cosine" else None,
                                      lengths=torch.tensor([6, 4]))

    assert torch.autograd.gradcheck(function, (query, states))
