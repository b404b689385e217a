"""Shapes the public functions accept: leading batch dimensions, single decoder steps,
spatial key grids, and the torch.nn.functional.scaled_dot_product_attention drop-in."""

import numpy as np
import pytest
import torch

import fastattn
from tests.problems import SCORES, cpu_backends, key_dim_for, score_parameters


@pytest.fixture(autouse=True)
def reference_backend():
    with fastattn.backend("reference"):
        yield


@pytest.mark.parametrize("score", SCORES)
def test_leading_dimensions_are_independent_batches(score):
    generator = torch.Generator().manual_seed(0)
    query_dim, key_dim = 4, key_dim_for(score, 4, 3)
    parameters = score_parameters(score, query_dim, key_dim, generator=generator)
    query = torch.randn(2, 3, 5, query_dim, dtype=torch.float64, generator=generator)
    keys = torch.randn(2, 3, 7, key_dim, dtype=torch.float64, generator=generator)
    values = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=generator)
    lengths = torch.tensor([4, 7])  # (B,) broadcast over the head dimension
    context, weights = fastattn.attention(
        query, keys, values, score=score, lengths=lengths, return_weights=True, **parameters
    )
    assert context.shape == (2, 3, 5, 6) and weights.shape == (2, 3, 5, 7)
    for b in range(2):
        for h in range(3):
            one_context, one_weights = fastattn.attention(
                query[b, h], keys[b, h, : lengths[b]], values[b, h, : lengths[b]],
                score=score, return_weights=True, **parameters,
            )
            torch.testing.assert_close(context[b, h], one_context)
            torch.testing.assert_close(weights[b, h, :, : lengths[b]], one_weights)


@pytest.mark.parametrize("score", SCORES)
def test_single_decoder_step_drops_the_time_dimension(score):
    query_dim, key_dim = 4, key_dim_for(score, 4, 5)
    parameters = score_parameters(score, query_dim, key_dim)
    query = torch.randn(3, query_dim, dtype=torch.float64)
    keys = torch.randn(3, 6, key_dim, dtype=torch.float64)
    context, weights = fastattn.attention(query, keys, score=score, return_weights=True, **parameters)
    step_context, step_weights = fastattn.attention(
        query[:, None], keys, score=score, return_weights=True, **parameters
    )
    assert context.shape == (3, key_dim) and weights.shape == (3, 6)
    torch.testing.assert_close(context, step_context[:, 0])
    torch.testing.assert_close(weights, step_weights[:, 0])


def test_spatial_keys_return_weights_on_the_grid():
    query = torch.randn(2, 3, 4, dtype=torch.float64)
    grid = torch.randn(2, 5, 7, 4, dtype=torch.float64)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, :, 3:] = True
    context, weights = fastattn.attention(query, grid, key_padding_mask=mask, return_weights=True)
    flat_context, flat_weights = fastattn.attention(
        query, grid.reshape(2, 35, 4), key_padding_mask=mask.reshape(2, 35), return_weights=True
    )
    assert weights.shape == (2, 3, 5, 7)
    torch.testing.assert_close(context, flat_context)
    torch.testing.assert_close(weights.reshape(2, 3, 35), flat_weights)
    assert weights[1, :, :, 3:].abs().sum() == 0


def test_single_step_over_a_grid():
    context, weights = fastattn.attention(
        torch.randn(2, 4), torch.randn(2, 3, 5, 4), return_weights=True
    )
    assert context.shape == (2, 4) and weights.shape == (2, 3, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "mask_kind", ["none", "bool", "float", "causal", "causal_rectangular", "scale"]
)
def test_scaled_dot_product_attention_matches_torch(mask_kind, dtype):
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 3, 5, 8, dtype=dtype, generator=generator)
    source_length = 7 if mask_kind == "causal_rectangular" else 5
    key = torch.randn(2, 3, source_length, 8, dtype=dtype, generator=generator)
    value = torch.randn(2, 3, source_length, 6, dtype=dtype, generator=generator)
    arguments = {}
    if mask_kind == "bool":
        mask = torch.rand(5, source_length, generator=generator) > 0.3
        mask[:, 0] = True  # no fully masked row: torch returns NaN there
        arguments["attn_mask"] = mask
    if mask_kind == "float":
        arguments["attn_mask"] = torch.randn(3, 5, source_length, dtype=dtype, generator=generator)
    if mask_kind.startswith("causal"):
        arguments["is_causal"] = True
    if mask_kind == "scale":
        arguments["scale"] = 0.3
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, **arguments)
    actual = fastattn.scaled_dot_product_attention(query, key, value, **arguments)
    torch.testing.assert_close(actual, expected)


def test_scaled_dot_product_attention_fully_masked_row_is_zero_not_nan():
    query, key, value = torch.randn(1, 2, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 5)
    mask = torch.tensor([[False, False, False], [True, False, True]])
    output = fastattn.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    assert torch.equal(output[0, 0], torch.zeros(5))
    expected = torch.nn.functional.scaled_dot_product_attention(query[:, 1:], key, value, attn_mask=mask[1:])
    torch.testing.assert_close(output[:, 1:], expected)


def test_scaled_dot_product_attention_dropout_follows_the_generator_state():
    query, key, value = torch.randn(2, 4, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    torch.manual_seed(3)
    first = fastattn.scaled_dot_product_attention(query, key, value, dropout_p=0.5)
    torch.manual_seed(3)
    second = fastattn.scaled_dot_product_attention(query, key, value, dropout_p=0.5)
    assert torch.equal(first, second)
    assert not torch.allclose(first, fastattn.scaled_dot_product_attention(query, key, value))


def test_scaled_dot_product_attention_takes_dropout_p_1_and_numpy_scales_as_torch():
    """Both were refused (ValueError, TypeError) where torch computes."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, n, 8, generator=generator) for n in (4, 6, 6))
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(query, key, value, dropout_p=1.0),
                               torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=1.0))
    for scale in (np.float32(0.3), np.float64(-2.0)):
        torch.testing.assert_close(fastattn.scaled_dot_product_attention(query, key, value, scale=scale),
                                   torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale))


@pytest.mark.parametrize("backend_name", cpu_backends())
def test_numpy_integer_windows_and_sizes_are_taken_as_ints(backend_name):
    """A window read from a NumPy array was refused ("window must be an int, got int64")."""
    generator = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 3, 8, generator=generator), torch.randn(2, 7, 8, generator=generator)
    center = torch.rand(2, 3, generator=generator) * 7
    with fastattn.backend(backend_name):
        for window in (np.int64(1), np.int32(2), np.uint8(3)):
            for local_p in ({}, {"center": center}):
                torch.testing.assert_close(fastattn.attention(query, keys, window=window, **local_p),
                                           fastattn.attention(query, keys, window=int(window), **local_p))
        module = fastattn.nn.Attention(np.int64(8), np.int64(8), score="location", window=np.int64(2),
                                       max_source_len=np.int64(7))
    assert (module.window, module.key_dim, module.weight.shape) == (2, 8, (7, 8))
    assert all(type(size) is int for size in (module.window, module.value_dim, module.attn_dim))


def _backends_for_cpu_tensors():
    """The reference, the C++ kernels and Triton's (under its interpreter) where they run."""
    from fastattn import backends

    return [name for name in ("reference", "cpu", "triton") if backends.unavailable_reason(name) is None]


@pytest.mark.parametrize("backend_name", _backends_for_cpu_tensors())
def test_an_empty_batch_gives_empty_outputs_and_gradients(backend_name):
    """Batch size 0, as torch allows it: a decoder step over a key grid, heads, hard
    attention, the sdpa drop-in and a cell: empty outputs of the right shapes and empty
    gradients (the layouts fold to N = 0, which a reshape with -1 could not resolve, and
    the Triton launch divides no work into key splits)."""
    dtype = torch.float32 if backend_name == "triton" else torch.float64  # Triton runs float64 on the reference

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    calls = {
        "step over a grid": lambda: fastattn.attention(leaf(0, 4), leaf(0, 2, 3, 4), return_weights=True),
        "heads": lambda: fastattn.attention(leaf(2, 0, 3, 4), leaf(2, 0, 5, 4), leaf(2, 0, 5, 6), return_weights=True),
        "hard": lambda: fastattn.hard_attention(leaf(0, 3, 4), leaf(0, 5, 4)),
        "sdpa": lambda: (fastattn.scaled_dot_product_attention(leaf(0, 3, 4), leaf(0, 5, 4), leaf(0, 5, 2)),),
        "gru_cell": lambda: (fastattn.gru_cell(leaf(0, 4), leaf(0, 3), leaf(9, 4), leaf(9, 3)),),
    }
    expected = {
        "step over a grid": [(0, 4), (0, 2, 3)],
        "heads": [(2, 0, 3, 6), (2, 0, 3, 5)],
        "hard": [(0, 3, 4), (0, 3), (0, 3), (0, 3, 5)],
        "sdpa": [(0, 3, 2)],
        "gru_cell": [(0, 3)],
    }
    with fastattn.backend(backend_name):
        for name, call in calls.items():
            outputs = call()
            assert [tuple(output.shape) for output in outputs] == expected[name], name
            floating = [output for output in outputs if output.is_floating_point()]
            sum(output.sum() for output in floating).backward()
