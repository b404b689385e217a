"""Fused attention forward: scores, masked online softmax, Gaussian factor and context
in one pass over key blocks (flash-attention style), for the three score kinds of
``attention_tiles``.

Grid: (query blocks x batch, key splits), the batch on axis 0 with the query blocks
(``attention_tiles.block_and_sequence``).  With one split each program writes the
normalised context and the row statistics (m, 1 / l): the softmax's shift and the
inverse of its sum, in place of the log-sum-exp m + log l (see
``attention_tiles.store_row_statistics``; (+inf, 0) for a row with no valid key, whose
context is zero).  With several splits (flash-decoding, for a decode step or a
short query block when the batch alone cannot fill the GPU) each program covers
``split_size`` keys and writes its unnormalised partial context, running max and sum;
``attention_combine_kernel`` merges them.  ``attention_weights_kernel`` writes the
normalised weights from the row statistics, one (query block × key block) tile per
program (grid: (query blocks x batch, key blocks)).  Cosine logits are bounded by
|scale|, which then serves as the softmax maximum from the start (``BOUNDED``: no
running maximum, no rescaling).  Key blocks outside the mask or window are skipped,
never loaded.  A decode step runs with one query
row a program (``BLOCK_T`` = 1: nothing spent on the absent rows of a 16-row block, the
additive score's tanh above all), its scores and values summed on the FMA units.  The
value dimension is held whole (``BLOCK_DV`` >= Dv) in registers.  Offsets: the batch index is
64-bit (its base offset can pass 2^31), offsets within one batch element are 32-bit
(``fastattn.ops.triton_launch`` refuses tensors where those could overflow).
"""

import triton
import triton.language as tl

from fastattn.kernels.attention_tiles import (
    block_and_sequence,
    block_scores,
    gaussian_factor,
    key_range,
    row_centers,
    row_length,
    store_row_statistics,
    tile_probabilities,
    tile_product,
    tile_valid,
)


@triton.jit
def attention_forward_kernel(
    Q, K, V, VA, BIAS, LENGTHS, KPM, CENTER, OUT, STATS, PARTIAL_ACC, PARTIAL_MAX, PARTIAL_SUM,
    stride_qn, stride_qt, stride_kn, stride_ks, stride_vn, stride_vs, stride_on, stride_ot,
    T, S, D, DV, scale, norm_floor, window, inverse_two_sigma_squared, split_size,
    SCORE_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CENTER: tl.constexpr, GAUSSIAN: tl.constexpr,
    SPLIT: tl.constexpr, BOUNDED: tl.constexpr, HARDWARE_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_POLY: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    t_block, n = block_and_sequence(T, BLOCK_T)
    split = tl.program_id(1)
    t_start = t_block * BLOCK_T
    offs_t = t_start + tl.arange(0, BLOCK_T)
    offs_dv = tl.arange(0, BLOCK_DV)
    length = row_length(LENGTHS, n, S, HAS_LENGTHS)
    centers = row_centers(CENTER, n * T, offs_t, T, HAS_CENTER)
    lo, hi = key_range(t_start, offs_t, centers, T, S, length, window, HAS_LENGTHS, CAUSAL, HAS_WINDOW, BLOCK_S)
    if SPLIT:
        lo = tl.maximum(lo, split * split_size)
        hi = tl.minimum(hi, (split + 1) * split_size)

    if BOUNDED:
        # Cosine logits lie in [-|scale|, |scale|]: |scale| is a maximum known up front,
        # so no running maximum and no rescaling (the caller keeps exp(-2|scale|) normal).
        running_max = tl.full((BLOCK_T,), 1.0, tl.float32) * tl.abs(scale)
    else:
        running_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_DV), dtype=tl.float32)
    for j_start in range(lo, hi, BLOCK_S):
        offs_j = j_start + tl.arange(0, BLOCK_S)
        scores, _, _ = block_scores(
            Q, K, VA, BIAS, n * stride_qn, n * stride_kn, offs_t, offs_j, T, S, D, stride_qt, stride_ks, scale, norm_floor,
            SCORE_KIND, HAS_BIAS, BLOCK_T, BLOCK_S, BLOCK_D, BLOCK_D_POLY, HARDWARE_TANH, DOT_PRECISION,
        )
        valid = tile_valid(offs_t, offs_j, centers, T, S, length, KPM, n * S, window, HAS_LENGTHS, HAS_KPM, CAUSAL, HAS_WINDOW)
        scores = tl.where(valid, scores, float("-inf"))
        values = tl.load(
            V + n * stride_vn + offs_j[:, None] * stride_vs + offs_dv[None, :],
            mask=(offs_j < S)[:, None] & (offs_dv < DV)[None, :], other=0.0,
        )
        if BOUNDED:
            p = tl.exp(scores - running_max[:, None])
            running_sum += tl.sum(p, axis=1)
            if GAUSSIAN:
                p = p * gaussian_factor(offs_j, centers, inverse_two_sigma_squared)
            acc += tile_product(p, values, DOT_PRECISION, BLOCK_T == 1)
        else:
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(scores - safe_max[:, None])
            rescale = tl.exp(running_max - safe_max)
            running_sum = running_sum * rescale + tl.sum(p, axis=1)
            if GAUSSIAN:
                p = p * gaussian_factor(offs_j, centers, inverse_two_sigma_squared)
            acc = acc * rescale[:, None] + tile_product(p, values, DOT_PRECISION, BLOCK_T == 1)
            running_max = new_max

    row_in = offs_t < T
    if SPLIT:
        partial = (n * tl.num_programs(1) + split) * T
        tl.store(PARTIAL_ACC + partial * BLOCK_DV + offs_t[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=row_in[:, None])
        tl.store(PARTIAL_MAX + partial + offs_t, running_max, mask=row_in)
        tl.store(PARTIAL_SUM + partial + offs_t, running_sum, mask=row_in)
    else:
        context = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
        out_mask = row_in[:, None] & (offs_dv < DV)[None, :]
        tl.store(OUT + n * stride_on + offs_t[:, None] * stride_ot + offs_dv[None, :], context, mask=out_mask)
        store_row_statistics(STATS, n * T, offs_t, T, running_max, running_sum)


@triton.jit
def attention_combine_kernel(
    PARTIAL_ACC, PARTIAL_MAX, PARTIAL_SUM, OUT, STATS, stride_on, stride_ot, T, DV, splits,
    BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the per-split partial results of one query block (flash-decoding's reduce)."""
    t_block, n = block_and_sequence(T, BLOCK_T)
    offs_t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_in = offs_t < T
    overall_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    for split in range(0, splits):
        partial = (n * splits + split) * T
        overall_max = tl.maximum(overall_max, tl.load(PARTIAL_MAX + partial + offs_t, mask=row_in, other=float("-inf")))
    safe_max = tl.where(overall_max == float("-inf"), 0.0, overall_max)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_DV), dtype=tl.float32)
    for split in range(0, splits):
        partial = (n * splits + split) * T
        rescale = tl.exp(tl.load(PARTIAL_MAX + partial + offs_t, mask=row_in, other=float("-inf")) - safe_max)
        total += tl.load(PARTIAL_SUM + partial + offs_t, mask=row_in, other=0.0) * rescale
        partial_acc = tl.load(
            PARTIAL_ACC + partial * BLOCK_DV + offs_t[:, None] * BLOCK_DV + offs_dv[None, :], mask=row_in[:, None], other=0.0
        )
        acc += partial_acc * rescale[:, None]
    context = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(OUT + n * stride_on + offs_t[:, None] * stride_ot + offs_dv[None, :], context, mask=row_in[:, None] & (offs_dv < DV)[None, :])
    store_row_statistics(STATS, n * T, offs_t, T, safe_max, total)


@triton.jit
def attention_weights_kernel(
    Q, K, VA, BIAS, LENGTHS, KPM, CENTER, STATS, WEIGHTS,
    stride_qn, stride_qt, stride_kn, stride_ks,
    T, S, D, scale, norm_floor, window, inverse_two_sigma_squared,
    SCORE_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CENTER: tl.constexpr, GAUSSIAN: tl.constexpr,
    HARDWARE_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D_POLY: tl.constexpr,
):
    """weights = exp(score - m) / l * Gaussian factor on one tile; WEIGHTS starts zeroed
    and tiles outside the block's key range are left alone (their weights are all zero,
    so any tiling writes the same tensor and a rerun is harmless)."""
    t_block, n = block_and_sequence(T, BLOCK_T)
    j_block = tl.program_id(1)
    t_start = t_block * BLOCK_T
    offs_t = t_start + tl.arange(0, BLOCK_T)
    offs_j = j_block * BLOCK_S + tl.arange(0, BLOCK_S)
    length = row_length(LENGTHS, n, S, HAS_LENGTHS)
    centers = row_centers(CENTER, n * T, offs_t, T, HAS_CENTER)
    lo, hi = key_range(t_start, offs_t, centers, T, S, length, window, HAS_LENGTHS, CAUSAL, HAS_WINDOW, BLOCK_S)
    if (j_block * BLOCK_S < hi) & (j_block * BLOCK_S + BLOCK_S > lo):
        scores, _, _ = block_scores(
            Q, K, VA, BIAS, n * stride_qn, n * stride_kn, offs_t, offs_j, T, S, D, stride_qt, stride_ks, scale, norm_floor,
            SCORE_KIND, HAS_BIAS, BLOCK_T, BLOCK_S, BLOCK_D, BLOCK_D_POLY, HARDWARE_TANH, DOT_PRECISION,
        )
        valid = tile_valid(offs_t, offs_j, centers, T, S, length, KPM, n * S, window, HAS_LENGTHS, HAS_KPM, CAUSAL, HAS_WINDOW)
        weights = tile_probabilities(scores, valid, STATS, n * T, offs_t, T)
        if GAUSSIAN:
            weights = weights * gaussian_factor(offs_j, centers, inverse_two_sigma_squared)
        in_tile = (offs_t < T)[:, None] & (offs_j < S)[None, :]
        tl.store(WEIGHTS + n * T * S + offs_t[:, None] * S + offs_j[None, :], weights, mask=in_tile)
