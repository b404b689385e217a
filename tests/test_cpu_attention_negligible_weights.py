"""Peaked rows whose weights run down past float32's subnormals (a trained decoder's rows;
q and k of unit entries at D = 512 already spread the scores over ~45).  The CPU kernels
drop the weights under 2^-63 of the row's largest (2^-511 in float64) from the context's
sums, and from a backward without a weights' gradient (csrc/cpu/attention.cpp,
negligible_weight), because a subnormal float32 weight cost a microcode assist per vector
of its value row.  What must still hold, on each path of the kernel: the context and the
gradients within twice the reference run's error in their dtype, plus the dropped
weights' share (under S 2^-63 of the largest value); the returned weights are every weight
the reference gives, subnormal ones included; and a weights' gradient through a tiny
weight (that of -log w_j, -1 / w_j) reaches the inputs as the reference's does."""

import pytest
import torch

from fastattn import backends
from tests.problems import assert_op_gradients_within_twice_the_reference_error, input_gradients

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

# (N, T, S, D, Dv) per path of csrc/cpu/attention.cpp
PATHS = {
    "decode-step": (3, 1, 19, 7, 5),
    "rows": (3, 5, 19, 7, 5),
    "matrix-multiply": (3, 17, 19, 130, 32),  # the GEMM path (dot, cosine; use_blas_path), checked below
}
SCORE_SPREAD = {torch.float32: 40.0, torch.float64: 300.0}  # the scores' standard deviation
NEGLIGIBLE = {torch.float32: 2.0**-63, torch.float64: 2.0**-511}
reference = torch.ops.fastattn.attention_reference


def forward(*arguments):
    """attention_forward with its weights."""
    return torch.ops.fastattn.attention_forward(*arguments, True)


def _peaked_arguments(kernel_score, path, dtype):
    """attention_forward's arguments but return_weights (float64 values rounded to dtype)
    whose scores have a standard deviation of SCORE_SPREAD[dtype]."""
    batch, queries, source, features, value_dim = PATHS[path]
    generator = torch.Generator().manual_seed(queries * source + features)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    query, keys = tensor(batch, queries, features), tensor(batch, source, features)
    values = tensor(batch, source, value_dim)
    spread, v, bias, scale = SCORE_SPREAD[dtype], None, None, 1.0
    if kernel_score == "dot":
        query = query * spread / features**0.5
    elif kernel_score == "cosine":
        scale = spread * features**0.5  # cos(q, k) has a standard deviation of about D^-1/2
    else:
        v, bias = tensor(features) * spread / (0.4 * features) ** 0.5, tensor(features)
    v, bias = (None if x is None else x.to(dtype) for x in (v, bias))
    return [query.to(dtype), keys.to(dtype), values.to(dtype), v, bias, kernel_score, scale, None, None, False, None,
            None, False]


def _exact(arguments):
    return [a.double() if isinstance(a, torch.Tensor) else a for a in arguments]


def _on_its_path(path, run):
    """run(), asserting that the kernel took the GEMM path exactly for "matrix-multiply"."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = run()
    softmax_rows = any(event.name == "fastattn::softmax_rows" for event in profile.events())
    assert softmax_rows == (path == "matrix-multiply")
    return result


def _cases(dtypes=(torch.float32, torch.float64)):
    for dtype in dtypes:
        for path in PATHS:
            for kernel_score in ("dot", "cosine", "additive"):
                if not (kernel_score == "additive" and path == "matrix-multiply"):  # no GEMM path
                    yield pytest.param(kernel_score, path, dtype, id=f"{kernel_score}-{path}-{str(dtype)[6:]}")


@pytest.mark.parametrize("kernel_score, path, dtype", _cases())
def test_the_outputs_of_rows_with_negligible_weights_err_like_the_reference(kernel_score, path, dtype):
    arguments = _peaked_arguments(kernel_score, path, dtype)
    context, weights, _ = _on_its_path(path, lambda: forward(*arguments))
    exact_context, exact_weights = reference(*_exact(arguments))[:2]
    run_context, run_weights = reference(*arguments)[:2]
    negligible = (exact_weights > 0) & (exact_weights < NEGLIGIBLE[dtype])
    assert negligible.float().mean() > 0.1  # the rows have many of them
    if dtype == torch.float32:
        subnormal = (exact_weights > 2.0**-140) & (exact_weights < torch.finfo(dtype).tiny)
        assert subnormal.any()
    # The returned weights keep every weight the reference run gives, subnormal ones too.
    smallest = 2.0**-140 if dtype == torch.float32 else 2.0**-1060
    assert ((weights > 0) == (run_weights > 0))[exact_weights > smallest].all()
    # Both outputs within twice the reference run's error, plus a few roundings of the
    # largest entry (in float64 the reference run is the truth itself, and a kernel may
    # differ from it by its rounding of e_j - max: eps |e_j|, |e_j| up to ~4 SCORE_SPREAD),
    # the context also by the dropped weights' share.
    eps = torch.finfo(dtype).eps
    roundings = 4 * (SCORE_SPREAD[dtype] if dtype == torch.float64 else 1)
    values = arguments[2]
    dropped_share = values.shape[1] * NEGLIGIBLE[dtype] * values.abs().max()
    for name, got, want, theirs, extra in (("weights", weights, exact_weights, run_weights, 0.0),
                                           ("context", context, exact_context, run_context, dropped_share)):
        our_error, reference_error = ((x.double() - want).abs().max() for x in (got, theirs))
        bound = 2 * reference_error + roundings * eps * want.abs().max() + extra
        assert our_error <= bound, (name, float(our_error), float(reference_error))


class _KernelTanh(torch.autograd.Function):
    """tanh as the CPU kernels take it for the additive score in float32: fast_tanh, a
    rational function within 4e-7 of tanh (test_cpu_attention.py checks the bound)."""

    @staticmethod
    def forward(ctx, x):
        t = torch.ops.fastattn.fast_tanh(x.contiguous())
        ctx.save_for_backward(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * (1 - t * t)


def _additive_run_with_the_kernels_arithmetic(arguments, grad_context):
    """The reference's additive attention without masks, softmax(v . tanh(q + k + b)) @
    values, in float32 as the CPU kernels compute the scores: the kernels' tanh, and
    v_d tanh(.) summed over d elementwise (the reference takes a GEMV).  Its gradients
    (query, keys, values)."""
    query, keys, values, v, bias = (a.clone().requires_grad_() if i < 3 else a for i, a in enumerate(arguments[:5]))
    scores = (_KernelTanh.apply(query[:, :, None, :] + keys[:, None, :, :] + bias) * v).sum(-1)
    context = torch.softmax(scores, dim=-1) @ values
    return torch.autograd.grad(context, (query, keys, values), grad_context.to(context.dtype))


# The gradients in float32 only: the float64 reference run is the truth the rule measures
# errors against, and in rows this peaked its plain softmax backward is not exact.  The
# additive score's bound also takes a float32 run of the kernels' arithmetic for the
# scores (their rational tanh, the sum over d in order): scores of |v| ~ 24 spread 40
# amplify both.  On the AMD EPYC of 2026-12-08 the kernel's query gradient erred 5.4e-5,
# the reference run's 1.9e-5, that run's 5.2e-5 (3.4e-5 with torch's tanh); the bound had
# held on the Intel Xeon where the test was written.
@pytest.mark.parametrize("kernel_score, path, dtype", _cases([torch.float32]))
def test_the_gradients_of_rows_with_negligible_weights_err_like_the_reference(kernel_score, path, dtype):
    arguments = _peaked_arguments(kernel_score, path, dtype)
    grad_context = torch.randn(*arguments[0].shape[:2], arguments[2].shape[2],
                               generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = _on_its_path(path, lambda: input_gradients(forward, arguments, grad_context))
    approximating_run = None
    if kernel_score == "additive":
        approximating_run = _additive_run_with_the_kernels_arithmetic(arguments, grad_context)
    assert_op_gradients_within_twice_the_reference_error(ours, arguments, grad_context,
                                                         approximating_run=approximating_run)


@pytest.mark.parametrize("kernel_score, path, dtype", _cases([torch.float32]))
def test_a_weights_gradient_through_a_tiny_weight_reaches_the_inputs(kernel_score, path, dtype):
    """grad_weights = -1 / w_j at one tiny weight a row (between 1e-30 and 1e-20 of a
    largest near 1): -log w_j's gradient, whose score gradient p_j dw_j is about -1.
    Dropping p_j there would lose it."""
    arguments = _peaked_arguments(kernel_score, path, dtype)
    exact_weights = reference(*_exact(arguments))[1]
    tiny = (exact_weights > 1e-30) & (exact_weights < 1e-20)
    chosen = tiny & (tiny.cumsum(-1) == 1)  # the first such weight of each row
    assert chosen.sum() >= 2
    grad_weights = torch.where(chosen, -1 / exact_weights, torch.zeros_like(exact_weights))
    grad_context = torch.zeros(*arguments[0].shape[:2], arguments[2].shape[2], dtype=torch.float64)
    ours = _on_its_path(path, lambda: input_gradients(forward, arguments, grad_context, grad_weights))
    assert ours[0].abs().max() > 1e-3  # the query's gradient is not small
    assert_op_gradients_within_twice_the_reference_error(ours, arguments, grad_context, grad_weights)
