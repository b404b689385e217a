"""Fused attention backward, recomputing the scores and, from the forward's row
statistics (m, 1 / l), the probabilities p = exp(e - m) / l (no T×S matrices
stored), in three launches of two kernels so that every output has one writer:

- ``attention_grad_query_kernel`` with ``ROW_TERMS_GIVEN=False`` (grid: query blocks ×
  batch, on axis 0) walks the key blocks a query block can see and writes each row's softmax
  row terms (below) and the gradient of the local-p centers;
- the same kernel with ``ROW_TERMS_GIVEN=True`` walks them again for dQ (dot and
  cosine; not launched for additive, whose dQ' the key-value kernel gives);
- ``attention_grad_key_value_kernel`` (grid: key blocks × batch, on axis 0) walks the query
  blocks whose key range meets its keys and accumulates dK and dV (additive: also dQ'
  and dv, from the same tanh).

With w = softmax(e) * g (g the Gaussian factor, 1 without it), upstream gradients dC
(context) and dW (weights, optional) and dA = dC . v + dW, the score gradient is
dE_j = p_j (g_j dA_j - sum_i p_i g_i dA_i), taken as p_j ((g_j dA_j - s) - r) with the
row terms s = g_m dA_m of the row's most probable key m and r = sum_i p_i (g_i dA_i - s)
(the same, as the p_i add up to 1): exact at m, where a peaked row's two near-equal
sums would leave rounding noise of eps |dA_m| that the scale then multiplies into dQ
and dK (as fastattn's C++ kernels' ShiftedRowTerm).  The row terms come from the
gradients' own float32 tiles, not from the forward's context (dC . c rounds
differently from the tiles' dA_m, and a 16-bit context is rounded to 16 bits).
Dot and cosine hold dQ/dK whole (``BLOCK_DQ`` >= D) in registers; additive walks Da in
tiles of ``BLOCK_D`` and, in the key-value kernel,
takes each pair's tanh once for dQ', dK' and dv together, accumulated with float32
atomic adds into zeroed buffers (the caller sums dQ' over rows for the bias gradient:
d bias = sum over rows of dQ'), so that the additive backward takes 3 tanh per pair and
feature (the row terms' launch scores the pairs, the key-value kernel scores them again
and takes one tanh for all three gradients); those buffers must be re-zeroed between
autotuning trials (``reset_to_zero`` in fastattn.ops.triton_configs).
The additive tanh is split between the SFU and the FMA units as in the forward
(``BLOCK_D`` + ``BLOCK_D_POLY``, see ``attention_tiles``).  On a decode step the additive
score runs both kernels with one query row a block (``BLOCK_T`` = 1, the tile products on
the FMA units), as the forward does, where a 16-row block took the tanh of its 15 absent
rows' pairs too; dot and cosine keep 16-row blocks (``fastattn.ops.triton_configs``).
With ``VALUES_ARE_KEYS`` (one tensor given as keys and values, D = Dv) the key-value
kernel writes dK + dV to the keys' gradient (dot and cosine: added to the block's dK
before its store; additive: added with the atomics) and no dV.
The batch index is 64-bit, offsets within one batch element 32-bit.
"""

import triton
import triton.language as tl

from fastattn.kernels.attention_tiles import (
    additive_activation,
    block_and_sequence,
    block_scores,
    gaussian_factor,
    key_range,
    row_centers,
    row_length,
    rows_times_rows,
    tile_probabilities,
    tile_product,
    tile_valid,
    transposed_product,
)


@triton.jit
def _score_gradient(
    Q, K, V, VA, BIAS, KPM, GRAD_OUT, GRAD_WEIGHTS, STATS, ROW_TERMS,
    n, offs_t, offs_j, centers, length,
    stride_qn, stride_qt, stride_kn, stride_ks, stride_vn, stride_vs, stride_on, stride_ot,
    T, S, D, DV, scale, norm_floor, window, inverse_two_sigma_squared,
    SCORE_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, GAUSSIAN: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr,
    ROW_TERMS_GIVEN: tl.constexpr, HARDWARE_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_POLY: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One tile's (dE, p, g, dA, 1/|q|, 1/|k|, grad_out tile) — see the module docstring;
    without ROW_TERMS_GIVEN, p g dA in place of dE."""
    scores, inverse_query_norm, inverse_key_norm = block_scores(
        Q, K, VA, BIAS, n * stride_qn, n * stride_kn, offs_t, offs_j, T, S, D, stride_qt, stride_ks, scale, norm_floor,
        SCORE_KIND, HAS_BIAS, BLOCK_T, BLOCK_S, BLOCK_D, BLOCK_D_POLY, HARDWARE_TANH, DOT_PRECISION,
    )
    valid = tile_valid(offs_t, offs_j, centers, T, S, length, KPM, n * S, window, HAS_LENGTHS, HAS_KPM, CAUSAL, HAS_WINDOW)
    row_in = offs_t < T
    p = tile_probabilities(scores, valid, STATS, n * T, offs_t, T)
    offs_dv = tl.arange(0, BLOCK_DV)
    grad_out = tl.load(
        GRAD_OUT + n * stride_on + offs_t[:, None] * stride_ot + offs_dv[None, :],
        mask=row_in[:, None] & (offs_dv < DV)[None, :], other=0.0,
    )
    values = tl.load(
        V + n * stride_vn + offs_j[:, None] * stride_vs + offs_dv[None, :],
        mask=(offs_j < S)[:, None] & (offs_dv < DV)[None, :], other=0.0,
    )
    grad_attention = rows_times_rows(grad_out, values, DOT_PRECISION, BLOCK_T == 1)
    if HAS_GRAD_WEIGHTS:
        grad_attention += tl.load(
            GRAD_WEIGHTS + n * T * S + offs_t[:, None] * S + offs_j[None, :],
            mask=row_in[:, None] & (offs_j < S)[None, :], other=0.0,
        ).to(tl.float32)
    # The visible keys' dA only: a masked key's p = 0 must not meet an inf or NaN there (a
    # loss on the weights such as xlogy(w, w) has dW = inf where w = 0) and poison the row.
    grad_attention = tl.where(valid, grad_attention, 0.0)
    factor = tl.full((BLOCK_T, BLOCK_S), 1.0, tl.float32)
    if GAUSSIAN:
        factor = gaussian_factor(offs_j, centers, inverse_two_sigma_squared)
    grad_scores = p * factor * grad_attention
    if ROW_TERMS_GIVEN:
        shift = tl.load(ROW_TERMS + (n * T + offs_t) * 2, mask=row_in, other=0.0)
        row_term = tl.load(ROW_TERMS + (n * T + offs_t) * 2 + 1, mask=row_in, other=0.0)
        grad_scores = p * ((factor * grad_attention - shift[:, None]) - row_term[:, None])
    return grad_scores, p, factor, grad_attention, inverse_query_norm, inverse_key_norm, grad_out


@triton.jit
def _shifted_row_term_update(top_probability, shift, row_term, mass, p, weighted_grad):
    """One key tile's share of each row's (shift, row term): shift = g dA of the most
    probable key seen so far, row term = sum_j p_j (g_j dA_j - shift) over the keys seen
    (re-shifted when a more probable key appears: the keys seen before carry mass
    sum_j p_j)."""
    tile_top = tl.max(p, axis=1)
    tile_shift = tl.max(tl.where((p == tile_top[:, None]) & (p > 0.0), weighted_grad, float("-inf")), axis=1)
    better = tile_top > top_probability
    new_shift = tl.where(better, tile_shift, shift)
    row_term += mass * (shift - new_shift).to(tl.float64) + tl.sum(p * (weighted_grad - new_shift[:, None]), axis=1).to(tl.float64)
    return tl.maximum(top_probability, tile_top), new_shift, row_term, mass + tl.sum(p, axis=1).to(tl.float64)


@triton.jit
def _additive_feature_gradient_tile(
    KEY_FEATURES, QUERY_FEATURES, VA, BIAS, GRAD_KEY_PROJECTION, GRAD_QUERY_PROJECTION, GRAD_VA, grad_scores, offs_j,
    offs_t, offs_d, S, T, D, stride_ks, stride_qt, HAS_BIAS: tl.constexpr, POLYNOMIAL: tl.constexpr,
    HARDWARE_TANH: tl.constexpr,
):
    """``_additive_feature_gradients`` for the features offs_d."""
    key_in = offs_j < S
    query_in = offs_t < T
    d_in = offs_d < D
    key_features = tl.load(
        KEY_FEATURES + offs_j[:, None] * stride_ks + offs_d[None, :], mask=key_in[:, None] & d_in[None, :], other=0.0
    ).to(tl.float32)
    query_features = tl.load(
        QUERY_FEATURES + offs_t[:, None] * stride_qt + offs_d[None, :], mask=query_in[:, None] & d_in[None, :], other=0.0,
    ).to(tl.float32)
    summed = key_features[:, None, :] + query_features[None, :, :]
    if HAS_BIAS:
        summed += tl.load(BIAS + offs_d, mask=d_in, other=0.0).to(tl.float32)[None, None, :]
    activation = additive_activation(summed, POLYNOMIAL, HARDWARE_TANH)
    va = tl.load(VA + offs_d, mask=d_in, other=0.0).to(tl.float32)
    weighted = grad_scores[:, :, None] * (1.0 - activation * activation) * va[None, None, :]
    tl.atomic_add(
        GRAD_KEY_PROJECTION + offs_j[:, None] * D + offs_d[None, :], tl.sum(weighted, axis=1),
        mask=key_in[:, None] & d_in[None, :],
    )
    tl.atomic_add(
        GRAD_QUERY_PROJECTION + offs_t[:, None] * D + offs_d[None, :], tl.sum(weighted, axis=0),
        mask=query_in[:, None] & d_in[None, :],
    )
    tl.atomic_add(GRAD_VA + offs_d, tl.sum(tl.sum(grad_scores[:, :, None] * activation, axis=1), axis=0), mask=d_in)


@triton.jit
def _additive_feature_gradients(
    KEY_FEATURES, QUERY_FEATURES, VA, BIAS, GRAD_KEY_PROJECTION, GRAD_QUERY_PROJECTION, GRAD_VA, grad_scores, offs_j,
    offs_t, S, T, D, stride_ks, stride_qt, HAS_BIAS: tl.constexpr, HARDWARE_TANH: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D_POLY: tl.constexpr,
):
    """Atomically add one tile's gradient of the additive score to the projections of its
    keys and queries and to v, from one tanh per pair and feature: KEY_FEATURES and
    QUERY_FEATURES point at this batch element's keys and queries, GRAD_KEY_PROJECTION
    and GRAD_QUERY_PROJECTION at their contiguous (S, D) and (T, D) float32 blocks;
    ``grad_scores`` is (keys, queries)."""
    for d_start in range(0, D, BLOCK_D + BLOCK_D_POLY):
        _additive_feature_gradient_tile(
            KEY_FEATURES, QUERY_FEATURES, VA, BIAS, GRAD_KEY_PROJECTION, GRAD_QUERY_PROJECTION, GRAD_VA, grad_scores,
            offs_j, offs_t, d_start + tl.arange(0, BLOCK_D), S, T, D, stride_ks, stride_qt, HAS_BIAS, False,
            HARDWARE_TANH,
        )
        if BLOCK_D_POLY > 0:
            _additive_feature_gradient_tile(
                KEY_FEATURES, QUERY_FEATURES, VA, BIAS, GRAD_KEY_PROJECTION, GRAD_QUERY_PROJECTION, GRAD_VA,
                grad_scores, offs_j, offs_t, d_start + BLOCK_D + tl.arange(0, BLOCK_D_POLY), S, T, D, stride_ks,
                stride_qt, HAS_BIAS, True, HARDWARE_TANH,
            )


@triton.jit
def attention_grad_query_kernel(
    Q, K, V, VA, BIAS, LENGTHS, KPM, CENTER, GRAD_OUT, GRAD_WEIGHTS, STATS, ROW_TERMS, GRAD_Q, GRAD_CENTER,
    stride_qn, stride_qt, stride_kn, stride_ks, stride_vn, stride_vs, stride_on, stride_ot,
    T, S, D, DV, scale, norm_floor, window, inverse_two_sigma_squared,
    SCORE_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CENTER: tl.constexpr, GAUSSIAN: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, ROW_TERMS_GIVEN: tl.constexpr, HARDWARE_TANH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D_POLY: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Without ROW_TERMS_GIVEN, each row's (shift, row term) into ROW_TERMS (N, T, 2) and
    the centers' gradient; with it, dQ from them (dot and cosine)."""
    t_block, n = block_and_sequence(T, BLOCK_T)
    t_start = t_block * BLOCK_T
    offs_t = t_start + tl.arange(0, BLOCK_T)
    offs_dq = tl.arange(0, BLOCK_DQ)
    row_in = offs_t < T
    length = row_length(LENGTHS, n, S, HAS_LENGTHS)
    centers = row_centers(CENTER, n * T, offs_t, T, HAS_CENTER)
    lo, hi = key_range(t_start, offs_t, centers, T, S, length, window, HAS_LENGTHS, CAUSAL, HAS_WINDOW, BLOCK_S)
    grad_query = tl.zeros((BLOCK_T, BLOCK_DQ), dtype=tl.float32)
    grad_center = tl.zeros((BLOCK_T,), dtype=tl.float32)
    top_probability = tl.zeros((BLOCK_T,), dtype=tl.float32)
    shift = tl.zeros((BLOCK_T,), dtype=tl.float32)
    # Summed in float64 over the key blocks: a float32 running sum over the S / BLOCK_S
    # blocks of a long row left dQ 4-13x the float32 reference's error at S = 2 10^4.
    row_term = tl.zeros((BLOCK_T,), dtype=tl.float64)
    mass = tl.zeros((BLOCK_T,), dtype=tl.float64)
    inverse_query_norm = tl.full((BLOCK_T,), 1.0, tl.float32)
    for j_start in range(lo, hi, BLOCK_S):
        offs_j = j_start + tl.arange(0, BLOCK_S)
        grad_scores, p, factor, grad_attention, inverse_query_norm, inverse_key_norm, _ = _score_gradient(
            Q, K, V, VA, BIAS, KPM, GRAD_OUT, GRAD_WEIGHTS, STATS, ROW_TERMS, n, offs_t, offs_j, centers, length,
            stride_qn, stride_qt, stride_kn, stride_ks, stride_vn, stride_vs, stride_on, stride_ot,
            T, S, D, DV, scale, norm_floor, window, inverse_two_sigma_squared,
            SCORE_KIND, HAS_BIAS, HAS_LENGTHS, HAS_KPM, CAUSAL, HAS_WINDOW, GAUSSIAN, HAS_GRAD_WEIGHTS,
            ROW_TERMS_GIVEN, HARDWARE_TANH, DOT_PRECISION, BLOCK_T, BLOCK_S, BLOCK_D, BLOCK_D_POLY, BLOCK_DV,
        )
        if not ROW_TERMS_GIVEN:
            top_probability, shift, row_term, mass = _shifted_row_term_update(
                top_probability, shift, row_term, mass, p, factor * grad_attention)
            if HAS_CENTER and GAUSSIAN:
                distance = offs_j.to(tl.float32)[None, :] - centers[:, None]
                grad_center += tl.sum(grad_attention * p * factor * distance, axis=1) * (2.0 * inverse_two_sigma_squared)
        elif SCORE_KIND != 2:  # additive: dQ' comes from the key-value kernel
            keys = tl.load(
                K + n * stride_kn + offs_j[:, None] * stride_ks + offs_dq[None, :],
                mask=(offs_j < S)[:, None] & (offs_dq < D)[None, :], other=0.0,
            )
            if SCORE_KIND == 1:  # the unit keys (0 for a zero key): dS / max(|k|, floor) overflowed float16
                keys = (keys.to(tl.float32) * inverse_key_norm[:, None]).to(keys.dtype)
            grad_query += tile_product(grad_scores * scale, keys, DOT_PRECISION, BLOCK_T == 1)
    if not ROW_TERMS_GIVEN:
        tl.store(ROW_TERMS + (n * T + offs_t) * 2, shift, mask=row_in)
        tl.store(ROW_TERMS + (n * T + offs_t) * 2 + 1, row_term.to(tl.float32), mask=row_in)
        if HAS_CENTER and GAUSSIAN:
            tl.store(GRAD_CENTER + n * T + offs_t, grad_center, mask=row_in)
    elif SCORE_KIND != 2:
        out_mask = row_in[:, None] & (offs_dq < D)[None, :]
        if SCORE_KIND == 1:
            # grad_query holds the gradient of q/|q|: drop its radial part and divide by |q|
            # (below the norm floor q / floor is linear in q: no radial part to drop).
            query = tl.load(Q + n * stride_qn + offs_t[:, None] * stride_qt + offs_dq[None, :], mask=out_mask, other=0.0)
            query = query.to(tl.float32)
            unit_query = query * inverse_query_norm[:, None]
            radial = tl.sum(unit_query * grad_query, axis=1)
            radial = tl.where(tl.sum(query * query, axis=1) >= norm_floor * norm_floor, radial, 0.0)
            grad_query = (grad_query - unit_query * radial[:, None]) * inverse_query_norm[:, None]
        tl.store(GRAD_Q + n * T * D + offs_t[:, None] * D + offs_dq[None, :], grad_query, mask=out_mask)


@triton.jit
def attention_grad_key_value_kernel(
    Q, K, V, VA, BIAS, LENGTHS, KPM, CENTER, GRAD_OUT, GRAD_WEIGHTS, STATS, ROW_TERMS, GRAD_Q, GRAD_K, GRAD_V, GRAD_VA,
    stride_qn, stride_qt, stride_kn, stride_ks, stride_vn, stride_vs, stride_on, stride_ot,
    T, S, D, DV, scale, norm_floor, window, inverse_two_sigma_squared,
    SCORE_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CENTER: tl.constexpr, GAUSSIAN: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, HARDWARE_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_POLY: tl.constexpr,
    BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr, VALUES_ARE_KEYS: tl.constexpr,
):
    j_block, n = block_and_sequence(S, BLOCK_S)
    j_start = j_block * BLOCK_S
    offs_j = j_start + tl.arange(0, BLOCK_S)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_in = offs_j < S
    length = row_length(LENGTHS, n, S, HAS_LENGTHS)
    grad_key = tl.zeros((BLOCK_S, BLOCK_DQ), dtype=tl.float32)
    grad_value = tl.zeros((BLOCK_S, BLOCK_DV), dtype=tl.float32)
    inverse_key_norm = tl.full((BLOCK_S,), 1.0, tl.float32)
    for t_start in range(0, T, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        centers = row_centers(CENTER, n * T, offs_t, T, HAS_CENTER)
        lo, hi = key_range(t_start, offs_t, centers, T, S, length, window, HAS_LENGTHS, CAUSAL, HAS_WINDOW, BLOCK_S)
        if (j_start < hi) & (j_start + BLOCK_S > lo):
            grad_scores, p, factor, _, inverse_query_norm, inverse_key_norm, grad_out = _score_gradient(
                Q, K, V, VA, BIAS, KPM, GRAD_OUT, GRAD_WEIGHTS, STATS, ROW_TERMS, n, offs_t, offs_j, centers, length,
                stride_qn, stride_qt, stride_kn, stride_ks, stride_vn, stride_vs, stride_on, stride_ot,
                T, S, D, DV, scale, norm_floor, window, inverse_two_sigma_squared,
                SCORE_KIND, HAS_BIAS, HAS_LENGTHS, HAS_KPM, CAUSAL, HAS_WINDOW, GAUSSIAN, HAS_GRAD_WEIGHTS,
                True, HARDWARE_TANH, DOT_PRECISION, BLOCK_T, BLOCK_S, BLOCK_D, BLOCK_D_POLY, BLOCK_DV,
            )
            weights = p * factor
            grad_value += transposed_product(weights, grad_out, DOT_PRECISION, BLOCK_T == 1)
            if SCORE_KIND == 2:
                _additive_feature_gradients(
                    K + n * stride_kn, Q + n * stride_qn, VA, BIAS, GRAD_K + n * S * D, GRAD_Q + n * T * D, GRAD_VA,
                    tl.trans(grad_scores), offs_j, offs_t, S, T, D, stride_ks, stride_qt, HAS_BIAS, HARDWARE_TANH,
                    BLOCK_D, BLOCK_D_POLY,
                )
            else:
                queries = tl.load(
                    Q + n * stride_qn + offs_t[:, None] * stride_qt + offs_dq[None, :],
                    mask=(offs_t < T)[:, None] & (offs_dq < D)[None, :], other=0.0,
                )
                if SCORE_KIND == 1:  # the unit queries (0 for a zero query), as the query kernel's unit keys
                    queries = (queries.to(tl.float32) * inverse_query_norm[:, None]).to(queries.dtype)
                grad_key += transposed_product(grad_scores * scale, queries, DOT_PRECISION, BLOCK_T == 1)
    value_mask = key_in[:, None] & (offs_dv < DV)[None, :]
    if not VALUES_ARE_KEYS:
        tl.store(GRAD_V + n * S * DV + offs_j[:, None] * DV + offs_dv[None, :], grad_value, mask=value_mask)
    elif SCORE_KIND == 2:
        tl.atomic_add(GRAD_K + n * S * D + offs_j[:, None] * D + offs_dv[None, :], grad_value, mask=value_mask)
    if SCORE_KIND != 2:
        out_mask = key_in[:, None] & (offs_dq < D)[None, :]
        if SCORE_KIND == 1:
            keys = tl.load(K + n * stride_kn + offs_j[:, None] * stride_ks + offs_dq[None, :], mask=out_mask, other=0.0)
            keys = keys.to(tl.float32)
            unit_key = keys * inverse_key_norm[:, None]
            radial = tl.sum(unit_key * grad_key, axis=1)
            radial = tl.where(tl.sum(keys * keys, axis=1) >= norm_floor * norm_floor, radial, 0.0)  # as dQ's
            grad_key = (grad_key - unit_key * radial[:, None]) * inverse_key_norm[:, None]
        if VALUES_ARE_KEYS:  # BLOCK_DV == BLOCK_DQ: D == DV
            grad_key += grad_value
        tl.store(GRAD_K + n * S * D + offs_j[:, None] * D + offs_dq[None, :], grad_key, mask=out_mask)
