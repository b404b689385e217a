"""The six score functions e_{t,j} = score(s_t, h_j) of API.md, as plain PyTorch.

Each takes queries s of shape (..., T, Dq) and keys h of shape (..., S, Dk) and
returns scores of shape (..., T, S).  They are the specification: written as the
equations read, not as fast as they could be.
"""

from __future__ import annotations

import torch


def dot_score(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """e = s^T h."""
    return query @ keys.transpose(-1, -2)


def scaled_dot_score(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """e = s^T h * scale (scale = 1/sqrt(Dk) unless given)."""
    return query @ keys.transpose(-1, -2) * scale


def general_score(query: torch.Tensor, keys: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """e = s^T W_a h, W_a of shape (Dq, Dk)."""
    return (query @ weight) @ keys.transpose(-1, -2)


def additive_score_from_projections(
    query_projection: torch.Tensor,
    key_projection: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """e = v_a^T tanh(W_q s + W_k h + b), given W_q s (..., T, Da) and W_k h (..., S, Da)."""
    summed = query_projection.unsqueeze(-2) + key_projection.unsqueeze(-3)  # (..., T, S, Da)
    if bias is not None:
        summed = summed + bias
    return torch.tanh(summed) @ v


def additive_score(
    query: torch.Tensor,
    keys: torch.Tensor,
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """e = v_a^T tanh(W_q s + W_k h + b), W_q (Da, Dq), W_k (Da, Dk), v_a and b (Da,)."""
    return additive_score_from_projections(query @ w_query.T, keys @ w_key.T, v, bias)


# The cosine's norms are floored, as torch.nn.functional.cosine_similarity's (eps): a zero
# vector has cosine 0 with everything, and its gradient, 1 / floor times the upstream
# one, stays finite (at the smallest normal number it overflowed float32, and a zero
# query made of parameters, W s at s = 0, gave NaN gradients).  float16 cannot hold
# 1e-8: there the floor is its smallest normal number.
COSINE_NORM_FLOOR = 1e-8


def cosine_norm_floor(dtype: torch.dtype) -> float:
    return max(COSINE_NORM_FLOOR, torch.finfo(dtype).tiny)


def cosine_score(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """e = scale * s^T h / (max(|s|, floor) max(|h|, floor)), the floor 1e-8."""
    floor = cosine_norm_floor(query.dtype)
    unit_query = query / query.norm(dim=-1, keepdim=True).clamp_min(floor)
    unit_keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(floor)
    return scale * (unit_query @ unit_keys.transpose(-1, -2))


def location_score(query: torch.Tensor, source_length: int, weight: torch.Tensor) -> torch.Tensor:
    """e_j = (W_a s)_j for j < S, W_a of shape (S_max, Dq): the keys are not looked at."""
    return query @ weight[:source_length].T
