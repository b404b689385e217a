"""Soft attention as the lecture writes it: scores, masked softmax, context.

    e_{t,j}     = score(s_t, h_j)
    alpha_{t,j} = softmax_j(e_{t,j})      over the valid j only
    c_t         = sum_j alpha_{t,j} v_j

Tensors are in the canonical layout every backend receives: queries (N, T, Dq),
keys (N, S, Dk), values (N, S, Dv), lengths (N,), key_padding_mask (N, S),
center (N, T).  ``fastattn.functional`` maps the caller's shapes onto it.
A query row with no valid key (a fully masked row) gets zero weights and a zero
context, and passes zero gradients back: never NaN.
"""

from __future__ import annotations

import torch

from fastattn.reference import scores


def valid_positions(
    batch: int,
    query_length: int,
    source_length: int,
    *,
    lengths: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    window: int | None,
    center: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """(N, T, S) bool: True where query t may attend to key j."""
    j = torch.arange(source_length, device=device)
    t = torch.arange(query_length, device=device)
    valid = torch.ones(batch, query_length, source_length, dtype=torch.bool, device=device)
    if lengths is not None:
        valid = valid & (j < lengths[:, None, None])
    if key_padding_mask is not None:
        valid = valid & ~key_padding_mask[:, None, :]
    if causal:
        valid = valid & (j[None, :] <= t[:, None])
    if window is not None:
        p = positions(window_centers(batch, query_length, center, device)).unsqueeze(-1)
        if not p.is_floating_point():
            # local-m (p = t): a window past max(S, T) keeps every key, and p + D must not overflow int64
            window = min(window, max(source_length, query_length))
        valid = valid & (j >= p - window) & (j <= p + window)
    return valid


def positions(values: torch.Tensor) -> torch.Tensor:
    """Integer positions as they are, float ones in float32 at least: key indices j and
    p_t +- D must compare and subtract exactly, which float16 / bfloat16 cannot do
    past 2048 / 256."""
    if values.is_floating_point():
        return values.to(torch.promote_types(values.dtype, torch.float32))
    return values


def window_centers(
    batch: int, query_length: int, center: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """p_t of local attention, (N, T): t itself (local-m) or the given centers (local-p)."""
    if center is not None:
        return center
    return torch.arange(query_length, device=device).expand(batch, query_length)


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """softmax over the valid positions of each row; rows with none give zeros."""
    has_valid = valid.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~valid, float("-inf"))
    scores = scores.masked_fill(~has_valid, 0.0)  # keeps exp() finite; zeroed just below
    return torch.softmax(scores, dim=-1).masked_fill(~valid, 0.0)


def gaussian_factor(
    centers: torch.Tensor, source_length: int, window: int, dtype: torch.dtype
) -> torch.Tensor:
    """exp(-(j - p_t)^2 / (2 sigma^2)), sigma = D / 2 (Luong 2015, eq. 10), (N, T, S),
    in ``dtype`` but with j - p_t taken in float32 at least (see :func:`positions`)."""
    exact = torch.promote_types(dtype, torch.float32)
    j = torch.arange(source_length, device=centers.device, dtype=exact)
    sigma = window / 2
    return torch.exp(-((j - centers.unsqueeze(-1).to(exact)) ** 2) / (2 * sigma**2)).to(dtype)


def attend(
    scores_: torch.Tensor,
    values: torch.Tensor,
    *,
    lengths: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    window: int | None,
    center: torch.Tensor | None,
    gaussian: bool,
    return_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From scores (N, T, S) to (context (N, T, Dv), weights or None)."""
    batch, query_length, source_length = scores_.shape
    valid = valid_positions(
        batch,
        query_length,
        source_length,
        lengths=lengths,
        key_padding_mask=key_padding_mask,
        causal=causal,
        window=window,
        center=center,
        device=scores_.device,
    )
    weights = masked_softmax(scores_, valid)
    if gaussian:
        centers = window_centers(batch, query_length, center, scores_.device)
        weights = weights * gaussian_factor(centers, source_length, window, weights.dtype)
    context = weights @ values
    return context, (weights if return_weights else None)


def score_matrix(
    query: torch.Tensor,
    keys: torch.Tensor,
    *,
    score: str,
    weight: torch.Tensor | None,
    w_query: torch.Tensor | None,
    w_key: torch.Tensor | None,
    v: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """e_{t,j} for the named score function, (N, T, S)."""
    if score == "dot":
        return scores.dot_score(query, keys)
    if score == "scaled_dot":
        return scores.scaled_dot_score(query, keys, scale)
    if score == "general":
        return scores.general_score(query, keys, weight)
    if score == "additive":
        return scores.additive_score(query, keys, w_query, w_key, v, bias)
    if score == "cosine":
        return scores.cosine_score(query, keys, scale)
    if score == "location":
        return scores.location_score(query, keys.shape[-2], weight)
    raise ValueError(f"score must be one of dot, scaled_dot, general, additive, cosine, location, got {score!r}")


def attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    score: str,
    weight: torch.Tensor | None,
    w_query: torch.Tensor | None,
    w_key: torch.Tensor | None,
    v: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float | None,
    **masking,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global or local soft attention with any of the six scores."""
    e = score_matrix(
        query, keys, score=score, weight=weight, w_query=w_query, w_key=w_key, v=v, bias=bias, scale=scale
    )
    return attend(e, values, **masking)


def additive_attention(
    query_projection: torch.Tensor,
    key_projection: torch.Tensor,
    v: torch.Tensor,
    values: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    **masking,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive (Bahdanau) attention with W_q s and W_k h already computed."""
    e = scores.additive_score_from_projections(query_projection, key_projection, v, bias)
    return attend(e, values, **masking)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention's semantics, (N, L, E) layout.

    ``attn_mask`` is (N, L, S): bool (True = may attend) or float (added to the
    scores, -inf = may not attend; a float32 one next to 16-bit scores promotes them,
    as torch adds it in float32).  Rows with nothing to attend give zeros.
    """
    e = scores.scaled_dot_score(query, key, scale)
    query_length, source_length = e.shape[-2:]
    valid = torch.ones(query_length, source_length, dtype=torch.bool, device=e.device)
    if is_causal:
        valid = valid.tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        valid = valid & attn_mask
    elif attn_mask is not None:
        e = e + attn_mask
        valid = valid & ~torch.isneginf(attn_mask)
    weights = masked_softmax(e, valid.expand_as(e))
    if dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p, training=True)
    return weights.to(value.dtype) @ value
