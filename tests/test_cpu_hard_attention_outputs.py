"""The CPU kernel of hard attention's outputs, torch.ops.fastattn.hard_attention_outputs and its
backward (csrc/cpu/hard_attention_outputs.cpp), against fastattn.reference.hard.outputs_at:
context, log-probability and their gradients over odd shapes and every dtype, with the rows
its rules single out (all zero, NaN, a chosen weight below the clamp, an infinite value in a
zero row, two queries choosing one position), weights of another dtype than the values (as
under autocast), gradcheck and gradgradcheck in float64, opcheck, and the refusals."""

import pytest
import torch

from fastattn import backends
from tests.hard_outputs_problems import (
    F64, SHAPES, gradients_of_outputs, low_precision_error, outputs_and_gradients, problem, reference,
)

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_and_gradients_match_the_reference_in_float64(shape):
    weights, index, values = problem(shape)
    grads = gradients_of_outputs(weights, index, values)
    ours = outputs_and_gradients(torch.ops.fastattn.hard_attention_outputs, weights, index, values, *grads)
    expected = outputs_and_gradients(reference, weights, index, values, *grads)
    for name, got, want in zip(("context", "log_prob", "grad_weights", "grad_values"), ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)
    if shape[1] > 1:  # the special rows are there and say what the rules say
        assert ours[0][0, 0, 0].isnan() and (ours[0][0, 0, 1:] == 0).all()
        assert ours[1][0, 0] == 0 and (ours[2][0, 0] == 0).all()
        assert ours[0][-1, -1].isnan().all() and ours[1][-1, -1].isnan()
        assert ours[1][0, 1] < -100  # log of the smallest normal float64, less the row's log-sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_low_precision_errs_at_most_twice_the_reference_in_that_dtype(shape, dtype):
    """Inputs rounded to dtype; the float64 reference on them is the truth."""
    weights, index, values = (t.to(dtype) if t.is_floating_point() else t for t in problem(shape))
    grads = [g.to(dtype) for g in gradients_of_outputs(weights, index, values)]
    truth = outputs_and_gradients(reference, weights.double(), index, values.double(), *(g.double() for g in grads))
    ours = outputs_and_gradients(torch.ops.fastattn.hard_attention_outputs, weights, index, values, *grads)
    theirs = outputs_and_gradients(reference, weights, index, values, *grads)
    for name, got, own, want in zip(("context", "log_prob", "grad_weights", "grad_values"), ours, theirs, truth):
        assert got.dtype == dtype, name
        bound = 2 * low_precision_error(own, want) + torch.finfo(dtype).eps * want[want.isfinite()].abs().max().item()
        assert low_precision_error(got, want) <= bound, name


def test_weights_of_another_dtype_than_the_values_give_each_output_its_inputs_dtype():
    """Under autocast hard attention's weights are bfloat16 and its values may be float32: the
    context is in the values' dtype, the log-probability in the weights', as the reference."""
    weights, index, values = problem((3, 5, 7, 4))
    weights, values = weights.to(torch.bfloat16), values.float()
    grads = gradients_of_outputs(weights, index, values)
    grads = (grads[0].float(), grads[1].to(torch.bfloat16))
    ours = outputs_and_gradients(torch.ops.fastattn.hard_attention_outputs, weights, index, values, *grads)
    expected = outputs_and_gradients(reference, weights, index, values, *grads)
    for name, got, want in zip(("context", "log_prob", "grad_weights", "grad_values"), ours, expected):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, equal_nan=True, msg=name)


def test_each_output_alone_gives_only_its_own_gradients():
    weights, index, values = problem((2, 4, 6, 3))
    for output, wanted in ((0, "values"), (1, "weights")):
        leaves = {"weights": weights.clone().requires_grad_(), "values": values.clone().requires_grad_()}
        torch.ops.fastattn.hard_attention_outputs(leaves["weights"], index, leaves["values"])[output].sum().backward()
        assert {name for name, leaf in leaves.items() if leaf.grad is not None} == {wanted}


def test_gradcheck_and_gradgradcheck_in_float64():
    """Weights away from the clamp and from zero rows (where the reference's gradient is not
    smooth), two queries on one position."""
    generator = torch.Generator().manual_seed(3)
    weights = torch.softmax(torch.randn(2, 3, 5, dtype=F64, generator=generator), dim=-1).requires_grad_()
    values = torch.randn(2, 5, 4, dtype=F64, generator=generator).requires_grad_()
    index = torch.tensor([[4, 0, 2], [1, 3, 1]])

    def function(weights, values):
        return torch.ops.fastattn.hard_attention_outputs(weights, index, values)

    assert torch.autograd.gradcheck(function, (weights, values))
    assert torch.autograd.gradgradcheck(function, (weights, values))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    weights, index, values = problem((3, 5, 7, 4))
    weights, values = weights.nan_to_num(0.5).to(dtype), values.nan_to_num(0, 1, -1).to(dtype)
    torch.library.opcheck(torch.ops.fastattn.hard_attention_outputs.default,
                          (weights.requires_grad_(), index, values.requires_grad_()))
    grad_context, grad_log_prob = (g.to(dtype) for g in gradients_of_outputs(weights, index, values))
    backward = torch.ops.fastattn.hard_attention_outputs_backward.default
    for grads in ((grad_context, grad_log_prob), (None, grad_log_prob), (grad_context, None)):
        torch.library.opcheck(backward, (*grads, weights.detach(), index))


@pytest.mark.parametrize("position", [-1, 7])
def test_a_position_outside_the_row_is_refused_by_both_kernels(position):
    weights, index, values = problem((3, 5, 7, 4))
    index[2, 3] = position
    with pytest.raises(ValueError, match=r"hard_attention_outputs: index must hold positions in \[0, S=7\)"):
        torch.ops.fastattn.hard_attention_outputs(weights, index, values)
    with pytest.raises(ValueError, match=r"hard_attention_outputs_backward: index must hold positions in \[0, S=7\)"):
        torch.ops.fastattn.hard_attention_outputs_backward(torch.zeros(3, 5, 4, dtype=F64), None, weights, index)


def test_empty_problems():
    for shape in ((0, 5, 7, 4), (3, 0, 7, 4), (3, 5, 7, 0)):
        weights, index, values = problem(shape)
        context, log_prob = torch.ops.fastattn.hard_attention_outputs(weights, index, values)
        assert context.shape == (*shape[:2], shape[3]) and log_prob.shape == shape[:2]
    weights, index = torch.zeros(2, 3, 0, dtype=F64), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"index must hold positions in \[0, S=0\)"):  # no position to choose
        torch.ops.fastattn.hard_attention_outputs(weights, index, torch.zeros(2, 0, 4, dtype=F64))
