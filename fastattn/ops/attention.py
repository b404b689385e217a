"""The fused attention ops of fastattn._C seen from Python: fake (meta) registrations
(their autograd is C++, csrc/autograd.cpp), and the backend functions that map the six scores onto the three
kernel score kinds ("dot", "cosine", "additive"):

- dot, scaled_dot: "dot" with scale 1 or the given scale;
- general: s^T W_a h = (s W_a) . h, so the query is multiplied by W_a once, then "dot";
- location: e_j = W_a[j] . s, i.e. "dot" against keys W_a[:S] shared by the batch
  (passed as (1, S, D): the kernels broadcast them and sum their gradient over the batch);
- cosine: "cosine"; additive: "additive" on W_q s and W_k h.

The backend functions run on whatever device the op has a kernel for: the same code
serves the "cpu" backend and, where built, the "cuda" backend.  The Triton backend
(``fastattn.ops.triton_attention``) reuses this mapping by passing its own ``fused``
kernel call (and hard attention's ``outputs``) to the same functions.
"""

from __future__ import annotations

import torch

from fastattn import reference
from fastattn.ops import triton_checks
from fastattn.ops.fake_kernels import contiguous_like, contiguous_like_or_empty, register_fake

MASK_ARGUMENTS = ("lengths", "key_padding_mask", "causal", "window", "center", "gaussian")
KERNEL_SCORES = ("dot", "cosine", "additive")


def _accumulation_dtype(query):
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _check_attention(op, query, keys, values, v, bias, score, scale, lengths, key_padding_mask, window, center,
                     gaussian):
    """The kernels' argument checks (csrc/cpu/attention.cpp prepare_inputs, csrc/cuda/binding.cpp),
    which the Triton ops share: shapes, dtypes and devices, never values.  The CUDA kernels
    move lengths and key_padding_mask to the query's device; the CPU kernels want them there."""
    triton_checks.attention(op, query, keys, values, v, bias, score, KERNEL_SCORES, scale, lengths, key_padding_mask,
                            window, center, gaussian, masks_on_any_device=query.device.type == "cuda")


@register_fake("fastattn::attention_forward")
def _attention_forward_fake(
    query, keys, values, v, bias, score, scale, lengths, key_padding_mask, causal, window, center, gaussian,
    return_weights,
):
    _check_attention("attention_forward", query, keys, values, v, bias, score, scale, lengths, key_padding_mask,
                     window, center, gaussian)
    batch, query_length = query.shape[:2]
    accumulate = _accumulation_dtype(query)
    context = query.new_empty(batch, query_length, values.shape[-1])
    weights = query.new_empty(batch, query_length, keys.shape[1]) if return_weights else query.new_empty(0)
    return context, weights, query.new_empty(batch, query_length, dtype=accumulate)


@register_fake("fastattn::attention_backward")
def _attention_backward_fake(
    grad_context, grad_weights, query, keys, values, v, bias, score, scale, lengths, key_padding_mask, causal,
    window, center, gaussian, logsumexp, values_are_keys=False,
):
    op = "attention_backward"
    _check_attention(op, query, keys, values, v, bias, score, scale, lengths, key_padding_mask, window, center,
                     gaussian)
    triton_checks.attention_backward(op, grad_context, grad_weights, query, keys, values, logsumexp,
                                     _accumulation_dtype(query), values_are_keys=values_are_keys)
    grad_center = contiguous_like_or_empty(center if gaussian else None, query)
    grad_keys = query.new_empty(keys.shape)
    grad_values = query.new_empty(0) if values_are_keys else contiguous_like(values)
    return (
        contiguous_like(query), grad_keys, grad_values, contiguous_like_or_empty(v, query),
        contiguous_like_or_empty(bias, query), grad_center,
    )


@register_fake("fastattn::sample_positions")
def _sample_positions_fake(weights, sample, generator):
    triton_checks.float_tensor("sample_positions", "weights", weights, 3)  # (N, T, S), as the kernels take
    return weights.new_empty(weights.shape[:-1], dtype=torch.int64)


@register_fake("fastattn::hard_attention_outputs")
def _hard_attention_outputs_fake(weights, index, values):
    triton_checks.hard_attention_outputs("hard_attention_outputs", weights, index, values)
    return values.new_empty(*index.shape, values.shape[-1]), weights.new_empty(index.shape)


@register_fake("fastattn::hard_attention_outputs_backward")
def _hard_attention_outputs_backward_fake(grad_context, grad_log_prob, weights, index):
    triton_checks.hard_attention_outputs_backward("hard_attention_outputs_backward", grad_context, grad_log_prob,
                                                  weights, index)
    grad_values = weights.new_empty(0)
    if grad_context is not None:
        grad_values = grad_context.new_empty(weights.shape[0], weights.shape[2], grad_context.shape[-1])
    return contiguous_like_or_empty(weights if grad_log_prob is not None else None, weights), grad_values


@register_fake("fastattn::fast_tanh")
def _fast_tanh_fake(x):
    triton_checks.tensor("fast_tanh", "x", x, x, (None,) * x.dim(), torch.float32)
    return x.new_empty(x.shape)  # contiguous, as the kernels' output, whatever x's strides


def _fused(query, keys, values, v, bias, kernel_score, scale, masking, return_weights):
    context, weights, _ = torch.ops.fastattn.attention_forward(
        query.contiguous(), keys, values.contiguous(), v, bias, kernel_score, float(scale),
        masking["lengths"], masking["key_padding_mask"], masking["causal"], masking["window"], masking["center"],
        masking["gaussian"], return_weights,
    )
    return context, (weights if return_weights else None)


def attention(
    query, keys, values, *, score, weight, w_query, w_key, v, bias, scale, return_weights, fused=_fused, **masking
):
    """The "attention" op on the fused kernel (see the module docstring for the mapping);
    ``fused(query, keys, values, v, bias, kernel_score, scale, masking, return_weights)``
    runs the kernel."""
    if score in ("dot", "scaled_dot"):
        return fused(query, keys.contiguous(), values, None, None, "dot", 1.0 if scale is None else scale, masking, return_weights)
    if score == "general":
        return fused(query @ weight, keys.contiguous(), values, None, None, "dot", 1.0, masking, return_weights)
    if score == "location":
        shared_keys = weight[: keys.shape[1]].contiguous().unsqueeze(0)
        return fused(query, shared_keys, values, None, None, "dot", 1.0, masking, return_weights)
    if score == "cosine":
        return fused(query, keys.contiguous(), values, None, None, "cosine", scale, masking, return_weights)
    return additive_attention(
        query @ w_query.T, keys @ w_key.T, v, values, bias=bias, return_weights=return_weights, fused=fused, **masking
    )


def additive_attention(query_projection, key_projection, v, values, *, bias, return_weights, fused=_fused, **masking):
    """The "additive_attention" op: e = v . tanh(W_q s + W_k h + b), projections given."""
    return fused(
        query_projection, key_projection.contiguous(), values, v.contiguous(),
        None if bias is None else bias.contiguous(), "additive", 1.0, masking, return_weights,
    )


def hard_attention(query, keys, values, *, sample, generator, fused=_fused, outputs=None, **attention_arguments):
    """The "hard_attention" op: fused soft weights, then
    ``outputs(weights, values, sample, generator)``: one position drawn per row and the
    (context, index, log_prob) there (default: ``outputs_at_chosen_positions``).  The soft
    context is not used (the hard one is the chosen position's value): the fused call gets
    an empty value dim, so the kernels skip the weights-times-values work, in a tensor of its
    own (the backward saves it: a view of ``values`` would keep all of them alive)."""
    no_values = values.new_empty(*values.shape[:-1], 0)
    _, weights = attention(query, keys, no_values, return_weights=True, fused=fused, **attention_arguments)
    return (*(outputs or outputs_at_chosen_positions)(weights, values, sample, generator), weights)


def outputs_at_chosen_positions(weights, values, sample, generator):
    """(context, index, log_prob): the C++ sampler's positions, then the outputs there (the
    hard_attention_outputs kernels)."""
    index = torch.ops.fastattn.sample_positions(weights.detach(), sample, generator)
    context, log_prob = torch.ops.fastattn.hard_attention_outputs(weights, index, values)
    return context, index, log_prob


def scaled_dot_product_attention(query, key, value, *, attn_mask, dropout_p, is_causal, scale, fused=_fused):
    """The sdpa drop-in: the fused kernel without a mask or with is_causal; an explicit
    attn_mask (any (L, S) pattern or additive bias), dropout or an empty L or S (no
    kernel work: empty, or zeros as torch gives) runs the reference."""
    if attn_mask is not None or dropout_p > 0 or query.shape[-2] == 0 or key.shape[-2] == 0:
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    masking = dict(lengths=None, key_padding_mask=None, causal=is_causal, window=None, center=None, gaussian=False)
    return fused(query, key.contiguous(), value, None, None, "dot", scale, masking, False)[0]
