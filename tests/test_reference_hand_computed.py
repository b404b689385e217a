"""The specification checked against numbers worked out by hand (math.exp, math.tanh),
one case per score and per mask mode, so that the reference itself is tested."""

import math

import pytest
import torch

import fastattn

QUERY = torch.tensor([[1.0, 2.0]], dtype=torch.float64)  # s, T = 1
KEYS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # h_1..h_3
VALUES = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def softmax(scores):
    exps = [math.exp(e) for e in scores]
    return [x / sum(exps) for x in exps]


def run(score, **arguments):
    with fastattn.backend("reference"):
        return fastattn.attention(QUERY, KEYS, VALUES, score=score, return_weights=True, **arguments)


@pytest.mark.parametrize(
    "score, arguments, expected_scores",
    [
        ("dot", {}, [1.0, 2.0, 3.0]),
        ("scaled_dot", {}, [1 / math.sqrt(2), 2 / math.sqrt(2), 3 / math.sqrt(2)]),
        ("scaled_dot", {"scale": 0.5}, [0.5, 1.0, 1.5]),
        # s^T W_a = [1, 4]
        ("general", {"weight": torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)}, [1.0, 4.0, 5.0]),
        (
            "additive",
            {
                "w_query": torch.eye(2, dtype=torch.float64),
                "w_key": torch.eye(2, dtype=torch.float64),
                "v": torch.tensor([1.0, -1.0], dtype=torch.float64),
                "bias": torch.tensor([0.5, 0.0], dtype=torch.float64),
            },
            [
                math.tanh(1 + 1 + 0.5) - math.tanh(2 + 0),
                math.tanh(1 + 0 + 0.5) - math.tanh(2 + 1),
                math.tanh(1 + 1 + 0.5) - math.tanh(2 + 1),
            ],
        ),
        ("cosine", {}, [1 / math.sqrt(5), 2 / math.sqrt(5), 3 / (math.sqrt(5) * math.sqrt(2))]),
        ("cosine", {"scale": 10.0}, [10 / math.sqrt(5), 20 / math.sqrt(5), 30 / (math.sqrt(5) * math.sqrt(2))]),
        # (W_a s)_j with rows [1,0], [0,1], [1,1] (and an unused 4th row, S_max = 4)
        (
            "location",
            {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]], dtype=torch.float64)},
            [1.0, 2.0, 3.0],
        ),
    ],
)
def test_each_score_matches_the_hand_computed_softmax(score, arguments, expected_scores):
    context, weights = run(score, **arguments)
    expected = torch.tensor([softmax(expected_scores)], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(context, expected @ VALUES, rtol=1e-12, atol=1e-12)


def test_lengths_keep_the_first_keys_only():
    _, weights = run("dot", lengths=torch.tensor(2))
    torch.testing.assert_close(weights, torch.tensor([softmax([1.0, 2.0]) + [0.0]], dtype=torch.float64))


def test_key_padding_mask_true_means_padding():
    _, weights = run("dot", key_padding_mask=torch.tensor([False, True, False]))
    a, c = softmax([1.0, 3.0])
    torch.testing.assert_close(weights, torch.tensor([[a, 0.0, c]], dtype=torch.float64))


def test_causal_query_t_sees_keys_up_to_t():
    zeros = torch.zeros(3, 2, dtype=torch.float64)
    with fastattn.backend("reference"):
        _, weights = fastattn.attention(zeros, zeros, VALUES, score="dot", causal=True, return_weights=True)
    expected = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))


def test_local_m_window_is_clipped_to_the_sequence():
    zeros = torch.zeros(4, 2, dtype=torch.float64)  # equal scores: uniform over the window
    with fastattn.backend("reference"):
        _, weights = fastattn.attention(zeros, zeros, score="dot", window=1, return_weights=True)
    expected = [
        [1 / 2, 1 / 2, 0, 0],  # p = 0: j in [-1, 1] clipped to {0, 1}
        [1 / 3, 1 / 3, 1 / 3, 0],
        [0, 1 / 3, 1 / 3, 1 / 3],
        [0, 0, 1 / 2, 1 / 2],
    ]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))


def test_local_p_gaussian_multiplies_after_the_softmax_without_renormalising():
    query = torch.zeros(1, 1, 2, dtype=torch.float64)
    keys = torch.zeros(1, 4, 2, dtype=torch.float64)
    center = torch.tensor([[1.5]], dtype=torch.float64)
    with fastattn.backend("reference"):
        _, weights = fastattn.attention(query, keys, score="dot", window=1, center=center, return_weights=True)
    # window [0.5, 2.5] holds j = 1, 2; softmax gives 1/2 each; sigma = 1/2 and |j - p| = 1/2
    factor = math.exp(-(0.5**2) / (2 * 0.5**2))
    torch.testing.assert_close(weights, torch.tensor([[[0.0, factor / 2, factor / 2, 0.0]]], dtype=torch.float64))


def test_gaussian_can_be_turned_off_for_local_p():
    query = torch.zeros(1, 1, 2, dtype=torch.float64)
    keys = torch.zeros(1, 4, 2, dtype=torch.float64)
    with fastattn.backend("reference"):
        _, weights = fastattn.attention(
            query, keys, score="dot", window=1, center=torch.tensor([[1.5]], dtype=torch.float64),
            gaussian=False, return_weights=True,
        )
    torch.testing.assert_close(weights, torch.tensor([[[0.0, 0.5, 0.5, 0.0]]], dtype=torch.float64))


def test_fully_masked_row_gives_zero_context_weights_and_gradients():
    query = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    with fastattn.backend("reference"):
        context, weights = fastattn.attention(
            query, keys, values, lengths=torch.tensor([0, 5]), return_weights=True
        )
    assert torch.equal(context[0], torch.zeros(3, 6, dtype=torch.float64))
    assert torch.equal(weights[0], torch.zeros(3, 5, dtype=torch.float64))
    (context.sum() + weights.sum()).backward()
    for tensor in (query, keys, values):
        assert torch.isfinite(tensor.grad).all()
        assert torch.equal(tensor.grad[0], torch.zeros_like(tensor.grad[0]))
    assert query.grad[1].abs().sum() > 0


def test_cosine_of_a_zero_key_is_zero_not_nan():
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    with fastattn.backend("reference"):
        _, weights = fastattn.attention(QUERY, keys, score="cosine", return_weights=True)
    torch.testing.assert_close(weights, torch.tensor([softmax([0.0, 1 / math.sqrt(5)])], dtype=torch.float64))
    weights[0, 1].backward()
    assert torch.isfinite(keys.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("center", [2064.0, 2064.5])
def test_low_precision_windows_are_exact_past_the_integers_of_the_dtype(dtype, center):
    """Keys past 2048 (float16) or 256 (bfloat16) have no exact index in those dtypes:
    the window [p - D, p + D] and the Gaussian factor's j - p are still exact.  Equal
    scores (a zero query) give each key of the window (7 of them, 6 around a half-integer
    centre) the same share before the factor."""
    query, keys = torch.zeros(1, 1, 2, dtype=dtype), torch.randn(1, 2100, 2).to(dtype)
    # In float32, as nn.Attention(local="p") predicts a 16-bit query's centre: 2064.5 has
    # no float16 or bfloat16 value (it rounds to 2064 in both).
    p = torch.tensor([[center]], dtype=torch.float32)
    assert p.item() == center
    with fastattn.backend("reference"):
        _, weights = fastattn.attention(query, keys, window=3, center=p, return_weights=True)
    inside = [j for j in range(2100) if p.item() - 3 <= j <= p.item() + 3]
    assert weights[0, 0].nonzero().flatten().tolist() == inside
    expected = [math.exp(-((j - p.item()) ** 2) / (2 * 1.5**2)) / len(inside) for j in inside]
    torch.testing.assert_close(weights[0, 0, inside].double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_a_local_m_window_of_the_largest_int64_keeps_every_key():
    """The reference op (torch.ops.fastattn.attention_reference, reachable directly)
    takes any int64 window: p + D overflowed to negative and masked every key past p."""
    generator = torch.Generator().manual_seed(0)
    query, keys = torch.randn(1, 4, 3, generator=generator), torch.randn(1, 6, 3, generator=generator)
    masking = dict(lengths=None, key_padding_mask=None, causal=False, center=None, gaussian=False, return_weights=True)
    windowed, unwindowed = (
        fastattn.reference.attention(query, keys, keys, score="dot", weight=None, w_query=None, w_key=None, v=None,
                                     bias=None, scale=None, window=window, **masking)
        for window in (2**63 - 1, None)
    )
    torch.testing.assert_close(windowed, unwindowed)
