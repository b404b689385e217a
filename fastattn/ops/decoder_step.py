"""The fused attention-decoder step (torch.ops.fastattn.attention_decoder_step,
csrc/decoder_step.cpp) as the backend function of ``AttentionDecoderCell``.

It maps the module's score onto the kernel's score kinds the way
:mod:`fastattn.ops.attention` does for the attention op, but from the precomputed
cache: general and additive attend over the projected keys (additive also projects
the state by W_q inside the op), location over W_a[:S] shared by the batch.  It
answers None, and the module composes the step, for what the op does not cover:
local windows, image-grid keys, and dtypes outside ``dtypes`` (float16 / bfloat16 on
backends whose kernels compute only float32 / float64).  On CUDA tensors without
gradients the op runs attention_decoder_step_inference (csrc/decoder_step.cpp routes
it), whose fake (meta) kernel is here.
"""

from __future__ import annotations

import math

import torch

from fastattn.functional.attention_inputs import Layout, masking_arguments

FLOAT_DTYPES = (torch.float32, torch.float64)


@torch.library.register_fake("fastattn::attention_decoder_step_inference")
def _attention_decoder_step_inference_fake(y, h, c, attentional, keys, values, query_weight, v, bias, score, scale,
                                           lengths, key_padding_mask, w_ih, w_hh, b_ih, b_hh, w_combine,
                                           input_feeding):
    batch, hidden = y.shape[0], w_hh.shape[1]
    c_next = y.new_empty(batch, hidden) if c is not None else y.new_empty(0)
    return y.new_empty(batch, w_combine.shape[0]), y.new_empty(batch, hidden), c_next, y.new_empty(batch, keys.shape[1])


def _kernel_attention(attention, cache) -> dict:
    """The op's attention arguments for ``attention``'s score, from ``cache``."""
    score = attention.score
    if score == "additive":
        return dict(keys=cache.projected_keys, query_weight=attention.w_query.T, v=attention.v,
                    bias=attention.bias, score="additive", scale=1.0)
    if score == "general":
        return dict(keys=cache.projected_keys, score="dot", scale=1.0)
    if score == "location":
        return dict(keys=attention.weight[: cache.keys.shape[1]].unsqueeze(0), score="dot", scale=1.0)
    scale = 1 / math.sqrt(cache.keys.shape[-1]) if score == "scaled_dot" else 1.0
    return dict(keys=cache.keys, score="cosine" if score == "cosine" else "dot", scale=scale)


def attention_decoder_step(decoder, y_prev_embedded, state, cache, *, lengths, key_padding_mask,
                           dtypes=FLOAT_DTYPES):
    """-> (output h~_t, s_t, LSTM memory c_t or None, weights (B, S)), or None when the
    fused op does not cover this configuration (``dtypes``: those the backend's ops
    take).  Arguments are checked by the module."""
    attention = decoder.attention
    if attention.window is not None or cache.keys.dim() != 3 or y_prev_embedded.dtype not in dtypes:
        return None
    batch = y_prev_embedded.shape[0]
    masks = masking_arguments(
        Layout(lead=(batch,), single_step=True, grid=None), y_prev_embedded, 1, cache.keys.shape[1],
        lengths=lengths, key_padding_mask=key_padding_mask, causal=False, window=None, center=None, gaussian=None,
    )
    arguments = dict(query_weight=None, v=None, bias=None) | _kernel_attention(attention, cache)
    cell = decoder.cell
    output, hidden, memory, weights = torch.ops.fastattn.attention_decoder_step(
        y_prev_embedded, state.hidden, state.cell, state.attentional,
        arguments["keys"].contiguous(), cache.values.contiguous(), arguments["query_weight"], arguments["v"],
        arguments["bias"], arguments["score"], arguments["scale"], masks["lengths"], masks["key_padding_mask"],
        cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, decoder.combine.weight, decoder.input_feeding,
    )
    return output, hidden, (memory if state.cell is not None else None), weights
