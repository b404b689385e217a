"""Triton helpers shared by every attention kernel: the scores of one (query block ×
key block) tile for the three kernel score kinds, the mask of a tile, the key range
a query block can see, the Gaussian factor of local attention, the tanh of the
additive score, and the softmax's row statistics (stored by the forward, read back by
the weights and backward kernels).

Tile products (``rows_times_rows``, ``tile_product``, ``transposed_product``): ``tl.dot``
on the tensor cores, or, for a block of one query row (a decode step's: ``tl.dot`` needs
16 rows), the float32 products summed on the FMA units.

Score kinds (``SCORE_KIND``): 0 = dot (q . k * scale, a tile product),
1 = cosine (scale * q . k / (|q| |k|), norms computed here), 2 = additive
(v . tanh(q + k + b), summed over feature tiles on the FMA/SFU units).  Dot and
cosine walk the features in tiles of ``BLOCK_D``; additive walks them in steps of
``BLOCK_D + BLOCK_D_POLY`` features: the first ``BLOCK_D`` through the
special-function unit (``sfu_tanh``), the last ``BLOCK_D_POLY`` (0: none) through
``rational_tanh`` on the FMA units, so the autotuner can balance the two pipes.
Queries and keys must have their feature dimension contiguous.  Masks follow
``fastattn.reference.attention``: lengths, key padding, causal, local-m (centers = t)
and local-p (given centers) windows, all evaluated in float32.

tanh error bounds (absolute, float32, over the whole real line):
- ``rational_tanh``: <= RATIONAL_TANH_MAX_ERROR = 4e-7 (csrc/common/fast_tanh.h's
  coefficients; measured 3.5e-7 under the interpreter, without FMA contraction, and
  relative error 3.6e-7 near 0; checked on a dense grid by tests/test_triton_tuning.py).
  Its division is three Newton steps from a bit-trick seed: no SFU instruction at all.
- ``stable_tanh`` (exp-based, float32 inputs and the interpreter): measured 1.1e-7 under
  the interpreter, checked against the same bound; near 0 it keeps only that absolute
  accuracy (tanh(1e-10) comes out 0), which is all a sum of tanh terms needs.
- ``tanh.approx.f32`` (``HARDWARE_TANH``: float16/bfloat16 inputs on a GPU): relative
  error about 2^-11 (PTX ISA), the rounding of the float16 inputs themselves.
"""

import triton
import triton.language as tl

DOT, COSINE, ADDITIVE = 0, 1, 2
RATIONAL_TANH_MAX_ERROR = 4e-7


@triton.jit
def rows_times_rows(a, b, DOT_PRECISION: tl.constexpr, ON_FMA_UNITS: tl.constexpr):
    """a @ b^T in float32: each row of a against each row of b."""
    if ON_FMA_UNITS:
        return tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    else:
        return tl.dot(a.to(b.dtype), tl.trans(b), input_precision=DOT_PRECISION)


@triton.jit
def tile_product(a, b, DOT_PRECISION: tl.constexpr, ON_FMA_UNITS: tl.constexpr):
    """a @ b in float32 (a rounded to b's dtype for the tensor cores)."""
    if ON_FMA_UNITS:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a.to(b.dtype), b, input_precision=DOT_PRECISION)


@triton.jit
def transposed_product(a, b, DOT_PRECISION: tl.constexpr, ON_FMA_UNITS: tl.constexpr):
    """a^T @ b in float32 (a rounded to b's dtype for the tensor cores)."""
    if ON_FMA_UNITS:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[:, None, :], axis=0)
    else:
        return tl.dot(tl.trans(a.to(b.dtype)), b, input_precision=DOT_PRECISION)


@triton.jit
def stable_tanh(x):
    """tanh through one exp, accurate near 0 and saturating without overflow."""
    e = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def rational_tanh(x):
    """tanh(x) ~= x P(x^2) / Q(x^2) on |x| <= 8.75 (csrc/common/fast_tanh.h), FMA units
    only: 1/Q by three Newton steps from the exponent-flipping seed (Q lies in [1, 365]).
    The clamps pass a NaN through (max.NaN.f32, no dearer), as tanh does: a plain min/max
    takes the other operand, which made tanh(NaN) = -1 and hid a NaN input."""
    clamped = tl.minimum(tl.maximum(x, -8.75, tl.PropagateNan.ALL), 8.75, tl.PropagateNan.ALL)
    y = clamped * clamped
    numerator = 1.363577892e-08 * y + 2.079633868e-05
    numerator = numerator * y + 3.506309020e-03
    numerator = numerator * y + 1.338982832e-01
    numerator = numerator * y + 9.999999282e-01
    denominator = 7.886948043e-07 * y + 3.303629924e-04
    denominator = denominator * y + 2.591708221e-02
    denominator = denominator * y + 4.672313322e-01
    denominator = denominator * y + 1.0
    reciprocal = (0x7EF311C3 - denominator.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    for _ in tl.static_range(3):
        reciprocal = reciprocal + reciprocal * (1.0 - denominator * reciprocal)
    return tl.minimum(tl.maximum(clamped * numerator * reciprocal, -1.0, tl.PropagateNan.ALL), 1.0, tl.PropagateNan.ALL)


@triton.jit
def sfu_tanh(x, HARDWARE_TANH: tl.constexpr):
    """tanh on the special-function unit: ``tanh.approx.f32`` (one SFU op) when
    ``HARDWARE_TANH``, else ``stable_tanh`` (exp and a division)."""
    if HARDWARE_TANH:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return stable_tanh(x)


@triton.jit
def additive_activation(x, POLYNOMIAL: tl.constexpr, HARDWARE_TANH: tl.constexpr):
    """tanh of one additive feature sub-tile: ``rational_tanh`` or ``sfu_tanh``."""
    if POLYNOMIAL:
        return rational_tanh(x)
    else:
        return sfu_tanh(x, HARDWARE_TANH)


@triton.jit
def _additive_partial_scores(
    Q, K, VA, BIAS, offs_t, offs_j, offs_d, T, S, D, stride_qt, stride_ks,
    HAS_BIAS: tl.constexpr, POLYNOMIAL: tl.constexpr, HARDWARE_TANH: tl.constexpr,
):
    """sum over the features offs_d of v_d tanh(q_d + k_d + b_d), (BLOCK_T, BLOCK_S) fp32;
    Q and K point at this batch element's queries and keys."""
    d_in = offs_d < D
    q = tl.load(Q + offs_t[:, None] * stride_qt + offs_d[None, :], mask=(offs_t < T)[:, None] & d_in[None, :], other=0.0)
    k = tl.load(K + offs_j[:, None] * stride_ks + offs_d[None, :], mask=(offs_j < S)[:, None] & d_in[None, :], other=0.0)
    va = tl.load(VA + offs_d, mask=d_in, other=0.0).to(tl.float32)
    summed = q.to(tl.float32)[:, None, :] + k.to(tl.float32)[None, :, :]
    if HAS_BIAS:
        summed += tl.load(BIAS + offs_d, mask=d_in, other=0.0).to(tl.float32)[None, None, :]
    return tl.sum(additive_activation(summed, POLYNOMIAL, HARDWARE_TANH) * va[None, None, :], axis=2)


@triton.jit
def block_scores(
    Q, K, VA, BIAS, q_base, k_base, offs_t, offs_j, T, S, D, stride_qt, stride_ks, scale, norm_floor,
    SCORE_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D_POLY: tl.constexpr, HARDWARE_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """-> (scores (BLOCK_T, BLOCK_S) fp32 with the scale applied, 1/|q| (BLOCK_T,), 1/|k| (BLOCK_S,));
    the inverse norms are those of the cosine score (ones for the other kinds)."""
    scores = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    query_squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
    key_squares = tl.zeros((BLOCK_S,), dtype=tl.float32)
    if SCORE_KIND == 2:
        for d_start in range(0, D, BLOCK_D + BLOCK_D_POLY):
            scores += _additive_partial_scores(
                Q + q_base, K + k_base, VA, BIAS, offs_t, offs_j, d_start + tl.arange(0, BLOCK_D), T, S, D,
                stride_qt, stride_ks, HAS_BIAS, False, HARDWARE_TANH,
            )
            if BLOCK_D_POLY > 0:
                scores += _additive_partial_scores(
                    Q + q_base, K + k_base, VA, BIAS, offs_t, offs_j, d_start + BLOCK_D + tl.arange(0, BLOCK_D_POLY),
                    T, S, D, stride_qt, stride_ks, HAS_BIAS, True, HARDWARE_TANH,
                )
    else:
        row_in = offs_t < T
        key_in = offs_j < S
        for d_start in range(0, D, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)
            d_in = offs_d < D
            q = tl.load(Q + q_base + offs_t[:, None] * stride_qt + offs_d[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0)
            k = tl.load(K + k_base + offs_j[:, None] * stride_ks + offs_d[None, :], mask=key_in[:, None] & d_in[None, :], other=0.0)
            scores += rows_times_rows(q, k, DOT_PRECISION, BLOCK_T == 1)
            if SCORE_KIND == 1:
                query_squares += tl.sum(q.to(tl.float32) * q.to(tl.float32), axis=1)
                key_squares += tl.sum(k.to(tl.float32) * k.to(tl.float32), axis=1)
    inverse_query_norm = tl.full((BLOCK_T,), 1.0, tl.float32)
    inverse_key_norm = tl.full((BLOCK_S,), 1.0, tl.float32)
    if SCORE_KIND == 1:
        inverse_query_norm = 1.0 / tl.maximum(tl.sqrt(query_squares), norm_floor)
        inverse_key_norm = 1.0 / tl.maximum(tl.sqrt(key_squares), norm_floor)
        scores = scores * inverse_query_norm[:, None] * inverse_key_norm[None, :]
    return scores * scale, inverse_query_norm, inverse_key_norm


@triton.jit
def block_and_sequence(length, BLOCK: tl.constexpr):
    """(block, n) of this program, where grid axis 0 runs over the cdiv(length, BLOCK)
    blocks of sequence 0, then of sequence 1, ...: the batch shares axis 0 (up to 2^31 - 1
    programs), since axes 1 and 2 hold at most 65,535 and a batch of B * heads passes that."""
    blocks = tl.cdiv(length, BLOCK)
    program = tl.program_id(0)
    return program % blocks, (program // blocks).to(tl.int64)


@triton.jit
def row_length(LENGTHS, n, S, HAS_LENGTHS: tl.constexpr):
    """Sequence n's key count: its length clamped to [0, S] (as the other backends read
    it; cut to 32 bits, a length of 2^32 + 2 was 2), or S without lengths."""
    length = S
    if HAS_LENGTHS:
        length = tl.minimum(tl.maximum(tl.load(LENGTHS + n), 0), S).to(tl.int32)
    return length


@triton.jit
def row_centers(CENTER, center_base, offs_t, T, HAS_CENTER: tl.constexpr):
    """p_t of local attention, float32: the given centers (local-p) or t (local-m)."""
    if HAS_CENTER:
        centers = tl.load(CENTER + center_base + offs_t, mask=offs_t < T, other=0.0).to(tl.float32)
    else:
        centers = offs_t.to(tl.float32)
    return centers


@triton.jit
def key_range(
    t_start, offs_t, centers, T, S, length, window,
    HAS_LENGTHS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """[lo, hi) of the keys any query of the block may see; lo rounded down to a key block."""
    t_last = tl.minimum(t_start + offs_t.shape[0], T) - 1
    lo = t_start * 0
    hi = lo + S
    if HAS_LENGTHS:
        hi = tl.minimum(hi, length)
    if CAUSAL:
        hi = tl.minimum(hi, t_last + 1)
    if HAS_WINDOW:
        row_in = offs_t < T
        lowest = tl.min(tl.where(row_in, centers, float("inf")), axis=0)
        highest = tl.max(tl.where(row_in, centers, float("-inf")), axis=0)
        first = tl.minimum(tl.maximum(tl.ceil(lowest - window), 0.0), S * 1.0)
        last = tl.maximum(tl.minimum(tl.floor(highest + window) + 1.0, S * 1.0), 0.0)
        lo = tl.maximum(lo, first.to(tl.int32))
        hi = tl.minimum(hi, last.to(tl.int32))
    lo = (lo // BLOCK_S) * BLOCK_S
    return lo, hi


@triton.jit
def tile_valid(
    offs_t, offs_j, centers, T, S, length, KPM, mask_base, window,
    HAS_LENGTHS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """(BLOCK_T, BLOCK_S) bool: query t may attend to key j (the reference's valid_positions)."""
    valid = (offs_t[:, None] < T) & (offs_j[None, :] < S)
    if HAS_LENGTHS:
        valid = valid & (offs_j[None, :] < length)
    if HAS_KPM:
        padding = tl.load(KPM + mask_base + offs_j, mask=offs_j < S, other=1)
        valid = valid & (padding == 0)[None, :]
    if CAUSAL:
        valid = valid & (offs_j[None, :] <= offs_t[:, None])
    if HAS_WINDOW:
        positions = offs_j.to(tl.float32)[None, :]
        valid = valid & (positions >= centers[:, None] - window) & (positions <= centers[:, None] + window)
    return valid


@triton.jit
def store_row_statistics(STATS, row_base, offs_t, T, row_max, row_sum):
    """Write each row's softmax shift m and 1 / l, l = sum_j exp(e_j - m), to STATS (N, T, 2)
    float32 (``row_base`` = n T); (+inf, 0) on a row with no valid key.  Not their
    logsumexp m + log l: that rounds to half an ulp of the largest score (4e-6 at scores
    ~100 in float32), an error every probability exp(e_j - logsumexp) recomputed from it
    would share, where exp(e_j - m) / l repeats the forward's rounding (e_j - m is exact at
    the peak, and l carries the same exp(e_j - m) for the bounded cosine's m = |scale|)."""
    empty = row_sum == 0.0
    row_in = offs_t < T
    tl.store(STATS + (row_base + offs_t) * 2, tl.where(empty, float("inf"), row_max), mask=row_in)
    tl.store(STATS + (row_base + offs_t) * 2 + 1, 1.0 / tl.where(empty, float("inf"), row_sum), mask=row_in)


@triton.jit
def tile_probabilities(scores, valid, STATS, row_base, offs_t, T):
    """The softmax of one tile, exp(e - m) / l from the row statistics
    (``store_row_statistics``), 0 outside ``valid``."""
    row_in = offs_t < T
    row_max = tl.load(STATS + (row_base + offs_t) * 2, mask=row_in, other=float("inf"))
    inverse_sum = tl.load(STATS + (row_base + offs_t) * 2 + 1, mask=row_in, other=0.0)
    return tl.where(valid, tl.exp(scores - row_max[:, None]) * inverse_sum[:, None], 0.0)


@triton.jit
def gaussian_factor(offs_j, centers, inverse_two_sigma_squared):
    """exp(-(j - p_t)^2 / (2 sigma^2)), (BLOCK_T, BLOCK_S) float32."""
    distance = offs_j.to(tl.float32)[None, :] - centers[:, None]
    return tl.exp(-distance * distance * inverse_two_sigma_squared)
