"""The public attention functions: check the arguments once, fold them into the
canonical layout, run the op on the backend chosen by ``fastattn.backends``, and
unfold the outputs.  No maths here: that lives in the backends.
"""

from __future__ import annotations

import math

import torch

from fastattn import backends, checks
from fastattn.functional.attention_inputs import (
    Layout,
    additive_parameters,
    check_features,
    check_values,
    layout_of,
    masking_arguments,
    score_arguments,
)


def _prepare(query, keys, values, score, score_parameters: dict, masking: dict):
    """-> (layout, canonical query, keys, values, op keyword arguments)."""
    checks.float_tensor("query", query)
    checks.float_like("keys", keys, "query", query)
    layout = layout_of("query", query, "keys", keys)
    own_values = values is not None and values is not keys
    if own_values:
        check_values("values", values, "keys", keys, "query", query)
    folded_query, folded_keys = layout.fold_queries(query), layout.fold_keys(keys)
    query_length, source_length = folded_query.shape[1], folded_keys.shape[1]
    arguments = score_arguments(score, query, keys, source_length, **score_parameters)
    arguments.update(masking_arguments(layout, query, query_length, source_length, **masking))
    folded_values = layout.fold_keys(values) if own_values else folded_keys
    return layout, folded_query, folded_keys, folded_values, arguments


def attention(
    query,
    keys,
    values=None,
    *,
    score="scaled_dot",
    weight=None,
    w_query=None,
    w_key=None,
    v=None,
    bias=None,
    scale=None,
    lengths=None,
    key_padding_mask=None,
    causal=False,
    window=None,
    center=None,
    gaussian=None,
    return_weights=False,
):
    """Soft attention: context c_t = sum_j softmax_j(score(s_t, h_j)) v_j.

    query (..., T, Dq) or (B, Dq) for one decoder step; keys (..., S, Dk) or a grid
    (..., H, W, Dk); values like keys with Dv features (default: the keys).
    Returns context (..., T, Dv), and with ``return_weights=True`` also the weights
    (..., T, S) or (..., T, H, W).  See API.md for the scores and masks.
    """
    checks.flag("return_weights", return_weights)
    layout, query_, keys_, values_, arguments = _prepare(
        query,
        keys,
        values,
        score,
        {"weight": weight, "w_query": w_query, "w_key": w_key, "v": v, "bias": bias, "scale": scale},
        {"lengths": lengths, "key_padding_mask": key_padding_mask, "causal": causal, "window": window,
         "center": center, "gaussian": gaussian},
    )
    run = backends.implementation("attention", query.device.type, inputs=(query_, keys_, values_, *arguments.values()))
    context, weights = run(query_, keys_, values_, **arguments, return_weights=return_weights)
    return _outputs(layout, context, weights, return_weights)


def additive_attention(
    q_proj,
    k_proj,
    v,
    values,
    *,
    bias=None,
    lengths=None,
    key_padding_mask=None,
    causal=False,
    window=None,
    center=None,
    gaussian=None,
    return_weights=False,
):
    """Additive (Bahdanau) attention with the projections already applied:
    e_{t,j} = v^T tanh(q_proj_t + k_proj_j + bias).

    q_proj (..., T, Da) or (B, Da); k_proj (..., S, Da) or (..., H, W, Da), computed
    once per source by a decoder; v (Da,); values (..., S, Dv).
    """
    checks.flag("return_weights", return_weights)
    checks.float_tensor("q_proj", q_proj)
    checks.float_like("k_proj", k_proj, "q_proj", q_proj)
    layout = layout_of("q_proj", q_proj, "k_proj", k_proj)
    if k_proj.shape[-1] != q_proj.shape[-1]:
        raise ValueError(
            f"k_proj must have the attention size Da={q_proj.shape[-1]} of q_proj as its last "
            f"dimension, got {checks.describe(k_proj)}"
        )
    check_values("values", values, "k_proj", k_proj, "q_proj", q_proj)
    additive_parameters(v, bias, q_proj)
    query_, keys_ = layout.fold_queries(q_proj), layout.fold_keys(k_proj)
    masking = masking_arguments(
        layout,
        q_proj,
        query_.shape[1],
        keys_.shape[1],
        lengths=lengths,
        key_padding_mask=key_padding_mask,
        causal=causal,
        window=window,
        center=center,
        gaussian=gaussian,
    )
    folded_values = layout.fold_keys(values)
    run = backends.implementation(
        "additive_attention", q_proj.device.type, inputs=(query_, keys_, v, folded_values, bias, *masking.values())
    )
    context, weights = run(query_, keys_, v, folded_values, bias=bias, **masking, return_weights=return_weights)
    return _outputs(layout, context, weights, return_weights)


def hard_attention(
    query,
    keys,
    values=None,
    *,
    score="scaled_dot",
    sample=True,
    generator=None,
    weight=None,
    w_query=None,
    w_key=None,
    v=None,
    bias=None,
    scale=None,
    lengths=None,
    key_padding_mask=None,
    causal=False,
    window=None,
    center=None,
    gaussian=None,
):
    """Hard attention (Xu 2015): one key position per query, sampled from the soft
    weights (``sample=True``, drawn with ``generator``) or their argmax.

    Returns (context (..., T, Dv), index (..., T) int64, log_prob (..., T),
    weights (..., T, S)); ``log_prob`` is differentiable, for REINFORCE.
    """
    checks.flag("sample", sample)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {checks.describe(generator)}")
    layout, query_, keys_, values_, arguments = _prepare(
        query,
        keys,
        values,
        score,
        {"weight": weight, "w_query": w_query, "w_key": w_key, "v": v, "bias": bias, "scale": scale},
        {"lengths": lengths, "key_padding_mask": key_padding_mask, "causal": causal, "window": window,
         "center": center, "gaussian": gaussian},
    )
    run = backends.implementation("hard_attention", query.device.type, inputs=(query_, keys_, values_, *arguments.values()))
    context, index, log_prob, weights = run(query_, keys_, values_, **arguments, sample=sample, generator=generator)
    return (
        layout.unfold_per_query(context),
        layout.unfold_per_query(index),
        layout.unfold_per_query(log_prob),
        layout.unfold_weights(weights),
    )


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Same arguments and results, except that a query row that may attend to no key
    returns zeros instead of NaN, and that empty feature dimensions are refused
    (ValueError) rather than computed; no queries (L = 0) give an empty result and no
    keys (S = 0) zeros, as torch's do.  query (..., L, E), key (..., S, E),
    value (..., S, Ev) with leading dimensions that broadcast together; attn_mask
    broadcastable to (..., L, S), bool (True = may attend) or float (float32 or the
    query's dtype, added to the scores at its own precision, as torch does).
    ``enable_gqa``: key and value may have fewer heads (dimension -3) than query, each
    a divisor of its count (grouped-query attention: head h of the query reads key
    head h // (Hq / Hk)).
    """
    checks.float_tensor("query", query)
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        checks.float_like(name, tensor, "query", query)
        if tensor.dim() < 2:
            raise ValueError(f"{name} must have shape (..., length, features), got {checks.describe(tensor)}")
    if checks.flag("enable_gqa", enable_gqa):
        key, value = (_repeated_heads(name, tensor, query) for name, tensor in (("key", key), ("value", value)))
    query, key, value = _broadcast_leading_dimensions(query, key, value)
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        check_features(name, tensor)
    if key.shape[-1] != query.shape[-1] or value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"key must be (..., S, E={query.shape[-1]}) and value (..., S, Ev) with the same S, "
            f"got key {tuple(key.shape)} and value {tuple(value.shape)}"
        )
    dropout_p = checks.finite_number("dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    checks.flag("is_causal", is_causal)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask cannot be given with is_causal=True (as in torch): fold the causal mask into it")
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else checks.finite_number("scale", scale)
    lead = tuple(query.shape[:-2])
    layout = Layout(lead, single_step=False, grid=None)
    query_length, source_length = query.shape[-2], key.shape[-2]
    if attn_mask is not None:
        attn_mask = _sdpa_mask(attn_mask, query, layout, query_length, source_length)
    run = backends.implementation("scaled_dot_product_attention", query.device.type, inputs=(query, key, value, attn_mask))
    context = run(
        layout.fold_queries(query),
        layout.fold_keys(key),
        layout.fold_keys(value),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
    )
    return layout.unfold_per_query(context)


def _repeated_heads(name: str, tensor: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention: ``tensor``'s heads (dimension -3) repeated to query's count."""
    if tensor.dim() < 3 or query.dim() < 3:
        raise ValueError(
            f"{name} must have a heads dimension (..., heads, length, features) with enable_gqa, got "
            f"{checks.describe(tensor)} for query {tuple(query.shape)}"
        )
    heads, query_heads = tensor.shape[-3], query.shape[-3]
    if heads == 0 or query_heads % heads:
        raise ValueError(
            f"{name} must have a number of heads that divides query's {query_heads} with enable_gqa, "
            f"got {checks.describe(tensor)}"
        )
    return tensor.repeat_interleave(query_heads // heads, dim=-3) if heads != query_heads else tensor


def _broadcast_leading_dimensions(query, key, value):
    """query, key and value expanded to the broadcast of their leading dimensions (as torch does)."""
    if key.shape[:-2] == query.shape[:-2] == value.shape[:-2]:  # the common case: torch.broadcast_shapes costs ~12 us
        return query, key, value
    try:
        lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"query, key and value must have leading dimensions that broadcast together, got query "
            f"{tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)}"
        ) from None
    return (tensor.expand(*lead, *tensor.shape[-2:]) for tensor in (query, key, value))


def _sdpa_mask(attn_mask, query, layout: Layout, query_length: int, source_length: int) -> torch.Tensor:
    checks.tensor("attn_mask", attn_mask)
    checks.same_device("attn_mask", attn_mask, "query", query)
    if attn_mask.dtype != torch.bool:  # an additive bias, kept in its dtype (float32 next to a 16-bit query)
        checks.float_tensor("attn_mask", attn_mask)
        if attn_mask.dtype not in (torch.float32, query.dtype) and not checks.autocast_casts(attn_mask, query):
            raise TypeError(
                f"attn_mask must be bool, float32 or the query's dtype {query.dtype} (as torch's), "
                f"got {checks.describe(attn_mask)}"
            )
    target = (*layout.lead, query_length, source_length)
    try:
        expanded = attn_mask.expand(target)
    except RuntimeError:
        raise ValueError(f"attn_mask must be broadcastable to {target}, got {checks.describe(attn_mask)}") from None
    return expanded.reshape(layout.batch, query_length, source_length)


def _outputs(layout: Layout, context, weights, return_weights: bool):
    context = layout.unfold_per_query(context)
    if not return_weights:
        return context
    return context, layout.unfold_weights(weights)
