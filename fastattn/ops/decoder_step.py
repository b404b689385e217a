"""The fused attention-decoder step (torch.ops.fastattn.attention_decoder_step,
csrc/decoder_step.cpp) as the backend function of ``AttentionDecoderCell``.

It maps the module's score onto the kernel's score kinds the way
:mod:`fastattn.ops.attention` does for the attention op, but from the precomputed
cache: general and additive attend over the projected keys (additive also projects
the state by W_q inside the op), location over W_a[:S] shared by the batch.  Image-grid
keys (B, H, W, D) go in flattened to (B, H W, D), their weights come back as (B, H, W);
local-p attention hands the op its W_p and v_p, and the op predicts the window's centre.
It answers None, and the module composes the step, for what the op does not cover:
local-m windows (which a single step rejects), local-p with a key_padding_mask (the
op takes a source's length for p_t from lengths alone) and keys of another rank.  Every
float dtype goes to the op (the cpu and cuda ops it composes take float16 and bfloat16).
On CUDA tensors without gradients the op runs
attention_decoder_step_inference (csrc/decoder_step.cpp routes it), whose fake (meta)
kernel is here.
"""

from __future__ import annotations

import math

import torch

from fastattn.functional.attention_inputs import Layout, masking_arguments
from fastattn.ops.fake_kernels import register_fake

@register_fake("fastattn::attention_decoder_step_inference")
def _attention_decoder_step_inference_fake(y, h, c, attentional, keys, values, query_weight, v, bias, score, scale,
                                           lengths, key_padding_mask, w_ih, w_hh, b_ih, b_hh, w_combine,
                                           input_feeding, window=None, position_weight=None, position_v=None):
    batch, hidden = y.shape[0], w_hh.shape[1]
    c_next = y.new_empty(batch, hidden) if c is not None else y.new_empty(0)
    return y.new_empty(batch, w_combine.shape[0]), y.new_empty(batch, hidden), c_next, y.new_empty(batch, keys.shape[1])


def _kernel_attention(attention, cache, source_length: int) -> dict:
    """The op's attention arguments for ``attention``'s score, from ``cache``, keys
    flattened to (B, S, D)."""
    score = attention.score
    if score == "additive":
        return dict(keys=cache.projected_keys.flatten(1, -2), query_weight=attention.w_query.T, v=attention.v,
                    bias=attention.bias, score="additive", scale=1.0)
    if score == "general":
        return dict(keys=cache.projected_keys.flatten(1, -2), score="dot", scale=1.0)
    if score == "location":
        return dict(keys=attention.weight[:source_length].unsqueeze(0), score="dot", scale=1.0)
    scale = 1 / math.sqrt(cache.keys.shape[-1]) if score == "scaled_dot" else 1.0
    return dict(keys=cache.keys.flatten(1, -2), score="cosine" if score == "cosine" else "dot", scale=scale)


def _local_p(attention) -> dict:
    """The op's local-p arguments (none without a window)."""
    if attention.local != "p":
        return {}
    return dict(window=attention.window, position_weight=attention.position_weight.T,
                position_v=attention.position_v)


def attention_decoder_step(decoder, y_prev_embedded, state, cache, *, lengths, key_padding_mask):
    """-> (output h~_t, s_t, LSTM memory c_t or None, weights (B, S)), or None when the
    fused op does not cover this configuration.  Arguments are checked by the module."""
    attention = decoder.attention
    if attention.local == "m" or (attention.local == "p" and key_padding_mask is not None):
        return None
    if cache.keys.dim() not in (3, 4):
        return None
    batch, grid = y_prev_embedded.shape[0], tuple(cache.keys.shape[1:-1])
    source_length = math.prod(grid)
    masks = masking_arguments(
        Layout(lead=(batch,), single_step=True, grid=grid if len(grid) == 2 else None), y_prev_embedded, 1,
        source_length, lengths=lengths, key_padding_mask=key_padding_mask, causal=False, window=None, center=None,
        gaussian=None,
    )
    arguments = dict(query_weight=None, v=None, bias=None) | _kernel_attention(attention, cache, source_length)
    cell = decoder.cell
    output, hidden, memory, weights = torch.ops.fastattn.attention_decoder_step(
        y_prev_embedded, state.hidden, state.cell, state.attentional,
        arguments["keys"].contiguous(), cache.values.flatten(1, -2).contiguous(), arguments["query_weight"],
        arguments["v"], arguments["bias"], arguments["score"], arguments["scale"], masks["lengths"],
        masks["key_padding_mask"], cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, decoder.combine.weight,
        decoder.input_feeding, **_local_p(attention),
    )
    return output, hidden, (memory if state.cell is not None else None), weights.view(batch, *grid)
