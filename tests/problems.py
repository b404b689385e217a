"""Random attention problems for the tests: the score parameters each score needs."""

from __future__ import annotations

import torch

SCORES = ("dot", "scaled_dot", "general", "additive", "cosine", "location")


def score_parameters(
    score: str,
    query_dim: int,
    key_dim: int,
    *,
    attention_dim: int = 5,
    max_source_len: int = 16,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    requires_grad: bool = False,
) -> dict:
    """Keyword arguments of ``fastattn.attention`` for ``score``'s parameters."""

    def random(*shape):
        return torch.randn(*shape, dtype=dtype, generator=generator).requires_grad_(requires_grad)

    if score == "general":
        return {"weight": random(query_dim, key_dim)}
    if score == "location":
        return {"weight": random(max_source_len, query_dim)}
    if score == "additive":
        return {
            "w_query": random(attention_dim, query_dim),
            "w_key": random(attention_dim, key_dim),
            "v": random(attention_dim),
            "bias": random(attention_dim),
        }
    return {}


def key_dim_for(score: str, query_dim: int, other: int) -> int:
    """Dot-product scores need Dk == Dq; the others take any key size."""
    return query_dim if score in ("dot", "scaled_dot", "cosine") else other


def cpu_backends() -> list[str]:
    """The backends that run CPU tensors in this build: the reference, and the C++
    kernels when fastattn._C is built."""
    from fastattn import backends

    return [name for name in ("reference", "cpu") if backends.unavailable_reason(name) is None]


def opcheck_backward_sample_positions_and_fast_tanh(forward_arguments: tuple) -> None:
    """torch.library.opcheck of attention_backward at the outputs of attention_forward on
    ``forward_arguments`` (with weights returned), of sample_positions on those weights,
    and of fast_tanh, on the device of the arguments."""
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in forward_arguments]
    context, weights, logsumexp = torch.ops.fastattn.attention_forward(*detached)
    query, keys, values, v, bias, score, scale, lengths, mask, causal, window, center, gaussian, _ = detached
    for given_context in (None, context):
        torch.library.opcheck(
            torch.ops.fastattn.attention_backward.default,
            (torch.randn_like(context), torch.randn_like(weights), query, keys, values, v, bias, score, scale, lengths,
             mask, causal, window, center, gaussian, logsumexp, given_context),
        )
    torch.library.opcheck(torch.ops.fastattn.sample_positions.default, (weights, False, None))
    torch.library.opcheck(torch.ops.fastattn.fast_tanh.default, (torch.randn(17, device=query.device),))
    # A transposed x: the output is contiguous, the fake's too (it had kept x's strides).
    torch.library.opcheck(torch.ops.fastattn.fast_tanh.default, (torch.randn(4, 3, device=query.device).T,))


def peaked_additive_problem(seed: int, dtype: torch.dtype = torch.float16) -> tuple[list, torch.Tensor]:
    """attention_forward's arguments (without return_weights) for an additive problem in
    ``dtype`` whose rows are peaked (v . tanh(.) over D = 128 features: N = 1, T = 21, S =
    37 of which 30 visible, Dv = 128), and a grad_context.  There the score gradient
    p_j (dw_j - r) cancels to small differences, which a 16-bit r = dC . C (from the
    rounded context) swamps; seed 5 is such a problem."""
    generator = torch.Generator().manual_seed(seed)
    shapes = ((1, 21, 128), (1, 37, 128), (1, 37, 128), (128,), (128,), (1, 21, 128))
    query, keys, values, v, bias, grad_context = (
        torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes)
    query = query * 128**-0.5 * 4
    query, keys, values, v, bias, grad_context = (
        tensor.to(dtype) for tensor in (query, keys, values, v, bias, grad_context))
    return [query, keys, values, v, bias, "additive", 1.0, torch.tensor([30]), None, False, None, None, False], grad_context


def input_gradients(forward, arguments, grad_context, grad_weights=None) -> tuple:
    """(grad_query, grad_keys, grad_values) through ``forward(*arguments)``, an op with
    attention_forward's arguments giving (context, weights, ...); through the weights too
    when ``grad_weights`` is given."""
    leaves = [tensor.clone().requires_grad_() for tensor in arguments[:3]]
    context, weights = forward(*leaves, *arguments[3:])[:2]
    outputs, grads = (context, weights), (grad_context, grad_weights)
    if grad_weights is None:
        outputs, grads = outputs[:1], grads[:1]
    return torch.autograd.grad(outputs, leaves, [grad.to(leaves[0].dtype) for grad in grads])


def assert_op_gradients_within_twice_the_reference_error(ours, arguments, grad_context, grad_weights=None) -> None:
    """``ours`` (grad_query, grad_keys, grad_values of attention_forward's ``arguments``)
    within 2x the error of the reference op run in their dtype, plus one rounding of the
    largest entry (the float64 run on the same rounded inputs is exact)."""
    dtype = arguments[0].dtype
    exact_arguments = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in arguments]
    reference = torch.ops.fastattn.attention_reference
    exact = input_gradients(reference, exact_arguments, grad_context, grad_weights)
    reference_run = input_gradients(reference, arguments, grad_context, grad_weights)
    for name, got, want, theirs in zip(("query", "keys", "values"), ours, exact, reference_run):
        our_error, reference_error = (got.double() - want).abs().max(), (theirs.double() - want).abs().max()
        bound = 2 * reference_error + torch.finfo(dtype).eps * want.abs().max()
        assert our_error <= bound, (f"grad_{name}", float(our_error), float(reference_error))


def sigmoid_arguments() -> torch.Tensor:
    """float32 gate pre-activations on a dense grid from the subnormal range of sigmoid
    (below -87.3) to where it rounds to 1."""
    return torch.linspace(-103.0, 40.0, 200_001)


def assert_sigmoid_accurate(x: torch.Tensor, got: torch.Tensor) -> None:
    """``got`` = a kernel's float32 sigmoid of ``x`` (sigmoid_arguments()): relative error
    against float64 at most twice torch.sigmoid's own in float32 over the normal range,
    and within float32's smallest normal of the truth below it."""
    truth = torch.sigmoid(x.double())
    normal = truth >= torch.finfo(torch.float32).tiny

    def relative_error(values):
        return ((values.double() - truth) / truth).abs()[normal].max().item()

    assert relative_error(got) <= 2 * relative_error(torch.sigmoid(x))
    assert (got.double() - truth).abs()[~normal].max() <= torch.finfo(torch.float32).tiny
