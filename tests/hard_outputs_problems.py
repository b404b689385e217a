"""Problems for the tests of hard attention's outputs at chosen positions (the CPU op,
tests/test_cpu_hard_attention_outputs.py, and the Triton ops, tests/test_triton_hard_attention.py):
weights, positions and values with the rows the rules single out, and the reference's
outputs and gradients."""

import torch

from fastattn.reference.hard import outputs_at

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


def low_precision_error(got, truth):
    """The largest error of ``got`` where the float64 ``truth`` is finite, after asserting that
    both have NaN in the same places."""
    finite = truth.isfinite()
    assert torch.equal(got.isnan(), truth.isnan()), "NaN where the float64 reference has none, or the reverse"
    return (got.double() - truth)[finite].abs().max().item() if finite.any() else 0.0
