"""fastattn.nn.Attention and AttentionDecoderCell."""

import math

import pytest
import torch

import fastattn
from fastattn.nn import Attention, AttentionDecoderCell
from tests.problems import SCORES, cpu_backends


@pytest.fixture(autouse=True)
def reference_backend():
    with fastattn.backend("reference"):
        yield


def module_for(score, query_dim=6, key_dim=5, **options):
    if score in ("dot", "scaled_dot", "cosine"):
        key_dim = query_dim
    torch.manual_seed(0)
    module = Attention(query_dim, key_dim, score=score, attn_dim=7, max_source_len=9, **options).double()
    return module, key_dim


def functional_arguments(module):
    if module.score == "additive":
        return dict(w_query=module.w_query, w_key=module.w_key, v=module.v, bias=module.bias)
    if module.score in ("general", "location"):
        return dict(weight=module.weight)
    return {}


@pytest.mark.parametrize("score", SCORES)
def test_module_matches_the_functional_call_with_its_parameters(score):
    module, key_dim = module_for(score)
    query, keys = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 8, key_dim, dtype=torch.float64)
    lengths = torch.tensor([8, 5])
    context, weights = module(query, keys, lengths=lengths)
    expected = fastattn.attention(
        query, keys, score=score, lengths=lengths, return_weights=True, **functional_arguments(module)
    )
    torch.testing.assert_close(context, expected[0])
    torch.testing.assert_close(weights, expected[1])


@pytest.mark.parametrize("score", SCORES)
def test_precomputed_cache_gives_the_same_step_outputs(score):
    module, key_dim = module_for(score)
    keys = torch.randn(3, 8, key_dim, dtype=torch.float64)
    cache = module.precompute(keys)
    for _ in range(3):
        query = torch.randn(3, 6, dtype=torch.float64)
        cached = module(query, cache=cache)
        direct = module(query, keys)
        torch.testing.assert_close(cached[0], direct[0])
        torch.testing.assert_close(cached[1], direct[1])


def test_additive_cache_holds_the_projected_keys():
    module, _ = module_for("additive")
    keys = torch.randn(2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(module.precompute(keys).projected_keys, keys @ module.w_key.T)


def test_local_p_predicts_the_center_from_the_query():
    module, _ = module_for("dot", window=2, local="p")
    query, keys = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 9, 6, dtype=torch.float64)
    lengths = torch.tensor([9, 4])
    _, weights = module(query, keys, lengths=lengths)
    center = torch.sigmoid(torch.tanh(query @ module.position_weight.T) @ module.position_v) * lengths[:, None]
    expected = fastattn.attention(query, keys, score="dot", window=2, center=center, lengths=lengths, return_weights=True)
    torch.testing.assert_close(weights, expected[1])
    weights.sum().backward()
    assert module.position_v.grad.abs().sum() > 0  # trained through the Gaussian


@pytest.mark.parametrize("single_step", [False, True])
def test_local_p_centers_do_not_depend_on_how_a_source_is_padded(single_step):
    """p_t = S sigmoid(...) with S the source's own length: padding given by lengths or
    by key_padding_mask (or both) gives the unpadded source's outputs."""
    torch.manual_seed(0)
    module = Attention(8, 8, score="dot", window=2, local="p")
    query = torch.randn(2, 8) if single_step else torch.randn(2, 3, 8)
    keys = torch.randn(2, 4, 8)
    padded = torch.cat([keys, torch.randn(2, 6, 8)], 1)
    padding = torch.arange(10).expand(2, 10) >= 4
    expected = module(query, keys)
    for masks in ({"lengths": torch.tensor([4, 4])}, {"key_padding_mask": padding},
                  {"lengths": torch.tensor([6, 10]), "key_padding_mask": padding}):
        context, weights = module(query, padded, **masks)
        torch.testing.assert_close(context, expected[0])
        torch.testing.assert_close(weights[..., :4], expected[1])
    # Padded on both sides: p_t counts from the first key (it had put the window on the padding).
    between = torch.cat([torch.randn(2, 3, 8), keys, torch.randn(2, 3, 8)], 1)
    outside = (torch.arange(10) < 3) | (torch.arange(10) >= 7)
    for masks in ({"key_padding_mask": outside.expand(2, 10)},
                  {"key_padding_mask": outside.expand(2, 10), "lengths": torch.tensor([7, 9])}):
        context, weights = module(query, between, **masks)
        torch.testing.assert_close(context, expected[0])
        torch.testing.assert_close(weights[..., 3:7], expected[1])


def test_local_p_centers_span_padding_between_keys():
    """p_t = first + S sigmoid(...) with S the span from the first key to the last."""
    torch.manual_seed(0)
    module = Attention(8, 8, score="dot", window=2, local="p").double()
    query, keys = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 10, 8, dtype=torch.float64)
    padding = torch.tensor([[True, False, True, False, False, True, True, True, True, True],
                            [False] * 9 + [True]])
    _, weights = module(query, keys, key_padding_mask=padding)
    fraction = torch.sigmoid(torch.tanh(query @ module.position_weight.T) @ module.position_v)
    center = fraction * torch.tensor([[4.0], [9.0]], dtype=torch.float64) + torch.tensor([[1.0], [0.0]])
    expected = fastattn.attention(query, keys, score="dot", window=2, center=center, key_padding_mask=padding,
                                  return_weights=True)
    torch.testing.assert_close(weights, expected[1])


@pytest.mark.parametrize("backend_name", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_p_centers_are_predicted_in_float32(backend_name, dtype):
    """p_t = S sigmoid(0) = 2900.5 for S = 5801 and a zero W_p.  Predicted in the query's
    dtype it was 2900 in float16 and 2896 in bfloat16 (positions past 2048 are 2 and 16
    apart), and the window (D = 2) took the wrong keys; now it is predicted in float32."""
    module = Attention(4, 4, score="dot", window=2, local="p").to(dtype)
    with torch.no_grad():
        module.position_weight.zero_()
    with fastattn.backend(backend_name):
        _, weights = module(torch.randn(1, 4).to(dtype), torch.randn(1, 5801, 4).to(dtype))
    assert weights[0].nonzero().flatten().tolist() == [2899, 2900, 2901, 2902]


def test_local_m_window_and_return_weights_false():
    module, _ = module_for("general", window=1)
    assert module.local == "m"
    context, weights = module(torch.randn(1, 4, 6, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64), return_weights=False)
    assert weights is None and context.shape == (1, 4, 5)


def test_parameters_are_initialised_like_linear_layers():
    module = Attention(100, 64, score="additive", attn_dim=32)
    assert module.w_query.abs().max() <= 1 / math.sqrt(100)
    assert module.w_key.abs().max() <= 1 / math.sqrt(64)
    assert module.w_query.std() > 0.2 / math.sqrt(100)


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        (dict(score="bilinear"), ValueError, "score"),
        (dict(local="q", window=1), ValueError, "local"),
        (dict(local="m"), ValueError, "window"),
        (dict(window=-1), ValueError, "window"),
        (dict(score="location"), ValueError, "max_source_len"),
        (dict(score="dot"), ValueError, "query_dim == key_dim"),
        (dict(attn_dim=0), ValueError, "attn_dim"),
    ],
)
def test_constructor_rejects_bad_arguments(arguments, error, match):
    with pytest.raises(error, match=match):
        Attention(6, 5, **arguments)


def test_forward_needs_keys_or_cache_but_not_both():
    module, _ = module_for("additive")
    keys = torch.randn(2, 4, 5, dtype=torch.float64)
    query = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="keys"):
        module(query)
    with pytest.raises(ValueError, match="cache"):
        module(query, keys, cache=module.precompute(keys))
    with pytest.raises(TypeError, match="cache"):
        module(query, cache=keys)


def test_forward_refuses_values_next_to_a_cache():
    """The cache holds the values precompute() was given (the keys by default): values
    passed beside it were silently ignored, and the context came from the keys."""
    module = Attention(4, 4, score="dot")
    query, keys, values = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="values"):
        module(query, values=values, cache=module.precompute(keys))
    cached, _ = module(query, cache=module.precompute(keys, values))
    torch.testing.assert_close(cached, module(query, keys, values)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("input_feeding", [True, False])
@pytest.mark.parametrize("score", ["additive", "general", "dot"])
def test_decoder_cell_follows_its_equations(cell, input_feeding, score):
    torch.manual_seed(0)
    decoder = AttentionDecoderCell(4, 6, 6, score=score, cell=cell, input_feeding=input_feeding).double()
    encoder_states = torch.randn(2, 5, 6, dtype=torch.float64)
    lengths = torch.tensor([5, 3])
    cache = decoder.precompute(encoder_states)
    y = torch.randn(2, 4, dtype=torch.float64)
    state = None
    for _ in range(2):
        previous = state or decoder.initial_state(2, y)
        output, state, weights = decoder(y, state, cache, lengths=lengths)
        attend_with = state.hidden if input_feeding else previous.hidden
        context, expected_weights = decoder.attention(attend_with, encoder_states, lengths=lengths)
        fed = previous.attentional if input_feeding else context
        cell_state = previous.hidden if cell == "gru" else (previous.hidden, previous.cell)
        expected_cell = decoder.cell(torch.cat([y, fed], -1), cell_state)
        expected_hidden = expected_cell if cell == "gru" else expected_cell[0]
        torch.testing.assert_close(state.hidden, expected_hidden)
        torch.testing.assert_close(weights, expected_weights)
        torch.testing.assert_close(output, torch.tanh(decoder.combine(torch.cat([context, state.hidden], -1))))
        assert weights[1, 3:].abs().sum() == 0
    output.sum().backward()
    assert all(p.grad is not None for p in decoder.parameters())


def test_decoder_cell_rejects_bad_input():
    decoder = AttentionDecoderCell(4, 6, 6)
    cache = decoder.precompute(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="y_prev_embedded"):
        decoder(torch.randn(2, 3), None, cache)
    with pytest.raises(ValueError, match="cell"):
        AttentionDecoderCell(4, 6, 6, cell="rnn")


@pytest.mark.parametrize("max_source_len", [0, -1, "8"])
def test_max_source_len_is_checked_whatever_the_score(max_source_len):
    """It was checked only for the location score (which uses it)."""
    with pytest.raises((ValueError, TypeError), match="^max_source_len must"):
        fastattn.nn.Attention(4, 4, score="dot", max_source_len=max_source_len)
