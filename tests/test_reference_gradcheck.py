"""fp64 gradcheck of every score in every mode, on small odd shapes."""

import pytest
import torch

import fastattn
from tests.problems import SCORES, key_dim_for, score_parameters

MODES = {
    "global": {},
    "lengths": {"lengths": torch.tensor([0, 3, 5])},
    "key_padding_mask": {"key_padding_mask": torch.tensor([[False] * 5, [True, False, True, False, False], [True] * 5])},
    "causal": {"causal": True},
    "local_m": {"window": 1},
    "local_m_gaussian": {"window": 2, "gaussian": True},
}


@pytest.fixture(autouse=True)
def reference_backend():
    with fastattn.backend("reference"):
        yield


def inputs(score, query_length=5, source_length=5):
    generator = torch.Generator().manual_seed(7)
    query_dim, key_dim = 3, key_dim_for(score, 3, 4)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()

    query, keys, values = leaf(3, query_length, query_dim), leaf(3, source_length, key_dim), leaf(3, source_length, 2)
    parameters = score_parameters(score, query_dim, key_dim, max_source_len=6, generator=generator, requires_grad=True)
    return query, keys, values, parameters


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("score", SCORES)
def test_gradients_of_context_and_weights(score, mode):
    query, keys, values, parameters = inputs(score)
    names = list(parameters)

    def function(query, keys, values, *parameter_values):
        return fastattn.attention(
            query, keys, values, score=score, return_weights=True,
            **dict(zip(names, parameter_values)), **MODES[mode],
        )

    assert torch.autograd.gradcheck(function, (query, keys, values, *parameters.values()), fast_mode=True)


@pytest.mark.parametrize("score", SCORES)
def test_gradients_of_local_p_reach_the_center(score):
    query, keys, values, parameters = inputs(score, query_length=2)
    center = torch.tensor([[0.7, 3.2]] * 3, dtype=torch.float64, requires_grad=True)
    names = list(parameters)

    def function(query, keys, values, center, *parameter_values):
        return fastattn.attention(
            query, keys, values, score=score, window=2, center=center, return_weights=True,
            **dict(zip(names, parameter_values)),
        )

    assert torch.autograd.gradcheck(function, (query, keys, values, center, *parameters.values()), fast_mode=True)


def test_gradients_over_a_spatial_grid():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    grid = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, g: fastattn.attention(q, g, score="dot", return_weights=True), (query, grid)
    )


def test_gradients_of_additive_attention_on_projections():
    query, keys, values, parameters = inputs("additive")
    q_proj, k_proj = query @ parameters["w_query"].T, keys @ parameters["w_key"].T
    assert torch.autograd.gradcheck(
        lambda q, k, v, val, b: fastattn.additive_attention(
            q, k, v, val, bias=b, lengths=torch.tensor([1, 0, 5]), return_weights=True
        ),
        (q_proj, k_proj, parameters["v"], values, parameters["bias"]),
    )


def test_gradients_of_hard_attention_context_and_log_prob():
    query, keys, values, _ = inputs("dot")

    def function(query, keys, values):
        context, _, log_prob, _ = fastattn.hard_attention(
            query, keys, values, score="dot", sample=False, lengths=torch.tensor([2, 0, 5])
        )
        return context, log_prob

    assert torch.autograd.gradcheck(function, (query, keys, values))


def test_gradients_of_scaled_dot_product_attention_with_a_float_mask():
    query, keys, values, _ = inputs("dot")
    mask = torch.randn(5, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        (query, keys, values),
    )
