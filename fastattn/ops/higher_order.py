"""The differentiable forms of the fused ops, ``torch.ops.fastattn.<op>_reference``
(schemas in csrc/ops.cpp): each op's maths in ``fastattn.reference``'s PyTorch,
registered as CompositeImplicitAutograd, so on any device.

The backward kernels are not differentiable.  When a backward must be
(``torch.autograd.grad(..., create_graph=True)``: gradient penalties, Hessian-vector
products, meta-learning), the autograd kernels (csrc/autograd.cpp) and the Triton
backend's backward recompute the op's outputs with these from the saved inputs and
differentiate them with a graph, which is right to any order.
"""

from __future__ import annotations

import torch

from fastattn import reference
from fastattn.reference.hard import outputs_at

_LIBRARY = torch.library.Library("fastattn", "IMPL")


def _register(name: str):
    def register(function):
        _LIBRARY.impl(name, function, "CompositeImplicitAutograd")
        return function

    return register


@_register("attention_reference")
def attention_reference(query, keys, values, v, bias, score, scale, lengths, key_padding_mask, causal, window, center,
                        gaussian):
    """attention_forward's context and weights: score "dot" is the scaled dot product
    (scale given), "cosine" the scaled cosine, "additive" v . tanh(q + k + bias) of the
    projections; keys of batch 1 are shared by the batch."""
    keys = keys.expand(query.shape[0], -1, -1)
    masking = dict(lengths=lengths, key_padding_mask=key_padding_mask, causal=causal, window=window, center=center,
                   gaussian=gaussian, return_weights=True)
    if score == "additive":
        return reference.additive_attention(query, keys, v, values, bias=bias, **masking)
    return reference.attention(query, keys, values, score="cosine" if score == "cosine" else "scaled_dot",
                               weight=None, w_query=None, w_key=None, v=None, bias=None, scale=scale, **masking)


@_register("lstm_cell_reference")
def lstm_cell_reference(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return reference.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)


@_register("gru_cell_reference")
def gru_cell_reference(x, h, w_ih, w_hh, b_ih, b_hh):
    return reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)


@_register("lstm_layer_reference")
def lstm_layer_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    return reference.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, reverse=reverse)


@_register("gru_layer_reference")
def gru_layer_reference(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    return reference.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, reverse=reverse)


@_register("hard_attention_outputs_reference")
def hard_attention_outputs_reference(weights, index, values):
    context, _, log_prob = outputs_at(weights, index, values)
    return context, log_prob


def graph_wanted(inputs) -> bool:
    """Whether a backward must itself be differentiable: autograd records it
    (create_graph=True) and one of ``inputs`` (None allowed) needs a gradient."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)


def gradients_through_reference(reference_op, arguments, grads, inputs) -> list:
    """The gradients of ``inputs`` (the op's arguments in order, None where no gradient
    is wanted) through ``reference_op(*arguments)``, weighted by ``grads`` (None: zero),
    recorded for a further backward; each input enters as an alias of its own, as in
    csrc/autograd.cpp's gradients_through_reference."""
    arguments = list(arguments)
    wanted = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    for i in wanted:
        arguments[i] = inputs[i].view_as(inputs[i])
    pairs = [(output, grad) for output, grad in zip(reference_op(*arguments), grads) if grad is not None and output.requires_grad]
    result = [None] * len(inputs)
    if pairs:
        gradients = torch.autograd.grad(
            [output for output, _ in pairs], [arguments[i] for i in wanted], [grad for _, grad in pairs],
            retain_graph=True, create_graph=True, allow_unused=True,
        )
        for i, gradient in zip(wanted, gradients):
            result[i] = gradient
    return result
