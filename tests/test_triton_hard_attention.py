"""Hard attention's Triton ops (fastattn.kernels.hard_attention): the choice and the outputs
there, ``triton_hard_attention``, and their gradients, ``triton_hard_attention_backward``,
against the reference (``choose`` as fastattn.reference.hard.hard_attention does it, and
``outputs_at``): over odd shapes that cross the 16-wide blocks, every dtype, the rows the
rules single out (all zero, NaN, a chosen weight below the clamp, two queries on one
position), sampling that repeats for a seed and follows the weights, gradcheck and
gradgradcheck in float64, opcheck, and the refusals.  On a machine without a
GPU under Triton's interpreter (tests/conftest.py); the ``gpu`` tests at a captioning shape,
with a bit-for-bit repeat of the backward (no atomics)."""

import pytest
import torch

from fastattn import backends
from tests.hard_outputs_problems import (
    F64, SHAPES, gradients_of_outputs, low_precision_error, outputs_and_gradients, problem, reference,
)
from tests.test_triton_attention import opcheck

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=str(backends.unavailable_reason("triton"))
)
NAMES = ("context", "log_prob", "grad_weights", "grad_values")


def forward(weights, values, sample=False, seed=0):
    return torch.ops.fastattn.triton_hard_attention(weights, values, sample, seed)


def reference_choice(weights):
    """The reference's argmax choice (fastattn.reference.hard.hard_attention): position 0 for
    a row without a positive sum (all zero, or NaN)."""
    return torch.where(weights.sum(dim=-1) > 0, weights.argmax(dim=-1), 0)


def chosen_outputs_and_gradients(weights, values, grad_context, grad_log_prob, **choice):
    """(index, (context, log_prob, grad_weights, grad_values)) through the forward op and its autograd."""
    index = {}

    def op(weights, _index, values):
        context, index["chosen"], log_prob = forward(weights, values, **choice)
        return context, log_prob

    results = outputs_and_gradients(op, weights, None, values, grad_context, grad_log_prob)
    return index["chosen"], results


def assert_within_twice_the_reference_error(weights, values, grads):
    """The op's outputs and gradients (inputs in low precision) err from the float64
    reference at the op's positions at most twice as much as the reference run in the
    inputs' dtypes does (plus one rounding of the output's dtype); each in its input's dtype."""
    index, ours = chosen_outputs_and_gradients(weights, values, *grads)
    truth = outputs_and_gradients(reference, weights.double(), index, values.double(), *(g.double() for g in grads))
    theirs = outputs_and_gradients(reference, weights, index, values, *grads)
    for name, got, own, want in zip(NAMES, ours, theirs, truth):
        assert got.dtype == own.dtype, name
        rounding = torch.finfo(got.dtype).eps * want[want.isfinite()].abs().max().item()
        assert low_precision_error(got, want) <= 2 * low_precision_error(own, want) + rounding, name
    return index


@pytest.mark.parametrize("shape", SHAPES)
def test_argmax_outputs_and_gradients_match_the_reference_in_float64(shape):
    weights, _, values = problem(shape)
    grads = gradients_of_outputs(weights, reference_choice(weights), values)
    index, ours = chosen_outputs_and_gradients(weights, values, *grads)
    assert torch.equal(index, reference_choice(weights))
    expected = outputs_and_gradients(reference, weights, index, values, *grads)
    for name, got, want in zip(NAMES, ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)
    if shape[1] > 1:  # the zero row (its position 0's infinite value times 0) and the NaN row
        assert ours[0][0, 0, 0].isnan() and (ours[0][0, 0, 1:] == 0).all()
        assert ours[1][0, 0] == 0 and (ours[2][0, 0] == 0).all()
        assert ours[0][-1, -1].isnan().all() and ours[1][-1, -1].isnan()


@pytest.mark.parametrize("shape", SHAPES)
def test_the_backward_op_at_given_positions_matches_the_reference_in_float64(shape):
    """Positions the forward would not choose: a chosen weight 0 (its log clamped), two
    queries on one value row (their gradients added), a zero row at position 0."""
    weights, index, values = problem(shape)
    grad_context, grad_log_prob = gradients_of_outputs(weights, index, values)
    expected = outputs_and_gradients(reference, weights, index, values, grad_context, grad_log_prob)[2:]
    backward = torch.ops.fastattn.triton_hard_attention_backward
    grad_weights, grad_values = backward(grad_context, grad_log_prob, weights, index)
    torch.testing.assert_close(grad_weights, expected[0], rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(grad_values, expected[1], rtol=1e-12, atol=1e-12, equal_nan=True)
    alone = backward(None, grad_log_prob, weights, index), backward(grad_context, None, weights, index)
    torch.testing.assert_close(alone[0][0], expected[0], rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(alone[1][1], expected[1], rtol=1e-12, atol=1e-12, equal_nan=True)
    assert alone[0][1].numel() == 0 and alone[1][0].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_low_precision_errs_at_most_twice_the_reference_in_that_dtype(shape, dtype):
    """Inputs rounded to dtype, positions the op's own; the float64 reference on them is the truth."""
    weights, _, values = (t.to(dtype) if t.is_floating_point() else t for t in problem(shape))
    values = values.nan_to_num(posinf=2.0)
    grads = [g.to(dtype) for g in gradients_of_outputs(weights, reference_choice(weights), values)]
    index = assert_within_twice_the_reference_error(weights, values, grads)
    assert torch.equal(index, reference_choice(weights.double()))  # the first of equal weights, as argmax


def test_weights_of_another_dtype_than_the_values_give_each_output_its_inputs_dtype():
    """As under autocast: bfloat16 weights, float32 values."""
    weights, _, values = problem((3, 5, 7, 4))
    weights, values = weights.to(torch.bfloat16), values.nan_to_num(posinf=2.0).float()
    grads = gradients_of_outputs(weights, reference_choice(weights), values)
    assert_within_twice_the_reference_error(weights, values, (grads[0].float(), grads[1].to(torch.bfloat16)))


def test_sampling_repeats_for_a_seed_and_never_picks_a_zero_weight():
    weights, _, values = problem((3, 5, 40, 4))
    weights[:, :, 1::3] = 0
    draws = [forward(weights, values, True, seed)[1] for seed in (11, 11, 12)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    for index in draws:
        chosen = weights.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        with_weights = weights.sum(dim=-1) > 0
        assert (chosen[with_weights] > 0).all() and (index[~with_weights] == 0).all()
    context, index, log_prob = forward(weights, values, True, 11)
    expected = reference(weights, index, values)
    torch.testing.assert_close(context, expected[0], equal_nan=True)
    torch.testing.assert_close(log_prob, expected[1], equal_nan=True)


def test_sampling_follows_the_weights():
    """Through the backend's ``outputs``, the generator giving the seed."""
    from fastattn.ops.triton_hard import hard_attention_outputs

    rows = 400  # the interpreter runs one program per row
    weights = torch.tensor([0.1, 0.0, 0.5, 0.2, 0.0] + [0.0] * 12 + [0.2]).expand(1, rows, 18).contiguous()
    values = torch.zeros(1, 18, 1)
    _, index, _ = hard_attention_outputs(weights, values, True, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(index[0], minlength=18) / rows
    assert frequencies[weights[0, 0] == 0].sum() == 0
    torch.testing.assert_close(frequencies, weights[0, 0], atol=0.1, rtol=0)  # 4 standard errors at p = 0.5
    again = hard_attention_outputs(weights, values, True, torch.Generator().manual_seed(0))[1]
    assert torch.equal(again, index)


def test_each_output_alone_gives_only_its_own_gradients():
    weights, _, values = problem((2, 4, 6, 3))
    for output, wanted in ((0, "values"), (2, "weights")):
        leaves = {"weights": weights.clone().requires_grad_(), "values": values.clone().requires_grad_()}
        forward(leaves["weights"], leaves["values"])[output].sum().backward()
        assert {name for name, leaf in leaves.items() if leaf.grad is not None} == {wanted}


def test_gradcheck_and_gradgradcheck_in_float64():
    """Argmax with margins far above gradcheck's steps, two queries on one position (rows 0 and 2)."""
    weights = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.2], [0.2, 0.1, 0.3, 0.4]]], dtype=F64)
    weights = weights.expand(2, 3, 4).contiguous().requires_grad_()
    values = torch.randn(2, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()

    def outputs(weights, values):
        context, _, log_prob = forward(weights, values)
        return context, log_prob

    assert torch.autograd.gradcheck(outputs, (weights, values))
    assert torch.autograd.gradgradcheck(outputs, (weights, values))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    weights, index, values = problem((3, 5, 7, 4))
    weights, values = weights.nan_to_num(0.5).to(dtype), values.nan_to_num(0, 1, -1).to(dtype)
    for sample in (False, True):
        opcheck(torch.ops.fastattn.triton_hard_attention.default,
                (weights.clone().requires_grad_(), values.clone().requires_grad_(), sample, 7))
    grad_context, grad_log_prob = (g.to(dtype) for g in gradients_of_outputs(weights, index, values))
    backward = torch.ops.fastattn.triton_hard_attention_backward.default
    for grads in ((grad_context, grad_log_prob), (None, grad_log_prob), (grad_context, None)):
        opcheck(backward, (*grads, weights, index))


@pytest.mark.parametrize("position", [-1, 7, 2**40])
def test_a_position_outside_the_row_is_refused(position):
    weights, index, values = problem((3, 5, 7, 4))
    index[2, 3] = position
    with pytest.raises(ValueError, match=r"triton_hard_attention_backward: index must hold positions in \[0, S=7\)"):
        torch.ops.fastattn.triton_hard_attention_backward(torch.zeros(3, 5, 4, dtype=F64), torch.zeros(3, 5, dtype=F64),
                                                          weights, index)


def test_bad_arguments_are_refused_naming_them():
    weights, index, values = problem((3, 5, 7, 4))
    backward = torch.ops.fastattn.triton_hard_attention_backward
    cases = [
        (TypeError, "weights must be float32", lambda: forward(weights.long(), values)),
        (ValueError, "weights must have 3 dimensions", lambda: forward(weights[0], values)),
        (ValueError, r"values must have shape \(3, 7, \*\)", lambda: forward(weights, values[:, :6])),
        (ValueError, r"at least one position \(S >= 1\)", lambda: forward(weights[:, :, :0], values[:, :0])),
        (TypeError, "index must have torch.int64",
         lambda: backward(None, torch.zeros(3, 5, dtype=F64), weights, index.int())),
        (ValueError, r"grad_log_prob must have shape \(3, 5\)",
         lambda: backward(None, torch.zeros(3, 4, dtype=F64), weights, index)),
        (ValueError, r"grad_context must have shape \(3, 5, \*\)",
         lambda: backward(torch.zeros(3, 4, 4, dtype=F64), None, weights, index)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_empty_problems():
    for shape in ((0, 5, 7, 4), (3, 0, 7, 4), (3, 5, 7, 0)):
        weights, _, values = problem(shape)
        context, index, log_prob = forward(weights, values)
        assert context.shape == (*shape[:2], shape[3]) and index.shape == log_prob.shape == shape[:2]
    context, index, log_prob = forward(torch.zeros(0, 3, 0), torch.zeros(0, 0, 4))  # no rows: nothing to choose
    assert context.shape == (0, 3, 4)


# ---------------------------------------------------------------- GPU, realistic shapes

# (N, T, S, Dv): a captioning model's teacher-forced hard attention over a 14 x 14 grid
GPU_HARD_ATTENTION_SHAPE = (16, 20, 196, 512)


def gpu_problem(dtype, device="cuda"):
    """(weights, values, grad_context, grad_log_prob) of GPU_HARD_ATTENTION_SHAPE (also the
    problem whose Triton compiles gpu_check.sh warms: benchmarks/triton_compile_problems.py)."""
    weights, _, values = problem(GPU_HARD_ATTENTION_SHAPE)
    weights, values = weights.to(device, dtype), values.nan_to_num(posinf=2.0).to(device, dtype)
    grads = [g.to(device, dtype) for g in gradients_of_outputs(weights, reference_choice(weights), values)]
    return weights, values, *grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_within_twice_the_reference_error(dtype):
    weights, values, *grads = gpu_problem(dtype)
    assert_within_twice_the_reference_error(weights, values, grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_backward_repeats_bit_for_bit():
    """No atomics: a batch element's queries add into its value rows one after another, so
    twenty queries on one row give the same sum every run."""
    weights, values, grad_context, grad_log_prob = gpu_problem(torch.bfloat16)
    index = torch.full(weights.shape[:2], 5, device="cuda")
    runs = [torch.ops.fastattn.triton_hard_attention_backward(grad_context, grad_log_prob, weights, index)
            for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(run, runs[0]))
