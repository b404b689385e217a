"""Random attention problems for the tests: the score parameters each score needs."""

from __future__ import annotations

import torch

SCORES = ("dot", "scaled_dot", "general", "additive", "cosine", "location")


def score_parameters(
    score: str,
    query_dim: int,
    key_dim: int,
    *,
    attention_dim: int = 5,
    max_source_len: int = 16,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    requires_grad: bool = False,
) -> dict:
    """Keyword arguments of ``fastattn.attention`` for ``score``'s parameters."""

    def random(*shape):
        return torch.randn(*shape, dtype=dtype, generator=generator).requires_grad_(requires_grad)

    if score == "general":
        return {"weight": random(query_dim, key_dim)}
    if score == "location":
        return {"weight": random(max_source_len, query_dim)}
    if score == "additive":
        return {
            "w_query": random(attention_dim, query_dim),
            "w_key": random(attention_dim, key_dim),
            "v": random(attention_dim),
            "bias": random(attention_dim),
        }
    return {}


def key_dim_for(score: str, query_dim: int, other: int) -> int:
    """Dot-product scores need Dk == Dq; the others take any key size."""
    return query_dim if score in ("dot", "scaled_dot", "cosine") else other


def cpu_backends() -> list[str]:
    """The backends that run CPU tensors in this build: the reference, and the C++
    kernels when fastattn._C is built."""
    from fastattn import backends

    return [name for name in ("reference", "cpu") if backends.unavailable_reason(name) is None]


def opcheck_backward_sample_positions_and_fast_tanh(forward_arguments: tuple) -> None:
    """torch.library.opcheck of attention_backward at the outputs of attention_forward on
    ``forward_arguments`` (with weights returned), of sample_positions on those weights,
    and of fast_tanh, on the device of the arguments."""
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in forward_arguments]
    context, weights, logsumexp = torch.ops.fastattn.attention_forward(*detached)
    query, keys, values, v, bias, score, scale, lengths, mask, causal, window, center, gaussian, _ = detached
    for given_context in (None, context):
        torch.library.opcheck(
            torch.ops.fastattn.attention_backward.default,
            (torch.randn_like(context), torch.randn_like(weights), query, keys, values, v, bias, score, scale, lengths,
             mask, causal, window, center, gaussian, logsumexp, given_context),
        )
    torch.library.opcheck(torch.ops.fastattn.sample_positions.default, (weights, False, None))
    torch.library.opcheck(torch.ops.fastattn.fast_tanh.default, (torch.randn(17, device=query.device),))
