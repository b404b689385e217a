"""The CPU kernel of hard attention's outputs, torch.ops.fastattn.hard_attention_outputs and its
backward (csrc/cpu/hard_attention_outputs.cpp), against fastattn.reference.hard.outputs_at:
context, log-probability and their gradients over odd shapes and every dtype, with the rows
its rules single out (all zero, NaN, a chosen weight below the clamp, an infinite value in a
zero row, two queries choosing one position), weights of another dtype than the values (as
under autocast), gradcheck and gradgradcheck in float64, opcheck, and the refusals."""

import pytest
import torch

from fastattn import backends
from fastattn.reference.hard import outputs_at

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

F64 = torch.float64
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 4), (2, 9, 33, 17)]  # (N, T, S, Dv)


def problem(shape, seed=0):
    """float64 weights (N, T, S), positions (N, T) and values (N, S, Dv).  With N > 0 and
    T > 1: row (0, 0) all zero (fully masked, position 0, whose first value is infinite:
    times the row's factor 0, NaN), row (N-1, T-1) NaN, row (0, 1)'s chosen weight 0 (its log
    clamped), and queries 0 and 1 of the last batch element at one position."""
    batch, queries, source_length, value_dim = shape
    generator = torch.Generator().manual_seed(seed)
    weights = torch.softmax(3 * torch.randn(batch, queries, source_length, dtype=F64, generator=generator), dim=-1)
    index = torch.randint(0, source_length, (batch, queries), generator=generator)
    values = torch.randn(batch, source_length, value_dim, dtype=F64, generator=generator)
    if batch > 0 and queries > 1:
        weights[0, 0] = 0
        index[0, 0] = 0
        values[0, 0, :1] = float("inf")
        weights[-1, -1, 0] = float("nan")
        weights[0, 1, index[0, 1]] = 0
        index[-1, 0] = index[-1, 1]
    return weights, index, values


def outputs_and_gradients(function, weights, index, values, grad_context, grad_log_prob):
    """(context, log_prob, grad_weights, grad_values) of ``function`` (the op, or the reference
    without its index output)."""
    weights, values = weights.detach().requires_grad_(), values.detach().requires_grad_()
    context, log_prob = function(weights, index, values)
    torch.autograd.backward([context, log_prob], [grad_context, grad_log_prob])
    return context.detach(), log_prob.detach(), weights.grad, values.grad


def reference(weights, index, values):
    context, _, log_prob = outputs_at(weights, index, values)
    return context, log_prob


def gradients_of_outputs(weights, index, values):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(*index.shape, values.shape[-1], dtype=F64, generator=generator),
            torch.randn(index.shape, dtype=F64, generator=generator))


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


def _low_precision_error(got, truth):
    finite = truth.isfinite()
    assert torch.equal(got.isnan(), truth.isnan()), "NaN where the float64 reference has none, or the reverse"
    return (got.double() - truth)[finite].abs().max().item() if finite.any() else 0.0


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
        bound = 2 * _low_precision_error(own, want) + torch.finfo(dtype).eps * want[want.isfinite()].abs().max().item()
        assert _low_precision_error(got, want) <= bound, name


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
