"""Hard attention: samples follow the soft weights, argmax is deterministic, and a
seeded generator reproduces the draws."""

import pytest
import torch
from scipy import stats

import fastattn
from fastattn import backends


@pytest.fixture(autouse=True)
def reference_backend():
    with fastattn.backend("reference"):
        yield


def repeated_problem(draws=6000):
    """Two source sequences, each queried ``draws`` times with the same query."""
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(2, 1, 4, dtype=torch.float64, generator=generator).expand(2, draws, 4)
    keys = torch.randn(2, 6, 4, dtype=torch.float64, generator=generator)
    return query, keys


def test_sampling_frequencies_match_the_soft_weights():
    query, keys = repeated_problem()
    lengths = torch.tensor([6, 4])
    _, index, _, weights = fastattn.hard_attention(
        query, keys, lengths=lengths, generator=torch.Generator().manual_seed(0)
    )
    for row in range(2):
        valid = int(lengths[row])
        observed = torch.bincount(index[row], minlength=6).double()
        assert observed[valid:].sum() == 0, "sampled a masked position"
        expected = weights[row, 0, :valid] * index.shape[1]
        statistic, p_value = stats.chisquare(observed[:valid].numpy(), expected.numpy())
        assert p_value > 1e-3, f"row {row}: chi-square {statistic:.1f}, p = {p_value:.2g}"


def test_a_biased_sampler_would_fail_the_frequency_check():
    """The check above has power: uniform draws are rejected for the same weights."""
    query, keys = repeated_problem()
    _, _, _, weights = fastattn.hard_attention(query, keys, sample=False)
    uniform = torch.randint(0, 6, (query.shape[1],), generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(uniform, minlength=6).double()
    _, p_value = stats.chisquare(observed.numpy(), (weights[0, 0] * query.shape[1]).numpy())
    assert p_value < 1e-3


def test_the_same_seed_draws_the_same_positions():
    query, keys = repeated_problem(draws=50)
    first = fastattn.hard_attention(query, keys, generator=torch.Generator().manual_seed(5))[1]
    second = fastattn.hard_attention(query, keys, generator=torch.Generator().manual_seed(5))[1]
    other = fastattn.hard_attention(query, keys, generator=torch.Generator().manual_seed(6))[1]
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_argmax_mode_is_deterministic_and_returns_the_value_there():
    query, keys = repeated_problem(draws=3)
    values = torch.randn(2, 6, 5, dtype=torch.float64)
    context, index, log_prob, weights = fastattn.hard_attention(query, keys, values, sample=False)
    assert torch.equal(index, weights.argmax(-1))
    assert torch.equal(index, fastattn.hard_attention(query, keys, values, sample=False)[1])
    torch.testing.assert_close(context, values.gather(1, index[..., None].expand(2, 3, 5)))
    torch.testing.assert_close(log_prob, weights.max(-1).values.log())


def test_fully_masked_rows_give_index_zero_and_zero_outputs():
    query, keys = repeated_problem(draws=2)
    context, index, log_prob, weights = fastattn.hard_attention(query, keys, lengths=torch.tensor([0, 3]))
    assert torch.equal(index[0], torch.zeros(2, dtype=torch.int64))
    assert torch.equal(context[0], torch.zeros_like(context[0]))
    assert torch.equal(log_prob[0], torch.zeros_like(log_prob[0]))
    assert (index[1] < 3).all()


def test_gaussian_local_p_samples_from_the_renormalised_weights():
    query = torch.zeros(1, 4000, 2, dtype=torch.float64)
    keys = torch.zeros(1, 5, 2, dtype=torch.float64)
    center = torch.full((1, 4000), 2.0, dtype=torch.float64)
    _, index, log_prob, weights = fastattn.hard_attention(
        query, keys, window=2, center=center, generator=torch.Generator().manual_seed(1)
    )
    probabilities = weights[0, 0] / weights[0, 0].sum()
    observed = torch.bincount(index[0], minlength=5).double()
    _, p_value = stats.chisquare(observed.numpy(), (probabilities * 4000).numpy())
    assert p_value > 1e-3
    torch.testing.assert_close(log_prob[0], probabilities[index[0]].log())


@pytest.mark.parametrize("backend_name", [name for name in ("reference", "cpu", "triton")
                                          if backends.unavailable_reason(name) is None])
@pytest.mark.parametrize("sample", [False, True])
def test_a_nan_row_gives_nan_outputs_not_masked_ones(backend_name, sample):
    """A NaN in what a row sees made its context and log-probability 0, as a fully masked
    row's, while its weights were NaN: a REINFORCE loss dropped it silently."""
    dtype = torch.float32 if backend_name == "triton" else torch.float64  # Triton runs float64 on the reference
    query, keys = (tensor.to(dtype) for tensor in repeated_problem(draws=3))
    query = query.clone()  # writable: repeated_problem's query is one row expanded
    query[0, 1, 0] = float("nan")
    values = torch.randn(2, 6, 5, dtype=dtype)
    with fastattn.backend(backend_name):
        context, index, log_prob, weights = fastattn.hard_attention(
            query, keys, values, sample=sample, lengths=torch.tensor([6, 0]), generator=torch.Generator().manual_seed(0)
        )
    assert weights[0, 1].isnan().all() and context[0, 1].isnan().all() and log_prob[0, 1].isnan()
    assert not context[0, ::2].isnan().any() and not log_prob[0, ::2].isnan().any()
    assert torch.equal(context[1], torch.zeros_like(context[1])) and torch.equal(log_prob[1], torch.zeros_like(log_prob[1]))
    assert ((index >= 0) & (index < 6)).all()


@pytest.mark.parametrize("backend_name", [name for name in ("cpu", "triton") if backends.unavailable_reason(name) is None])
def test_the_kernels_backward_does_not_keep_the_values_alive(backend_name):
    """The fused call that gives the soft weights reads no values, but it got a zero-width
    view of them, which its backward saved: the whole (N, S, Dv) values (for float16 /
    bfloat16 on the CPU, their float32 copy) lived as long as the graph."""
    query, keys = (torch.randn(2, *shape, requires_grad=True) for shape in ((3, 4), (6, 4)))
    values = torch.randn(2, 6, 64) * 2  # an intermediate, as a projection of the keys would be
    storages = set()

    def pack(tensor):
        storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    with fastattn.backend(backend_name), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fastattn.hard_attention(query, keys, values, sample=False)
    assert values.untyped_storage().data_ptr() not in storages
