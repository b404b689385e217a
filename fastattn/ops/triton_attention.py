"""The Triton attention ops: ``torch.ops.fastattn.triton_attention_forward`` and
``..._backward`` (``torch.library.triton_op``, so torch.compile sees the kernels; called
past the dispatcher in plain eager calls, ``fastattn.ops.triton_eager``),
their autograd glue, and the launch of the kernels in ``fastattn.kernels``.

The ops take the three kernel score kinds ("dot", "cosine", "additive") with the
same arguments as the C++ ``fastattn::attention_forward``; the six public scores are
mapped onto them by ``fastattn.ops.attention`` (this module passes :func:`fused`).
float16 and bfloat16 run natively with float32 accumulation; the caller sends float64
to the reference, and :func:`fused` sends it features past what the kernels hold on
chip.  A decode step with too few (query block, batch) programs to fill
the GPU splits its keys across programs and merges them (flash-decoding).  The
additive backward adds its grad_query and grad_v with atomics, so under
``torch.use_deterministic_algorithms(True)`` it raises (or warns, with
``warn_only=True``) as torch's own nondeterministic ops do.  A forward's or backward's
checks, sizes and configs are a plan (``_ForwardPlan``, ``_BackwardPlan``), which eager
calls with the same layout and arguments reuse (``triton_launch.LAUNCH_PLANS``).
"""

import warnings
from typing import Optional

import torch
from torch import Tensor

from fastattn.kernels.attention_backward import attention_grad_key_value_kernel, attention_grad_query_kernel
from fastattn.kernels.attention_forward import (
    attention_combine_kernel,
    attention_forward_kernel,
    attention_weights_kernel,
)
from fastattn.kernels.attention_tiles import ADDITIVE, COSINE, DOT
from fastattn.ops import higher_order, triton_checks, triton_configs
from fastattn.ops.triton_configs import SPLIT_GRANULE
from fastattn.ops.triton_eager import triton_op
from fastattn.reference.scores import cosine_norm_floor
from fastattn.ops.triton_launch import (
    INTERPRETED,
    SMALLEST_BLOCK,
    TARGET_PROGRAMS,
    Launcher,
    LAUNCH_PLANS,
    RepeatedLaunch,
    ceil_div,
    dot_precision,
    power_of_two_block,
)

SCORE_KINDS = {"dot": DOT, "cosine": COSINE, "additive": ADDITIVE}
# Cosine logits within [-|scale|, |scale|] run without a running maximum while
# exp(-2 |scale|), the smallest probability, stays normal in the values' dtype (it is
# cast to it for the dot): float32 / bfloat16 to |scale| 40, float16 (normal down to
# 6e-5) to 4; past that a float16 row's probabilities underflowed to a zero context.
BOUNDED_SCALE_LIMITS = {torch.float16: 4.0}
BOUNDED_SCALE_LIMIT = 40.0
# (kernel, whether the score is additive) -> its Launcher; dot and cosine share the tiling;
# "decode", "decode weights", "decode grad_query", "decode grad_key_value": those kernels on a
# decode step (T = 1), one query row a block (the backward's for the additive score only).
LAUNCHERS = {
    ("forward", False): Launcher(attention_forward_kernel, triton_configs.FORWARD_DOT),
    ("forward", True): Launcher(attention_forward_kernel, triton_configs.FORWARD_ADDITIVE),
    ("decode", False): Launcher(attention_forward_kernel, triton_configs.FORWARD_DOT_DECODE),
    ("decode", True): Launcher(attention_forward_kernel, triton_configs.FORWARD_ADDITIVE_DECODE),
    ("weights", False): Launcher(attention_weights_kernel, triton_configs.WEIGHTS_DOT),
    ("weights", True): Launcher(attention_weights_kernel, triton_configs.WEIGHTS_ADDITIVE),
    ("decode weights", False): Launcher(attention_weights_kernel, triton_configs.WEIGHTS_DOT_DECODE),
    ("decode weights", True): Launcher(attention_weights_kernel, triton_configs.WEIGHTS_ADDITIVE_DECODE),
    ("grad_query", False): Launcher(attention_grad_query_kernel, triton_configs.GRAD_QUERY_DOT),
    ("grad_query", True): Launcher(attention_grad_query_kernel, triton_configs.GRAD_QUERY_ADDITIVE),
    ("grad_key_value", False): Launcher(attention_grad_key_value_kernel, triton_configs.GRAD_KEY_VALUE_DOT),
    ("grad_key_value", True): Launcher(attention_grad_key_value_kernel, triton_configs.GRAD_KEY_VALUE_ADDITIVE),
    ("decode grad_query", True): Launcher(attention_grad_query_kernel, triton_configs.GRAD_QUERY_ADDITIVE_DECODE),
    ("decode grad_key_value", True): Launcher(
        attention_grad_key_value_kernel, triton_configs.GRAD_KEY_VALUE_ADDITIVE_DECODE
    ),
}
COMBINE_LAUNCHER = Launcher(attention_combine_kernel, triton_configs.COMBINE)
# tanh.approx.f32 errs by about 2^-11 relative: below the rounding of 16-bit inputs,
# too coarse for float32 ones (and not available under the interpreter).
HARDWARE_TANH_DTYPES = () if INTERPRETED else (torch.float16, torch.bfloat16)
# The backward's softmax row term is not taken from the forward's outputs, as
# delta_t = dC_t . c_t + sum_j w_tj dW_tj: in a peaked row p_j (g_j dA_j - delta_t) cancels
# to a small difference that the rounding of the context swamps (float16 additive, D = 128:
# grad_keys 3x the float16 reference run's error; float32 scaled_dot at scale 30: grad_keys
# 29x the float32 run's).  The query kernel's first launch sums it from the gradients' own
# float32 tiles, shifted by the most probable key's g dA (``_shifted_row_term_update``),
# which then cancels exactly at that key: one more pass over the keys.


def _rows(tensor: Tensor) -> Tensor:
    """``tensor`` with unit stride in its last dimension, which the kernels assume (the
    others are passed as strides)."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _kernel_tensors(query, keys, values, v, bias, lengths, key_padding_mask, center) -> list[Tensor]:
    """The eight tensors the kernels read, as they index them: rows with unit stride, the
    optional ones contiguous (an absent one: the query, never read: its flag is off), the key
    padding mask's bools as uint8 (a view).  Keys (1, S, D) shared by the batch stay so: the
    kernels read them with a batch stride of 0 (``_problem``).  The kernels clamp lengths to [0, S]."""
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous().view(torch.uint8)
    query = _rows(query)
    optional = (v, bias, lengths, key_padding_mask, center)
    absent_or_contiguous = (query if tensor is None else tensor.contiguous() for tensor in optional)
    return [query, _rows(keys), _rows(values), *absent_or_contiguous]


def _problem(op, query, keys, values, v, bias, score, scale, lengths, key_padding_mask, causal, window, center,
             gaussian):
    """The checked arguments' scalars as the kernels take them, for their tensors as
    ``_kernel_tensors`` lays them out: (strides, sizes and scalars, constexpr flags)."""
    triton_checks.attention(op, query, keys, values, v, bias, score, tuple(SCORE_KINDS), scale, lengths,
                            key_padding_mask, window, center, gaussian)
    query, keys, values = _kernel_tensors(query, keys, values, v, bias, lengths, key_padding_mask, center)[:3]
    batch, query_length, features = query.shape
    source_length, value_features = keys.shape[1], values.shape[2]
    keys_batch_stride = keys.stride(0) if keys.shape[0] == batch else 0
    strides = [query.stride(0), query.stride(1), keys_batch_stride, keys.stride(1), values.stride(0), values.stride(1)]
    # A window wider than both sequences is all of them; clamping keeps it a 32-bit integer.
    width = -1 if window is None else min(window, 2**30)
    inverse_two_sigma_squared = 2.0 / (window * window) if gaussian else 0.0
    sizes = [query_length, source_length, features, value_features, float(scale), cosine_norm_floor(query.dtype),
             width, inverse_two_sigma_squared]
    kind = SCORE_KINDS[score]
    flags = dict(
        SCORE_KIND=kind, HAS_BIAS=bias is not None, HAS_LENGTHS=lengths is not None,
        HAS_KPM=key_padding_mask is not None, CAUSAL=causal, HAS_WINDOW=window is not None,
        HAS_CENTER=center is not None, GAUSSIAN=gaussian, HARDWARE_TANH=query.dtype in HARDWARE_TANH_DTYPES,
        DOT_PRECISION=dot_precision(query.dtype),
    )
    if kind != ADDITIVE:  # additive takes its feature tiles from its configs
        flags["BLOCK_D"] = SMALLEST_BLOCK if INTERPRETED else power_of_two_block(features, cap=128)
        flags["BLOCK_D_POLY"] = 0
    return strides, sizes, flags


def _split_count(batch: int, query_length: int, source_length: int) -> int:
    """How many programs share the keys of one query block (1: no split)."""
    query_blocks = ceil_div(query_length, SMALLEST_BLOCK)
    # 0: an empty batch or source, nothing to split (an empty source's rows are all masked)
    if batch * query_blocks * source_length == 0 or batch * query_blocks >= TARGET_PROGRAMS:
        return 1
    return min(ceil_div(source_length, SPLIT_GRANULE), ceil_div(TARGET_PROGRAMS, batch * query_blocks))


class _ForwardPlan:
    """A forward's checked sizes and launches, fixed by its inputs' shapes, strides, dtypes
    and devices and its other arguments (``LAUNCH_PLANS``), run on the tensors of a call:
    the forward kernel, the combine of its key splits, the weights kernel."""

    def __init__(self, query, keys, values, v, bias, score, scale, lengths, key_padding_mask, causal, window, center,
                 gaussian, return_weights):
        strides, sizes, flags = _problem("triton_attention_forward", query, keys, values, v, bias, score, scale,
                                         lengths, key_padding_mask, causal, window, center, gaussian)
        batch, query_length, source_length = query.shape[0], query.shape[1], keys.shape[1]
        value_features = values.shape[2]
        block_dv = power_of_two_block(value_features)
        splits = _split_count(batch, query_length, source_length)
        split_size = ceil_div(ceil_div(source_length, splits), SPLIT_GRANULE) * SPLIT_GRANULE
        self.splits = ceil_div(source_length, split_size) if source_length else 1
        self.context_shape = (batch, query_length, value_features)
        self.stats_shape = (batch, query_length, 2)
        self.partial_shapes = ((batch, self.splits, query_length, block_dv), (batch, self.splits, query_length))
        additive = flags["SCORE_KIND"] == ADDITIVE
        self.forward = RepeatedLaunch(
            LAUNCHERS["decode" if query_length == 1 else "forward", additive],
            lambda meta: (ceil_div(query_length, meta["BLOCK_T"]) * batch, self.splits),
            (*strides, query_length * value_features, value_features, *sizes, split_size),
            **flags, SPLIT=self.splits > 1, BLOCK_DV=block_dv,
            BOUNDED=flags["SCORE_KIND"] == COSINE
            and abs(scale) <= BOUNDED_SCALE_LIMITS.get(values.dtype, BOUNDED_SCALE_LIMIT),
        )
        self.combine = RepeatedLaunch(
            COMBINE_LAUNCHER, lambda meta: (ceil_div(query_length, meta["BLOCK_T"]) * batch,),
            (query_length * value_features, value_features, query_length, value_features, self.splits),
            BLOCK_DV=block_dv,
        )
        self.weights_shape = (batch, query_length, source_length) if return_weights else None
        weight_sizes = [size for index, size in enumerate(sizes) if index != 3]  # no Dv
        self.weights = RepeatedLaunch(
            LAUNCHERS["decode weights" if query_length == 1 else "weights", additive],
            lambda meta: (ceil_div(query_length, meta["BLOCK_T"]) * batch, ceil_div(source_length, meta["BLOCK_S"])),
            (*strides[:4], *weight_sizes), **flags,
        )

    def __call__(self, query, keys, values, v, bias, lengths, key_padding_mask, center):
        tensors = _kernel_tensors(query, keys, values, v, bias, lengths, key_padding_mask, center)
        context = query.new_empty(self.context_shape)
        row_stats = query.new_empty(self.stats_shape, dtype=torch.float32)
        if self.splits > 1:
            acc_shape, row_shape = self.partial_shapes
            partials = [query.new_empty(shape, dtype=torch.float32) for shape in (acc_shape, row_shape, row_shape)]
            self.forward(*tensors, context, row_stats, *partials)
            self.combine(*partials, context, row_stats)
        else:
            self.forward(*tensors, context, row_stats, row_stats, row_stats, row_stats)
        if self.weights_shape is None:
            return context, query.new_empty(0), row_stats
        weights = query.new_zeros(self.weights_shape)
        self.weights(*tensors[:2], *tensors[3:], row_stats, weights)
        return context, weights, row_stats


@triton_op("fastattn::triton_attention_forward")
def triton_attention_forward(
    query: Tensor, keys: Tensor, values: Tensor, v: Optional[Tensor], bias: Optional[Tensor], score: str,
    scale: float, lengths: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool,
    window: Optional[int], center: Optional[Tensor], gaussian: bool, return_weights: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (context (N, T, Dv), weights (N, T, S) or empty, row statistics (N, T, 2) float32: each row's
    softmax shift m and 1 / l, logsumexp = m + log l, (+inf, 0) on empty rows; the backward's
    probabilities exp(e - m) / l keep the accuracy exp(e - logsumexp) loses in peaked rows)."""
    inputs = (query, keys, values, v, bias, lengths, key_padding_mask, center)
    plan = LAUNCH_PLANS.get(
        "triton_attention_forward", inputs, (score, scale, causal, window, gaussian, return_weights),
        lambda: _ForwardPlan(query, keys, values, v, bias, score, scale, lengths, key_padding_mask, causal, window,
                             center, gaussian, return_weights),
    )
    return plan(*inputs)


class _BackwardPlan:
    """A backward's checked sizes and launches for one layout of its inputs (``LAUNCH_PLANS``),
    run on the tensors of a call: the query kernel (twice for the dot family: the row terms,
    then the gradient), the key-value kernel (with ``values_are_keys``: dK + dV into grad_keys)."""

    def __init__(self, grad_context, grad_weights, query, keys, values, v, bias, score, scale, lengths,
                 key_padding_mask, causal, window, center, gaussian, row_stats, values_are_keys):
        op = "triton_attention_backward"
        strides, sizes, flags = _problem(op, query, keys, values, v, bias, score, scale, lengths, key_padding_mask,
                                         causal, window, center, gaussian)
        triton_checks.attention_backward(op, grad_context, grad_weights, query, keys, values, row_stats, row_stats=True,
                                         values_are_keys=values_are_keys)
        self.values_are_keys = values_are_keys
        grad_context = _rows(grad_context)
        batch, query_length, features = query.shape
        source_length, value_features = keys.shape[1], values.shape[2]
        self.additive = flags["SCORE_KIND"] == ADDITIVE
        self.shared_keys = keys.shape[0] != batch
        self.shapes = (batch, query_length, source_length, features, value_features)
        self.grad_center_shape = center.shape if center is not None and gaussian else (0,)
        scalars = (*strides, grad_context.stride(0), grad_context.stride(1), *sizes)
        gradient_flags = dict(
            **flags, HAS_GRAD_WEIGHTS=grad_weights is not None,
            BLOCK_DQ=power_of_two_block(features), BLOCK_DV=power_of_two_block(value_features),
        )

        def query_grid(meta):
            return (ceil_div(query_length, meta["BLOCK_T"]) * batch,)

        one_row = "decode " if self.additive and query_length == 1 else ""  # see LAUNCHERS
        self.row_terms = RepeatedLaunch(LAUNCHERS[one_row + "grad_query", self.additive], query_grid, scalars,
                                        **gradient_flags, ROW_TERMS_GIVEN=False)
        # additive: the first launch's row terms are all the key-value kernel needs, and it gives grad_query
        self.grad_query = None if self.additive else RepeatedLaunch(
            LAUNCHERS["grad_query", False], query_grid, scalars, **gradient_flags, ROW_TERMS_GIVEN=True)
        self.grad_key_value = RepeatedLaunch(
            LAUNCHERS[one_row + "grad_key_value", self.additive],
            lambda meta: (ceil_div(source_length, meta["BLOCK_S"]) * batch,), scalars, **gradient_flags,
            VALUES_ARE_KEYS=values_are_keys,
        )

    def __call__(self, grad_context, grad_weights, query, keys, values, v, bias, lengths, key_padding_mask,
                 center, row_stats):
        tensors = _kernel_tensors(query, keys, values, v, bias, lengths, key_padding_mask, center)
        grad_context = _rows(grad_context)
        grad_weights = grad_context if grad_weights is None else grad_weights.contiguous()
        batch, query_length, source_length, features, value_features = self.shapes
        grad_query = query.new_zeros(batch, query_length, features, dtype=torch.float32)
        grad_keys = query.new_zeros(batch, source_length, features, dtype=torch.float32)
        # values_are_keys: no dV of its own (the kernel is given grad_keys there and writes none)
        grad_values = None if self.values_are_keys else query.new_empty(batch, source_length, value_features,
                                                                        dtype=torch.float32)
        grad_v = query.new_zeros(features if self.additive else 0, dtype=torch.float32)
        grad_center = query.new_zeros(self.grad_center_shape, dtype=torch.float32)
        row_terms = query.new_empty(batch, query_length, 2, dtype=torch.float32)  # (shift, row term) per row
        upstream = (grad_context, grad_weights, row_stats.contiguous(), row_terms)
        self.row_terms(*tensors, *upstream, grad_query, grad_center if grad_center.numel() else grad_query)
        if self.grad_query is not None:
            self.grad_query(*tensors, *upstream, grad_query, grad_query)
        self.grad_key_value(*tensors, *upstream, grad_query, grad_keys,
                            grad_keys if grad_values is None else grad_values, grad_v if self.additive else grad_keys)
        grad_bias = grad_query.sum((0, 1)) if self.additive and bias is not None else query.new_empty(0)
        if self.shared_keys:
            grad_keys = grad_keys.sum(0, keepdim=True)
        dtype = query.dtype
        return (
            grad_query.to(dtype), grad_keys.to(dtype),
            query.new_empty(0) if grad_values is None else grad_values.to(dtype), grad_v.to(dtype), grad_bias.to(dtype),
            grad_center.to(center.dtype if center is not None else dtype),
        )


@triton_op("fastattn::triton_attention_backward")
def triton_attention_backward(
    grad_context: Tensor, grad_weights: Optional[Tensor], query: Tensor, keys: Tensor, values: Tensor,
    v: Optional[Tensor], bias: Optional[Tensor], score: str, scale: float, lengths: Optional[Tensor],
    key_padding_mask: Optional[Tensor], causal: bool, window: Optional[int], center: Optional[Tensor], gaussian: bool,
    row_stats: Tensor, values_are_keys: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (grad query, keys, values, v, bias, center); the last three are empty when absent.
    values_are_keys (one tensor given as both, as fastattn::attention_backward's): grad keys
    is that tensor's gradient, grad values empty."""
    tensors = (grad_context, grad_weights, query, keys, values, v, bias, lengths, key_padding_mask, center, row_stats)
    plan = LAUNCH_PLANS.get(
        "triton_attention_backward", tensors, (score, scale, causal, window, gaussian, values_are_keys),
        lambda: _BackwardPlan(grad_context, grad_weights, query, keys, values, v, bias, score, scale, lengths,
                              key_padding_mask, causal, window, center, gaussian, row_stats, values_are_keys),
    )
    if plan.additive:
        _alert_not_deterministic("fastattn::triton_attention_backward with the additive score")
    return plan(*tensors)


def _alert_not_deterministic(caller: str) -> None:
    """What torch's nondeterministic ops do under torch.use_deterministic_algorithms(True)."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{caller} does not have a deterministic implementation (it adds gradients with atomics), but "
        "torch.use_deterministic_algorithms(True) is on: use the cuda backend, whose backward is deterministic "
        "in this mode, or turn it off (warn_only=True warns instead)"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message)
    else:
        raise RuntimeError(message)


def _forward_input_gradients(grads, v, bias, center, gaussian, values_are_keys=False):
    """The gradients an attention backward op returns (grad_query, grad_keys,
    grad_values, grad_v, grad_bias, grad_center), laid out per input of the forward op
    (the schema of attention_forward, which the Triton op shares); with values_are_keys,
    grad_keys is the one tensor's and the values get none."""
    grad_query, grad_keys, grad_values, grad_v, grad_bias, grad_center = grads
    return (
        grad_query, grad_keys, None if values_are_keys else grad_values,
        grad_v if v is not None else None,
        grad_bias if bias is not None else None,
        None, None, None, None, None, None,
        grad_center if center is not None and gaussian else None,
        None, None,
    )


def _save_for_backward(ctx, inputs, output):
    (query, keys, values, v, bias, score, scale, lengths, key_padding_mask, causal, window, center, gaussian,
     return_weights) = inputs
    row_stats = output[2]  # the backward needs neither the context nor the weights
    # The masks as they are now: the caller may change its own in place before the backward.
    lengths, key_padding_mask = (None if mask is None else mask.clone() for mask in (lengths, key_padding_mask))
    ctx.save_for_backward(query, keys, values, v, bias, lengths, key_padding_mask, center, row_stats)
    ctx.score, ctx.scale, ctx.causal, ctx.window, ctx.gaussian = score, scale, causal, window, gaussian
    ctx.values_are_keys = keys is values  # one gradient for the one tensor (see triton_attention_backward)
    ctx.return_weights = return_weights


def _attention_backward(ctx, grad_context, grad_weights, _grad_row_stats):
    query, keys, values, v, bias, lengths, key_padding_mask, center, row_stats = ctx.saved_tensors
    inputs = (query, keys, values, v, bias, None, None, None, None, None, None, center if ctx.gaussian else None)
    if higher_order.graph_wanted(inputs):  # create_graph=True: through the differentiable form
        arguments = (query, keys, values, v, bias, ctx.score, ctx.scale, lengths, key_padding_mask, ctx.causal,
                     ctx.window, center, ctx.gaussian)
        grads = higher_order.gradients_through_reference(
            torch.ops.fastattn.attention_reference, arguments,
            (grad_context, grad_weights if ctx.return_weights else None), inputs,
        )
        return _forward_input_gradients((*grads[:5], grads[11]), v, bias, center, ctx.gaussian)
    if grad_context is None:
        grad_context = query.new_zeros(*query.shape[:2], values.shape[-1])
    use_grad_weights = ctx.return_weights and grad_weights is not None
    grads = triton_attention_backward(
        grad_context.contiguous(), grad_weights.contiguous() if use_grad_weights else None,
        query, keys, values, v, bias, ctx.score, ctx.scale, lengths, key_padding_mask, ctx.causal, ctx.window,
        center, ctx.gaussian, row_stats, ctx.values_are_keys,
    )
    return _forward_input_gradients(grads, v, bias, center, ctx.gaussian, ctx.values_are_keys)


triton_attention_forward.register_autograd(_attention_backward, setup_context=_save_for_backward)


# The kernels hold a row's features whole (BLOCK_DQ >= D and BLOCK_DV >= Dv, powers of two).
# Past these blocks a launch's tiles no longer fit the 232,448 bytes of shared memory an
# H100/H200 block may take, and it fails ("out of resource: shared memory"), so such calls
# run the reference.  Measured from each kernel's sm_90 compile with the config an untuned
# launch takes, at D and Dv 256..4096, T 1 and 64 (float16 and bfloat16 alike; float32
# the tighter of its TF32 and IEEE precisions): unmeasured past 4096.
MEASURED_FEATURE_BLOCK = 4096


def fits_on_chip(query: Tensor, keys: Tensor, values: Tensor, kernel_score: str, backward: bool) -> bool:
    """Whether the kernels' launches for this problem (and its backward) fit on chip."""
    block_d, block_dv = power_of_two_block(keys.shape[-1]), power_of_two_block(values.shape[-1])
    if max(block_d, block_dv) > MEASURED_FEATURE_BLOCK:
        return False
    additive, multi_query = kernel_score == "additive", query.shape[1] > 1
    if query.dtype in (torch.float16, torch.bfloat16):
        forward_fits = block_dv <= 2048 or not (additive and multi_query)
        backward_fits = additive or block_d + block_dv <= 6144
    else:
        forward_fits = block_dv <= (1024 if additive else 2048) or not multi_query
        backward_fits = block_dv <= 1024 and (additive or block_d <= 2048)
    return forward_fits and (backward_fits or not backward)


def fused(query, keys, values, v, bias, kernel_score, scale, masking, return_weights):
    """The ``fused`` kernel call of ``fastattn.ops.attention``'s score mapping: the
    reference's maths where the features do not fit on chip (:func:`fits_on_chip`)."""
    center = masking["center"]
    backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, keys, values, v, bias, center)
    )
    if not fits_on_chip(query, keys, values, kernel_score, backward):
        context, weights = higher_order.attention_reference(
            query, keys, values, v, bias, kernel_score, float(scale), masking["lengths"],
            masking["key_padding_mask"], masking["causal"], masking["window"], center, masking["gaussian"],
        )
        return context, (weights if return_weights else None)
    context, weights, _ = triton_attention_forward(
        query.contiguous(), keys, values.contiguous(), v, bias, kernel_score, float(scale),
        masking["lengths"], masking["key_padding_mask"], masking["causal"], masking["window"],
        None if masking["center"] is None else masking["center"].contiguous(), masking["gaussian"], return_weights,
    )
    return context, (weights if return_weights else None)
