"""Property tests of the public attention functions (API.md section 1), in float64.

Hypothesis draws random problems: every score, odd sizes and sizes of 1, an
optional head dimension, single decoder steps (2-D queries), spatial (B, H, W, D)
keys, random ``lengths`` (0 included: fully masked rows), random key padding masks
(all-True rows included), causal masks, local-m and local-p windows with and
without the Gaussian factor.  The expected validity of each (t, j) pair and the
expected scores are computed here from the caller's shapes, independently of
``fastattn.functional.attention_inputs`` and ``fastattn.reference``.

Every test runs once per name in ``BACKENDS`` inside ``with fastattn.backend(name)``,
so a new backend is checked by adding its name there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from tests.problems import SCORES, cpu_backends, key_dim_for, score_parameters

BACKENDS = cpu_backends()
DTYPE = torch.float64
LAYOUTS = ("sequence", "step", "spatial", "step_spatial")

backends = pytest.mark.parametrize("backend_name", BACKENDS)


@dataclass
class Problem:
    """One call of ``fastattn.attention``, with what the caller's shapes mean."""

    score: str
    lead: tuple[int, ...]  # leading batch dimensions of the query
    single_step: bool  # query (B, Dq): no T dimension in the outputs
    grid: tuple[int, int] | None  # (H, W) of spatial keys
    query_length: int
    source_length: int
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor | None
    parameters: dict = field(default_factory=dict)  # score parameters and scale
    masking: dict = field(default_factory=dict)  # lengths, key_padding_mask, causal, window, center, gaussian

    @property
    def value_dim(self) -> int:
        return (self.keys if self.values is None else self.values).shape[-1]

    @property
    def gaussian(self) -> bool:
        gaussian = self.masking.get("gaussian")
        return self.masking.get("center") is not None if gaussian is None else gaussian

    def arguments(self) -> dict:
        return {"score": self.score, **self.parameters, **self.masking}

    def call(self, function=None, **overrides):
        function = fastattn.attention if function is None else function
        return function(self.query, self.keys, self.values, **{**self.arguments(), **overrides})

    # ---- expected results, in the expanded layout (*lead, T, ...) ----

    def context_shape(self) -> tuple[int, ...]:
        time = () if self.single_step else (self.query_length,)
        return (*self.lead, *time, self.value_dim)

    def weights_shape(self) -> tuple[int, ...]:
        time = () if self.single_step else (self.query_length,)
        source = self.grid if self.grid is not None else (self.source_length,)
        return (*self.lead, *time, *source)

    def expand_context(self, context: torch.Tensor) -> torch.Tensor:
        """(..., [T,] Dv) -> (*lead, T, Dv)."""
        return context.unsqueeze(-2) if self.single_step else context

    def expand_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """(..., [T,] S) or (..., [T,] H, W) -> (*lead, T, S)."""
        if self.grid is not None:
            weights = weights.flatten(-2)
        return weights.unsqueeze(-2) if self.single_step else weights

    def expand_per_query(self, x: torch.Tensor) -> torch.Tensor:
        """(..., [T]) -> (*lead, T)."""
        return x.unsqueeze(-1) if self.single_step else x

    def sequence_query(self, query=None) -> torch.Tensor:
        query = self.query if query is None else query
        return query.unsqueeze(-2) if self.single_step else query

    def flat_keys(self, keys=None) -> torch.Tensor:
        keys = self.keys if keys is None else keys
        return keys.flatten(-3, -2) if self.grid is not None else keys

    def flat_values(self) -> torch.Tensor:
        return self.flat_keys(self.keys if self.values is None else self.values)

    def centers(self) -> torch.Tensor:
        """p_t, (*lead, T) float64: the given centers (local-p) or t (local-m)."""
        center = self.masking.get("center")
        if center is None:
            return torch.arange(self.query_length, dtype=DTYPE).expand(*self.lead, self.query_length)
        center = center.detach().to(DTYPE)
        if self.single_step:
            center = center.unsqueeze(-1)
        return _broadcast_prefix(center, self.lead, 1)

    def valid(self) -> torch.Tensor:
        """(*lead, T, S) bool: True where query t may attend to key j."""
        t = torch.arange(self.query_length)
        j = torch.arange(self.source_length)
        valid = torch.ones(*self.lead, self.query_length, self.source_length, dtype=torch.bool)
        lengths = self.masking.get("lengths")
        if lengths is not None:
            valid &= j < _broadcast_prefix(lengths.to(torch.int64), self.lead, 0)[..., None, None]
        padding = self.masking.get("key_padding_mask")
        if padding is not None:
            if self.grid is not None and tuple(padding.shape[-2:]) == self.grid:
                padding = padding.flatten(-2)
            valid &= ~_broadcast_prefix(padding, self.lead, 1)[..., None, :]
        if self.masking.get("causal"):
            valid &= j <= t[:, None]
        window = self.masking.get("window")
        if window is not None:
            p = self.centers()[..., None]
            valid &= (j >= p - window) & (j <= p + window)
        return valid

    def scores(self, query=None, keys=None, parameters=None) -> torch.Tensor:
        """e_{t,j} of the score, (*lead, T, S), written from the table of API.md."""
        s = self.sequence_query(query)
        h = self.flat_keys(keys)
        p = self.parameters if parameters is None else parameters
        if self.score == "dot":
            return torch.einsum("...td,...sd->...ts", s, h)
        if self.score == "scaled_dot":
            scale = 1 / math.sqrt(h.shape[-1]) if p.get("scale") is None else p["scale"]
            return torch.einsum("...td,...sd->...ts", s, h) * scale
        if self.score == "general":
            return torch.einsum("...td,de,...se->...ts", s, p["weight"], h)
        if self.score == "additive":
            projected_query = torch.einsum("ad,...td->...ta", p["w_query"], s)
            projected_keys = torch.einsum("ad,...sd->...sa", p["w_key"], h)
            summed = projected_query[..., :, None, :] + projected_keys[..., None, :, :] + p["bias"]
            return torch.einsum("...tsa,a->...ts", torch.tanh(summed), p["v"])
        if self.score == "cosine":
            scale = 1.0 if p.get("scale") is None else p["scale"]
            # a zero vector has cosine 0 with everything
            unit_s = torch.nan_to_num(s / s.norm(dim=-1, keepdim=True))
            unit_h = torch.nan_to_num(h / h.norm(dim=-1, keepdim=True))
            return scale * torch.einsum("...td,...sd->...ts", unit_s, unit_h)
        if self.score == "location":
            return torch.einsum("...td,jd->...tj", s, p["weight"][: self.source_length])
        raise AssertionError(self.score)

    def gaussian_factor(self) -> torch.Tensor:
        """exp(-(j - p_t)^2 / (2 sigma^2)), sigma = window / 2, (*lead, T, S)."""
        j = torch.arange(self.source_length, dtype=DTYPE)
        sigma = self.masking["window"] / 2
        return torch.exp(-((j - self.centers()[..., None]) ** 2) / (2 * sigma**2))

    def expected_weights(self) -> torch.Tensor:
        valid = self.valid()
        scores = self.scores().masked_fill(~valid, -math.inf)
        has_valid = valid.any(-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(~has_valid, 0.0), dim=-1).masked_fill(~valid, 0.0)
        return weights * self.gaussian_factor() if self.gaussian else weights


def _broadcast_prefix(x: torch.Tensor, lead: tuple[int, ...], trailing: int) -> torch.Tensor:
    """A tensor of shape prefix-of-lead + trailing dims, broadcast to lead + trailing."""
    prefix = x.dim() - trailing
    shape = (*x.shape[:prefix], *([1] * (len(lead) - prefix)), *x.shape[prefix:])
    return x.reshape(shape).expand(*lead, *x.shape[prefix:])


# ---------------------------------------------------------------- strategies


def _random(generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=generator)


@st.composite
def attention_problems(
    draw,
    *,
    layouts=LAYOUTS,
    scores=SCORES,
    local_kinds=(None, "m", "p"),
    gaussian_only=False,
    with_heads=None,
) -> Problem:
    """A random problem.  ``gaussian_only`` draws local attention with the
    Gaussian factor on; ``with_heads`` forces (True) or forbids (False) a head dim."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    score = draw(st.sampled_from(scores))
    layout = draw(st.sampled_from(layouts))
    single_step = layout.startswith("step")
    batch = draw(st.integers(1, 3))
    heads = None
    if not single_step and with_heads is not False:
        heads = draw(st.integers(1, 3) if with_heads else st.none() | st.integers(1, 3))
    lead = (batch,) if heads is None else (batch, heads)
    grid = None
    if layout.endswith("spatial"):
        grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        source_length = grid[0] * grid[1]
    else:
        source_length = draw(st.integers(1, 7))
    query_length = 1 if single_step else draw(st.integers(1, 6))
    query_dim = draw(st.integers(1, 6))
    key_dim = key_dim_for(score, query_dim, draw(st.integers(1, 6)))
    source_shape = grid if grid is not None else (source_length,)
    query = _random(generator, *lead, query_dim) if single_step else _random(generator, *lead, query_length, query_dim)
    keys = _random(generator, *lead, *source_shape, key_dim)
    values = _random(generator, *lead, *source_shape, draw(st.integers(1, 6))) if draw(st.booleans()) else None
    if draw(st.integers(0, 3)) == 0:  # zero vectors: cosine has no direction to use
        query.view(-1, query_dim)[0] = 0
        keys.view(-1, key_dim)[-1] = 0

    parameters = score_parameters(
        score, query_dim, key_dim, attention_dim=draw(st.integers(1, 4)), max_source_len=9, generator=generator
    )
    if score in ("scaled_dot", "cosine") and draw(st.booleans()):
        parameters["scale"] = draw(st.floats(-3.0, 3.0, allow_nan=False))

    masking = {}

    def mask_lead():
        """(B,) or the whole of lead: masks may cover a prefix of the batch dims."""
        return lead[:1] if draw(st.booleans()) else lead

    if draw(st.booleans()):
        shape = mask_lead()
        masking["lengths"] = torch.tensor(
            draw(st.lists(st.integers(0, source_length), min_size=math.prod(shape), max_size=math.prod(shape)))
        ).reshape(shape)
    if draw(st.booleans()):
        shape = mask_lead()
        rows = math.prod(shape)
        kinds = draw(st.lists(st.sampled_from(["random", "all", "none"]), min_size=rows, max_size=rows))
        padding = torch.rand(rows, source_length, generator=generator) < 0.4
        padding[torch.tensor([k == "all" for k in kinds])] = True
        padding[torch.tensor([k == "none" for k in kinds])] = False
        as_grid = grid is not None and draw(st.booleans())
        masking["key_padding_mask"] = padding.reshape(*shape, *(grid if as_grid else (source_length,)))
    if query_length == source_length and draw(st.booleans()):
        masking["causal"] = True

    local = draw(st.sampled_from(tuple(k for k in local_kinds if k is not None) if gaussian_only else local_kinds))
    if local == "m":
        window = draw(st.integers(1 if gaussian_only else 0, 3))
        masking["window"] = window
        gaussian_choices = [True] if gaussian_only else [None, False] + ([True] if window >= 1 else [])
        gaussian = draw(st.sampled_from(gaussian_choices))
        if gaussian is not None:
            masking["gaussian"] = gaussian
    elif local == "p":
        masking["window"] = draw(st.integers(1, 3))
        shape = lead[:1] if single_step else (*mask_lead(), query_length)
        masking["center"] = torch.rand(*shape, dtype=DTYPE, generator=generator) * source_length
        gaussian = draw(st.sampled_from([None, True] if gaussian_only else [None, True, False]))
        if gaussian is not None:
            masking["gaussian"] = gaussian

    return Problem(score, lead, single_step, grid, query_length, source_length, query, keys, values, parameters, masking)


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_()


def _with_grad_leaves(problem: Problem) -> Problem:
    """A copy of the problem whose float tensors are fresh leaves that require grad."""
    parameters = {k: (_leaf(v) if isinstance(v, torch.Tensor) else v) for k, v in problem.parameters.items()}
    masking = dict(problem.masking)
    if masking.get("center") is not None:
        masking["center"] = _leaf(masking["center"])
    return replace(
        problem,
        query=_leaf(problem.query),
        keys=_leaf(problem.keys),
        values=_leaf(problem.values),
        parameters=parameters,
        masking=masking,
    )


def _fully_masked_rows(problem: Problem) -> torch.Tensor:
    """(*lead, T) bool."""
    return ~problem.valid().any(-1)


# ------------------------------------------------------------ soft attention


@backends
@given(problem=attention_problems())
def test_outputs_have_the_documented_shapes_and_no_nan(backend_name, problem):
    with fastattn.backend(backend_name):
        context, weights = problem.call(return_weights=True)
        context_only = problem.call()
    assert context.shape == problem.context_shape()
    assert weights.shape == problem.weights_shape()
    assert context.dtype == weights.dtype == DTYPE
    assert torch.isfinite(context).all() and torch.isfinite(weights).all()
    assert isinstance(context_only, torch.Tensor)
    torch.testing.assert_close(context_only, context)


@backends
@given(problem=attention_problems())
def test_weights_are_the_masked_softmax_of_the_score(backend_name, problem):
    with fastattn.backend(backend_name):
        context, weights = problem.call(return_weights=True)
    context, weights = problem.expand_context(context), problem.expand_weights(weights)
    valid = problem.valid()
    masked_rows = ~valid.any(-1)

    # exactly zero outside the mask and the window
    assert (weights[~valid] == 0).all(), "weight on a masked or out-of-window key"
    # fully masked rows: zero weights, zero context, exactly
    assert (weights[masked_rows] == 0).all()
    assert (context[masked_rows] == 0).all()
    # a distribution over the valid keys when there is no Gaussian factor
    if not problem.gaussian:
        sums = weights.sum(-1)[~masked_rows]
        torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (weights >= 0).all()
    # the weights of the formula in API.md, and c_t = sum_j alpha_tj v_j
    torch.testing.assert_close(weights, problem.expected_weights())
    torch.testing.assert_close(context, torch.einsum("...ts,...sd->...td", weights, problem.flat_values()))


@backends
@given(problem=attention_problems())
def test_gradients_are_finite_and_zero_where_nothing_is_attended(backend_name, problem):
    problem = _with_grad_leaves(problem)
    with fastattn.backend(backend_name):
        context, weights = problem.call(return_weights=True)
    generator = torch.Generator().manual_seed(0)
    loss = context.sum() + weights.sum()
    loss = loss + (context * torch.randn(context.shape, dtype=DTYPE, generator=generator)).sum()
    loss = loss + (weights * torch.randn(weights.shape, dtype=DTYPE, generator=generator)).sum()
    loss.backward()

    leaves = {"query": problem.query, "keys": problem.keys, "values": problem.values}
    leaves.update({k: v for k, v in problem.parameters.items() if isinstance(v, torch.Tensor)})
    leaves["center"] = problem.masking.get("center")
    for name, leaf in leaves.items():
        if leaf is not None and leaf.grad is not None:
            assert torch.isfinite(leaf.grad).all(), f"non-finite gradient for {name}"
    assert problem.query.grad is not None

    valid = problem.valid()
    masked_rows = ~valid.any(-1)
    query_grad = problem.sequence_query(problem.query.grad)
    assert (query_grad[masked_rows] == 0).all(), "fully masked query rows must get zero gradient"
    # keys and values that no query may attend get no gradient either
    never_attended = ~valid.any(-2)  # (*lead, S)
    for leaf in (problem.keys, problem.values):
        if leaf is not None and leaf.grad is not None:
            assert (problem.flat_keys(leaf.grad)[never_attended] == 0).all()


@backends
@given(problem=attention_problems(gaussian_only=True))
def test_the_gaussian_factor_multiplies_the_softmax_without_renormalising(backend_name, problem):
    assert problem.gaussian
    with fastattn.backend(backend_name):
        context, weights = problem.call(return_weights=True)
        plain_context, plain_weights = problem.call(return_weights=True, gaussian=False)
    weights, plain_weights = problem.expand_weights(weights), problem.expand_weights(plain_weights)
    torch.testing.assert_close(weights, plain_weights * problem.gaussian_factor())
    torch.testing.assert_close(
        problem.expand_context(context), torch.einsum("...ts,...sd->...td", weights, problem.flat_values())
    )
    # the Gaussian-off weights still sum to one over the window
    has_valid = problem.valid().any(-1)
    sums = plain_weights.sum(-1)[has_valid]
    torch.testing.assert_close(sums, torch.ones_like(sums))


@backends
@given(problem=attention_problems(layouts=("sequence", "spatial"), with_heads=True))
def test_batch_prefix_masks_broadcast_over_the_heads(backend_name, problem):
    """lengths (B,), key_padding_mask (B, S) and center (B, T) for a (B, heads, T, D)
    query equal the same tensors expanded to (B, heads, ...)."""
    batch, heads = problem.lead
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, problem.source_length + 1, (batch,), generator=generator)
    padding = torch.rand(batch, problem.source_length, generator=generator) < 0.3
    masking = {k: v for k, v in problem.masking.items() if k not in ("lengths", "key_padding_mask")}
    if "center" in masking:
        masking["center"] = torch.rand(batch, problem.query_length, dtype=DTYPE, generator=generator) * problem.source_length
    expanded = dict(masking)
    if "center" in masking:
        expanded["center"] = masking["center"][:, None].expand(batch, heads, problem.query_length)
    with fastattn.backend(backend_name):
        by_prefix = problem.call(return_weights=True, **masking, lengths=lengths, key_padding_mask=padding)
        by_full = problem.call(
            return_weights=True,
            **expanded,
            lengths=lengths[:, None].expand(batch, heads),
            key_padding_mask=padding[:, None].expand(batch, heads, problem.source_length),
        )
    torch.testing.assert_close(by_prefix, by_full, rtol=0, atol=0)
    # and the expanded lengths alone
    with fastattn.backend(backend_name):
        short = problem.call(lengths=lengths, return_weights=True)
        full = problem.call(lengths=lengths[:, None].expand(batch, heads).contiguous(), return_weights=True)
    torch.testing.assert_close(short, full, rtol=0, atol=0)


@backends
@given(problem=attention_problems(scores=("additive",)))
def test_additive_attention_on_projections_equals_attention(backend_name, problem):
    p = problem.parameters
    query_projection = problem.query @ p["w_query"].T
    key_projection = problem.keys @ p["w_key"].T
    values = problem.keys if problem.values is None else problem.values
    with fastattn.backend(backend_name):
        expected = problem.call(return_weights=True)
        got = fastattn.additive_attention(
            query_projection, key_projection, p["v"], values, bias=p["bias"], **problem.masking, return_weights=True
        )
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------ hard attention


@backends
@given(problem=attention_problems(), sample=st.booleans(), seed=st.integers(0, 2**16))
def test_hard_attention_picks_a_valid_position_and_its_value(backend_name, problem, sample, seed):
    with fastattn.backend(backend_name):
        context, index, log_prob, weights = problem.call(
            fastattn.hard_attention, sample=sample, generator=torch.Generator().manual_seed(seed)
        )
        _, soft_weights = problem.call(return_weights=True)
    time = () if problem.single_step else (problem.query_length,)
    assert context.shape == problem.context_shape()
    assert index.shape == log_prob.shape == (*problem.lead, *time)
    assert index.dtype == torch.int64
    assert weights.shape == problem.weights_shape()
    torch.testing.assert_close(weights, soft_weights)
    for tensor in (context, log_prob, weights):
        assert torch.isfinite(tensor).all()

    context, weights = problem.expand_context(context), problem.expand_weights(weights)
    index, log_prob = problem.expand_per_query(index), problem.expand_per_query(log_prob)
    valid = problem.valid()
    has_valid = valid.any(-1)
    assert ((index >= 0) & (index < problem.source_length)).all()
    assert valid.gather(-1, index.unsqueeze(-1)).squeeze(-1)[has_valid].all(), "chose a masked position"
    values = problem.flat_values()
    chosen_values = values.gather(-2, index.unsqueeze(-1).expand(*index.shape, values.shape[-1]))
    torch.testing.assert_close(context[has_valid], chosen_values[has_valid], rtol=0, atol=0)
    # fully masked rows: index 0, zero context, zero log-probability (fastattn.reference.hard)
    assert (index[~has_valid] == 0).all()
    assert (context[~has_valid] == 0).all()
    assert (log_prob[~has_valid] == 0).all()
    chosen_weights = weights.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    expected_log_prob = torch.log(chosen_weights / weights.sum(-1))
    torch.testing.assert_close(log_prob[has_valid], expected_log_prob[has_valid])
    if not sample:
        best = weights.max(-1).values
        assert (chosen_weights[has_valid] == best[has_valid]).all()
        unique_best = (weights == best.unsqueeze(-1)).sum(-1) == 1
        assert torch.equal(index[unique_best & has_valid], weights.argmax(-1)[unique_best & has_valid])


@backends
@given(problem=attention_problems())
def test_hard_attention_log_prob_gradients_are_finite(backend_name, problem):
    problem = _with_grad_leaves(problem)
    with fastattn.backend(backend_name):
        context, _, log_prob, _ = problem.call(
            fastattn.hard_attention, sample=True, generator=torch.Generator().manual_seed(0)
        )
    (log_prob.sum() + context.sum()).backward()
    assert torch.isfinite(problem.query.grad).all()
    masked_rows = _fully_masked_rows(problem)
    assert (problem.sequence_query(problem.query.grad)[masked_rows] == 0).all()
    for leaf in (problem.keys, problem.values):
        if leaf is not None and leaf.grad is not None:
            assert torch.isfinite(leaf.grad).all()


# ------------------------------------------------ scaled_dot_product_attention


@st.composite
def sdpa_problems(draw, *, allow_fully_masked=False):
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    query_length, source_length = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    embed, value_dim = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    query = _random(generator, *lead, query_length, embed)
    key = _random(generator, *lead, source_length, embed)
    value = _random(generator, *lead, source_length, value_dim)
    target = (*lead, query_length, source_length)
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    is_causal = mask_kind is None and draw(st.booleans())  # torch refuses both together
    attn_mask = None
    if mask_kind is not None:
        # broadcastable: drop some leading dims, set some sizes to 1
        kept = target[draw(st.integers(0, len(lead))) :]
        shape = tuple(1 if draw(st.booleans()) else size for size in kept)
        allowed = torch.rand(shape, generator=generator) < 0.6
        # at least one key for every query row ...
        first = torch.randint(0, shape[-1], shape[:-1], generator=generator)
        allowed.scatter_(-1, first.unsqueeze(-1), True)
        if allow_fully_masked:  # ... except for some rows that see none
            allowed[torch.rand(shape[:-1], generator=generator) < 0.3] = False
        if mask_kind == "bool":
            attn_mask = allowed
        else:
            attn_mask = _random(generator, *shape).masked_fill(~allowed, -math.inf)
    scale = draw(st.none() | st.floats(0.1, 2.0))
    return query, key, value, {"attn_mask": attn_mask, "is_causal": is_causal, "scale": scale}


def _sdpa_leaves(query, key, value):
    return _leaf(query), _leaf(key), _leaf(value)


@backends
@given(problem=sdpa_problems())
def test_sdpa_matches_torch(backend_name, problem):
    query, key, value, options = problem
    ours = _sdpa_leaves(query, key, value)
    theirs = _sdpa_leaves(query, key, value)
    with fastattn.backend(backend_name):
        got = fastattn.scaled_dot_product_attention(*ours, **options)
    expected = F.scaled_dot_product_attention(*theirs, **options)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    cotangent = torch.randn(got.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    (got * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    for name, mine, reference in zip(("query", "key", "value"), ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad, msg=lambda m: f"grad of {name}: {m}")


@backends
@pytest.mark.parametrize(
    "shapes, options",
    [
        (((2, 3, 3, 4), (1, 3, 5, 4), (1, 3, 5, 6)), {}),  # keys and values shared by the batch
        (((1, 3, 4), (2, 5, 4), (5, 6)), {"is_causal": True}),  # the query and the values broadcast
        (((2, 6, 3, 4), (2, 2, 5, 4), (2, 1, 5, 6)), {"enable_gqa": True}),  # grouped-query heads
        (((6, 3, 4), (2, 5, 4), (3, 5, 4)), {"enable_gqa": True, "scale": 0.3}),
    ],
)
def test_sdpa_broadcasts_and_groups_query_heads_as_torch(backend_name, shapes, options):
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, dtype=DTYPE, generator=generator) for shape in shapes]
    ours, theirs = ([t.clone().requires_grad_() for t in tensors] for _ in range(2))
    with fastattn.backend(backend_name):
        got = fastattn.scaled_dot_product_attention(*ours, **options)
    expected = F.scaled_dot_product_attention(*theirs, **options)
    torch.testing.assert_close(got, expected)
    cotangent = torch.randn(got.shape, dtype=DTYPE, generator=generator)
    for mine, reference in zip(torch.autograd.grad(got, ours, cotangent), torch.autograd.grad(expected, theirs, cotangent)):
        torch.testing.assert_close(mine, reference)


@backends
@pytest.mark.parametrize("query_length, source_length", [(3, 0), (0, 5), (0, 0)], ids=["no_keys", "no_queries", "neither"])
@pytest.mark.parametrize("options", [{}, {"is_causal": True}, {"attn_mask": "bool"}, {"attn_mask": "float"}],
                         ids=["plain", "causal", "bool_mask", "float_mask"])
def test_sdpa_with_no_queries_or_no_keys_gives_what_torch_gives(backend_name, query_length, source_length, options):
    """An empty L gives an empty output and S = 0 zeros, with torch's gradients: fastattn
    refused both with a ValueError (found by a fuzz against torch)."""
    generator = torch.Generator().manual_seed(0)
    shapes = ((2, 3, query_length, 4), (2, 3, source_length, 4), (2, 3, source_length, 6))
    tensors = [torch.randn(*shape, dtype=DTYPE, generator=generator) for shape in shapes]
    mask = options.get("attn_mask")
    if mask is not None:
        scores = torch.randn(query_length, source_length, dtype=DTYPE, generator=generator)
        options = {"attn_mask": scores > 0 if mask == "bool" else scores}
    ours, theirs = ([t.clone().requires_grad_() for t in tensors] for _ in range(2))
    with fastattn.backend(backend_name):
        got = fastattn.scaled_dot_product_attention(*ours, **options)
    expected = F.scaled_dot_product_attention(*theirs, **options)
    assert got.shape == expected.shape == (2, 3, query_length, 6)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for mine, reference in zip(torch.autograd.grad(got.sum(), ours), torch.autograd.grad(expected.sum(), theirs)):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


@backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_adds_a_float32_mask_at_its_precision_next_to_a_16_bit_query(backend_name, dtype):
    """torch adds a float32 attn_mask to 16-bit scores in float32.  fastattn cast it to
    the query's dtype first: 7e4 became inf in float16 (a NaN row), -1e5 over a whole row
    became -inf in float16 (a zero row, where a constant shift changes nothing), and a
    bias of 200 +- 30 lost its low bits in bfloat16 (errors of 0.05-0.4, 10-90x torch's).
    Now the error is at most twice torch's own run in that dtype."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, n, size, generator=generator).to(dtype) for n, size in ((4, 6), (5, 6), (5, 5)))
    mask = 200 + 30 * torch.randn(4, 5, generator=generator)
    mask[0] = torch.tensor([7e4, 0, 0, 0, 0])
    mask[1] = -1e5
    with fastattn.backend(backend_name):
        got = fastattn.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    exact = F.scaled_dot_product_attention(query.double(), key.double(), value.double(), attn_mask=mask.double())
    torch_run = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    assert got.dtype == dtype
    assert (got.double() - exact).abs().max() <= 2 * (torch_run.double() - exact).abs().max()


@backends
@given(problem=sdpa_problems(allow_fully_masked=True))
def test_sdpa_fully_masked_rows_give_zeros_not_nan(backend_name, problem):
    query, key, value, options = problem
    query, key, value = _sdpa_leaves(query, key, value)
    with fastattn.backend(backend_name):
        got = fastattn.scaled_dot_product_attention(query, key, value, **options)
    assert torch.isfinite(got).all()
    got.sum().backward()
    for name, leaf in (("query", query), ("key", key), ("value", value)):
        assert torch.isfinite(leaf.grad).all(), f"non-finite gradient for {name}"
    mask = options["attn_mask"]
    if mask is None:
        return
    allowed = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    allowed = allowed.expand(*query.shape[:-1], key.shape[-2])
    masked_rows = ~allowed.any(-1)
    assert (got[masked_rows] == 0).all()
    assert (query.grad[masked_rows] == 0).all()
    expected = F.scaled_dot_product_attention(query.detach(), key.detach(), value.detach(), **options)
    torch.testing.assert_close(got.detach()[~masked_rows], expected[~masked_rows])


@pytest.mark.parametrize("backend_name", [name for name in ("cpu", "triton")
                                          if fastattn.backends.unavailable_reason(name) is None])
@pytest.mark.parametrize("mask_name", ["key_padding_mask", "lengths"])
def test_masks_changed_in_place_after_the_forward_keep_their_gradients(backend_name, mask_name):
    """A decoder that masks the keys it has attended to, in place, between steps: each
    step's backward uses its mask as it was at that step's forward, as the reference's
    (and torch's sdpa) do.  The kernel backends had saved the caller's tensor: the
    backward failed with "modified by an inplace operation"."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 8, generator=generator, requires_grad=True)
    keys = torch.randn(2, 6, 8, generator=generator, requires_grad=True)

    def decode():
        mask = torch.zeros(2, 6, dtype=torch.bool) if mask_name == "key_padding_mask" else torch.tensor([6, 5])
        loss = 0
        for t in range(4):
            context = fastattn.attention(query[:, t], keys, **{mask_name: mask}, return_weights=True)
            loss = loss + context[0].square().sum() + context[1][:, :3].sum()
            if mask_name == "key_padding_mask":
                mask[:, t] = True
            else:
                mask -= 1
        return torch.autograd.grad(loss, (query, keys))

    with fastattn.backend("reference"):
        expected = decode()
    with fastattn.backend(backend_name):
        got = decode()
    for actual, want in zip(got, expected):
        torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", [name for name in ("reference", "cpu", "triton")
                                          if fastattn.backends.unavailable_reason(name) is None])
def test_cosine_of_zero_queries_and_keys_has_finite_gradients(backend_name):
    """Norms floored at 1e-8 (torch's cosine_similarity eps): the gradient at a zero query
    was the upstream one over float32's smallest normal number, inf, and a query W s at
    s = 0 gave W NaN gradients.  Checked against the float64 reference."""
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(2, 3, 6, generator=generator)
    state[0] = 0.0  # a batch of zero queries, as a decoder's zero initial state gives
    weight = torch.randn(8, 6, generator=generator)
    keys = torch.randn(2, 5, 8, generator=generator) * 10
    keys[1, 2] = 0.0

    def gradients(backend, dtype):
        w, k = (x.to(dtype).requires_grad_() for x in (weight, keys))
        with fastattn.backend(backend):
            context = fastattn.attention(state.to(dtype) @ w.T, k, score="cosine", scale=5.0)
        return torch.autograd.grad(context.sum(), (w, k))

    got, expected = gradients(backend_name, torch.float32), gradients("reference", torch.float64)
    for name, value, truth in zip(("weight", "keys"), got, expected):
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value.double(), truth, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend_name", [name for name in ("cpu", "triton")
                                          if fastattn.backends.unavailable_reason(name) is None])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (2, 17, 19, 130)])  # the cpu row kernels; its matrix-multiply path
def test_float16_cosine_floors_norms_at_float16s_smallest_normal(backend_name, shape):
    """float16 cannot hold 1 / 1e-8: the reference floors float16 norms at float16's smallest
    normal number, 2^-14.  The cpu kernels, computing in float32, took 1e-8: a zero query or
    key row got gradients of +-inf, and a row of norm under 2^-14 other weights than the
    reference's.  Both as the reference run in float16 now."""
    batch, queries, source, dim = shape
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(batch, length, size, generator=generator)
                           for length, size in ((queries, dim), (source, dim), (source, 4)))
    query[0, 0], keys[0, 2] = 0.0, 0.0
    query[1, 1] = torch.randn(dim, generator=generator) * 2e-5 / dim**0.5  # norm ~2e-5
    query, keys, values = (x.half() for x in (query, keys, values))

    def outputs(backend):
        leaves = [x.clone().requires_grad_() for x in (query, keys)]
        with fastattn.backend(backend):
            context, weights = fastattn.attention(*leaves, values, score="cosine", scale=4.0, return_weights=True)
        return [context, weights, *torch.autograd.grad(context.float().sum(), leaves)]

    for name, got, want in zip(("context", "weights", "grad_query", "grad_keys"), outputs(backend_name),
                               outputs("reference")):
        assert torch.isfinite(got).all() and torch.isfinite(want).all(), name
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend_name", [name for name in ("reference", "cpu", "triton")
                                          if fastattn.backends.unavailable_reason(name) is None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_p_takes_float32_centers_next_to_a_16_bit_query(backend_name, dtype):
    """Positions past 2048 are 2 apart in float16 and 16 apart in bfloat16: a center had
    to have the query's dtype, so p_t = 2900.4 became 2900 or 2896 and the window (D = 2)
    took the wrong keys.  A float32 center is now taken as it is: the window is keys
    2899..2902, and the weights and the center's gradient are within twice the error of
    the reference run in that dtype (against float64)."""
    if backend_name == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter multiplies bfloat16 tl.dot operands wrongly (test_triton_attention)")
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(2, 1, 4, generator=generator), torch.randn(2, 3000, 4, generator=generator),
                           torch.randn(2, 3000, 3, generator=generator))
    center = torch.tensor([[2900.4], [17.3]])

    def run(backend, dtype, center_dtype):
        where = center.to(center_dtype).requires_grad_()
        with fastattn.backend(backend):
            context, weights = fastattn.attention(query.to(dtype), keys.to(dtype), values.to(dtype), window=2,
                                                  center=where, return_weights=True)
        (grad_center,) = torch.autograd.grad((context.double() * torch.arange(1.0, 4.0)).sum(), where)
        return weights.detach().double(), grad_center.double()

    weights, grad_center = run(backend_name, dtype, torch.float32)
    assert weights[0, 0].nonzero().flatten().tolist() == [2899, 2900, 2901, 2902]
    assert weights[1, 0].nonzero().flatten().tolist() == [16, 17, 18, 19]
    exact, reference_run = run("reference", torch.float64, torch.float64), run("reference", dtype, torch.float32)
    for name, got, truth, own in zip(("weights", "grad_center"), (weights, grad_center), exact, reference_run):
        assert (got - truth).abs().max() <= 2 * (own - truth).abs().max(), name
