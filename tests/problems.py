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


# (N, T, S, D, Dv) whose scores the C++ attention's matrix-multiply path makes in blocks of
# about 2^20 (for_each_score_block): T S = 1.08e6 splits each batch element's rows (582 and
# 18), T S = 3e5 takes three batch elements a block (then two).
BLOCK_SHAPES = [(2, 600, 1800, 9, 5), (5, 300, 1000, 8, 3)]
BLOCK_SCORES = 2**20


def score_blocks(batch: int, queries: int, source_length: int) -> int:
    """How many blocks for_each_score_block makes: whole batch elements a block where T S
    is at most BLOCK_SCORES, else rows of one element."""
    per_element = queries * source_length
    if per_element <= BLOCK_SCORES:
        elements = min(max(BLOCK_SCORES // per_element, 1), batch)
        return -(-batch // elements)
    return batch * -(-queries // max(1, BLOCK_SCORES // source_length))


def attention_shape_ids(shapes) -> list[str]:
    """pytest ids of (N, T, S, D, Dv) attention shapes: "n3_t16_s17_d129_dv33"."""
    return [f"n{n}_t{t}_s{s}_d{d}_dv{dv}" for n, t, s, d, dv in shapes]


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
    for grad_weights in (torch.randn_like(weights), None):
        torch.library.opcheck(
            torch.ops.fastattn.attention_backward.default,
            (torch.randn_like(context), grad_weights, query, keys, values, v, bias, score, scale, lengths, mask, causal,
             window, center, gaussian, logsumexp),
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


PEAKED_SHAPES = {"multi_query": (4, 6), "one_query": (1, 100), "multi_query_tiles": (5, 40)}  # (T, S)


def peaked_problems(score: str, steps: int, source: int, seeds: int = 12):
    """(attention_forward's float64 arguments without return_weights, grad_context) of
    ``seeds`` problems whose rows are peaked: scale 30 for "dot" and "cosine" (raw op
    scores), v x 10 for "additive" (D = 8, Dv = 3, N = 1)."""
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        query, keys, values, grad_context = (torch.randn(*size, generator=generator, dtype=torch.float64)
                                             for size in ((1, steps, 8), (1, source, 8), (1, source, 3), (1, steps, 3)))
        additive = score == "additive"
        v, bias = (torch.randn(8, generator=generator, dtype=torch.float64) * 10,
                   torch.randn(8, generator=generator, dtype=torch.float64)) if additive else (None, None)
        yield [query, keys, values, v, bias, score, 1.0 if additive else 30.0, None, None, False, None, None,
               False], grad_context


def reference_op_gradients(arguments: list, grad_context: torch.Tensor) -> tuple:
    """The gradients of the given ones of query, keys, values, v and bias (attention_forward's
    first five ``arguments``) through fastattn::attention_reference, in their dtype."""
    leaves = [a.clone().requires_grad_() for a in arguments[:5] if a is not None]
    given = iter(leaves)
    context = torch.ops.fastattn.attention_reference(
        *[next(given) if a is not None else None for a in arguments[:5]], *arguments[5:])[0]
    return torch.autograd.grad(context, leaves, grad_context.to(context.dtype))


def assert_peaked_float32_gradients_err_like_the_reference(backward, score: str, shape: str,
                                                           checked: tuple = ("query", "keys", "values", "v", "bias")):
    """``backward(float32 arguments, float32 grad_context)`` -> the op's gradients (grad_query,
    grad_keys, grad_values, grad_v, grad_bias; None or empty where absent) over
    peaked_problems: each `checked` one's error summed over the problems within 2x the
    float32 reference run's (the float64 run is the truth)."""
    names = ("query", "keys", "values", "v", "bias")
    ours_total, reference_total = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for arguments, grad_context in peaked_problems(score, *PEAKED_SHAPES[shape]):
        low = [a.float() if isinstance(a, torch.Tensor) else a for a in arguments]
        ours = [g for g in backward(low, grad_context.float())[:5] if g is not None and g.numel()]
        exact, reference_run = reference_op_gradients(arguments, grad_context), reference_op_gradients(low, grad_context)
        assert len(ours) == len(exact)
        for name, got, want, theirs in zip(names, ours, exact, reference_run):
            ours_total[name] += float((got.double() - want).abs().max())
            reference_total[name] += float((theirs.double() - want).abs().max())
    for name in [name for name in names[:len(exact)] if name in checked]:
        assert ours_total[name] <= 2 * reference_total[name], (name, ours_total[name], reference_total[name])


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


def assert_op_gradients_within_twice_the_reference_error(ours, arguments, grad_context, grad_weights=None,
                                                          approximating_run=None) -> None:
    """``ours`` (grad_query, grad_keys, grad_values of attention_forward's ``arguments``)
    within 2x the error of the reference op run in their dtype, plus one rounding of the
    largest entry (the float64 run on the same rounded inputs is exact).
    ``approximating_run``: the same gradients from a run in that dtype that makes the
    kernel's documented approximation (the additive score's rational tanh); the larger of
    the two runs' errors sets the bound."""
    dtype = arguments[0].dtype
    exact_arguments = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in arguments]
    reference = torch.ops.fastattn.attention_reference
    exact = input_gradients(reference, exact_arguments, grad_context, grad_weights)
    runs = [input_gradients(reference, arguments, grad_context, grad_weights)]
    if approximating_run is not None:
        runs.append(approximating_run)
    for index, (name, got, want) in enumerate(zip(("query", "keys", "values"), ours, exact)):
        our_error = (got.double() - want).abs().max()
        reference_error = max((run[index].double() - want).abs().max() for run in runs)
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


def leaves_in(arguments, dtype: torch.dtype) -> list:
    """``arguments`` with each floating-point tensor a new leaf in ``dtype`` (a float64 one
    holds exactly the values of a float16 / bfloat16 one: the exact answer to what a run in
    that dtype is given); the rest as it is."""
    return [a.detach().to(dtype).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in arguments]
