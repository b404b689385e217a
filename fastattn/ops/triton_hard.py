"""Hard attention after the soft weights on Triton (kernels: fastattn.kernels.hard_attention):

- ``torch.ops.fastattn.triton_hard_attention(weights, values, sample, seed)`` -> (context,
  index, log_prob): one launch chooses a position per row (argmax, or a Philox draw
  reproducible for a fixed seed) and writes the outputs there, where the reference's
  ``hard_attention`` chooses with ``argmax`` or ``multinomial`` and then runs ``outputs_at``
  (about fifteen ATen ops);
- ``torch.ops.fastattn.triton_hard_attention_backward``: the gradients of the weights (from
  the log-probability's) and of the values (from the context's), two launches;
- ``hard_attention_outputs``, the ``outputs`` of ``fastattn.ops.attention.hard_attention``
  on the Triton backend; the seed comes from the caller's ``torch.Generator`` (or torch's
  default one), so ``torch.manual_seed`` and ``generator.manual_seed`` make the draws repeat.

The backward's index comes from the forward, but the op can be called with any: a
position outside [0, S) is never read or written at, and refused after the launch (on the
CPU, a ValueError; on a GPU, ``torch._assert_async``, a device-side assertion as torch's own
index ops make: checking before the launch would wait for the device).
"""

from typing import Optional

import torch
import triton.language as tl
from torch import Tensor
from torch._library.triton import is_wrap_triton_enabled

from fastattn.kernels.hard_attention import (
    hard_attention_kernel, hard_attention_values_backward_kernel, hard_attention_weights_backward_kernel,
)
from fastattn.ops import higher_order, triton_checks
from fastattn.ops.triton_configs import HARD_ATTENTION, HARD_ATTENTION_VALUES_BACKWARD, HARD_ATTENTION_WEIGHTS_BACKWARD
from fastattn.ops.triton_eager import triton_op
from fastattn.ops.triton_launch import Launcher, ceil_div

LAUNCHERS = {
    "forward": Launcher(hard_attention_kernel, HARD_ATTENTION),
    "weights_backward": Launcher(hard_attention_weights_backward_kernel, HARD_ATTENTION_WEIGHTS_BACKWARD),
    "values_backward": Launcher(hard_attention_values_backward_kernel, HARD_ATTENTION_VALUES_BACKWARD),
}
OUTSIDE_MESSAGE = "fastattn::triton_hard_attention_backward: index must hold positions in [0, S)"


def _accumulation(*tensors: Optional[Tensor]) -> tuple[torch.dtype, object]:
    """The kernels' sum dtype, torch's and Triton's: float64 for float64 inputs, else float32."""
    if any(tensor is not None and tensor.dtype == torch.float64 for tensor in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


@triton_op("fastattn::triton_hard_attention")
def triton_hard_attention(weights: Tensor, values: Tensor, sample: bool, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """weights (N, T, S), S >= 1, values (N, S, Dv) -> context (N, T, Dv) in the values'
    dtype, index (N, T) int64, log_prob (N, T) in the weights' dtype."""
    triton_checks.hard_attention_outputs("triton_hard_attention", weights, None, values)
    batch, queries, source_length = weights.shape
    value_dim = values.shape[2]
    context = values.new_empty(batch, queries, value_dim)
    index = weights.new_empty(batch, queries, dtype=torch.int64)
    log_prob = weights.new_empty(batch, queries)
    rows = batch * queries
    if rows and source_length == 0:
        raise ValueError(f"fastattn::triton_hard_attention: weights must have at least one position (S >= 1) to "
                         f"choose from, got shape {tuple(weights.shape)}")
    if rows:
        LAUNCHERS["forward"](
            lambda meta: (rows,), weights.contiguous(), values.contiguous(), context, index, log_prob, queries,
            source_length, value_dim, seed, SAMPLE=sample, tiny=torch.finfo(weights.dtype).tiny,
            ACC=_accumulation(weights, values)[1],
        )
    return context, index, log_prob


@triton_op("fastattn::triton_hard_attention_backward")
def triton_hard_attention_backward(
    grad_context: Optional[Tensor], grad_log_prob: Optional[Tensor], weights: Tensor, index: Tensor
) -> tuple[Tensor, Tensor]:
    """-> (grad_weights (N, T, S), grad_values (N, S, Dv) in grad_context's dtype); each
    empty when its output's gradient is absent."""
    op = "triton_hard_attention_backward"
    triton_checks.hard_attention_outputs_backward(op, grad_context, grad_log_prob, weights, index)
    batch, queries, source_length = weights.shape
    rows = batch * queries
    weights, index = weights.contiguous(), index.contiguous()
    grad_weights = torch.empty_like(weights) if grad_log_prob is not None else weights.new_empty(0)
    if grad_context is None:
        grad_values = weights.new_empty(0)
    else:
        grad_values = grad_context.new_zeros(batch, source_length, grad_context.shape[2])
    if rows == 0 or (grad_context is None and grad_log_prob is None):
        return grad_weights, grad_values
    sum_dtype, accumulation = _accumulation(weights, grad_context)
    factor = weights.new_empty(rows if grad_context is not None else 0, dtype=torch.float32)
    # The kernels' flag: float32, as the compile check zeroes the integer tensors a launch writes (indices).
    inside = torch.ones(1, dtype=torch.float32, device=weights.device)
    LAUNCHERS["weights_backward"](
        lambda meta: (rows,), weights, index, weights if grad_log_prob is None else grad_log_prob.contiguous(),
        grad_weights if grad_log_prob is not None else weights, factor, inside, source_length,
        HAS_GRAD_LOG_PROB=grad_log_prob is not None, WRITE_FACTOR=grad_context is not None,
        tiny=torch.finfo(weights.dtype).tiny, ACC=accumulation,
    )
    if grad_context is not None:
        value_dim = grad_context.shape[2]
        sums = grad_values if grad_values.dtype == sum_dtype else torch.zeros_like(grad_values, dtype=sum_dtype)
        LAUNCHERS["values_backward"](
            lambda meta: (batch, ceil_div(value_dim, meta["BLOCK_D"])), grad_context.contiguous(), index, factor, sums,
            queries, source_length, value_dim, ACC=accumulation,
        )
        if sums is not grad_values:
            grad_values.copy_(sums)
    if not is_wrap_triton_enabled() and inside.device.type == "cpu":  # eager on the CPU: the interpreter
        if not inside.item():
            raise ValueError(OUTSIDE_MESSAGE.replace("[0, S)", f"[0, S={source_length})"))
    else:
        torch._assert_async(inside, OUTSIDE_MESSAGE)
    return grad_weights, grad_values


def _save_for_backward(ctx, inputs, output):
    weights, values, _sample, _seed = inputs
    # The backward kernels read the weights and the index, not the values: those are kept
    # only for a gradient of a gradient.
    ctx.save_for_backward(weights, output[1], values if values.requires_grad else None)
    ctx.value_shape = values.shape
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its inputs get none


def _hard_attention_backward(ctx, grad_context, _grad_index, grad_log_prob):
    weights, index, values = ctx.saved_tensors
    wants_weights, wants_values = ctx.needs_input_grad[:2]
    grad_context = grad_context if wants_values else None
    grad_log_prob = grad_log_prob if wants_weights else None
    if higher_order.graph_wanted((weights, values)):  # create_graph=True: through the differentiable form
        if values is None:  # no gradient for them: the context does not depend on the weights
            values, grad_context = weights.new_zeros(*ctx.value_shape[:2], 0), None
        grads = higher_order.gradients_through_reference(
            torch.ops.fastattn.hard_attention_outputs_reference, (weights, index, values),
            (grad_context, grad_log_prob), (weights if wants_weights else None, None, values if wants_values else None),
        )
        return grads[0], grads[2], None, None
    grad_weights, grad_values = triton_hard_attention_backward(
        None if grad_context is None else grad_context.contiguous(), grad_log_prob, weights, index
    )
    return (grad_weights if grad_log_prob is not None else None,
            grad_values if grad_context is not None else None, None, None)


triton_hard_attention.register_autograd(_hard_attention_backward, setup_context=_save_for_backward)


def hard_attention_outputs(weights: Tensor, values: Tensor, sample: bool, generator: Optional[torch.Generator]):
    """The ``outputs`` of ``fastattn.ops.attention.hard_attention``: (context, index, log_prob)."""
    seed = 0
    if sample:
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
    return triton_hard_attention(weights, values, sample, seed)
