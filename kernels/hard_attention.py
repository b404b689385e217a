"""Hard attention after the soft weights, fastattn.reference.hard's choice and outputs_at
in one program per row of weights (N*T rows of S weights, contiguous), and their backward.

Forward (``hard_attention_kernel``), walking the row in BLOCK_S chunks:
- the choice of one position: argmax (``SAMPLE=False``), the first position holding the
  row's largest weight, as ``torch.argmax``; or a draw (``SAMPLE=True``) of position j
  with probability w_j / sum(w), by inverting the running sum at u * sum(w), u uniform
  from Philox (``tl.rand(seed, row)``), so a fixed seed gives the same positions.
  Rounding that leaves u * sum(w) past the last running sum picks the last position of
  non-zero weight.  A row of zeros (no valid key) or with a NaN gives position 0, as the
  reference.  The weights are not renormalised: the Gaussian factor of local-p makes them
  sum below one;
- log(w_index / sum_j w_j), each clamped below at ``tiny`` (the weights' dtype's smallest
  normal), 0 for a row of zeros;
- the chosen value row times the row factor: 1, 0 for a row of zeros, NaN for a NaN row.

Backward: ``hard_attention_weights_backward_kernel``, one program per row, writes the
log-probability's gradient into the row, g (e_index / w_index - 1 / sum_j w_j), each term 0
where its clamp held, 0 in a row of zeros, and the row factor; then
``hard_attention_values_backward_kernel``, one program per (batch element, value tile),
adds each query's context gradient times its factor into the chosen value row, the
queries one after another (no atomics: deterministic), into a float32 (or float64) sum.
A position outside [0, S) in the backward's index is never read or written at: it clears
``OK`` (a float32 1), which the op asserts.  Sums and maths in ACC: float32, float64 for
float64 inputs.
Not fused: the soft weights themselves (the attention kernels write them); sampling reads
a row twice (its sum, then the draw), and the backward re-reads the rows the forward did.
"""

import triton
import triton.language as tl


@triton.jit
def _row_total(WEIGHTS, base, S, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    total = tl.zeros((1,), dtype=ACC)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        total += tl.sum(tl.load(WEIGHTS + base + offs, mask=offs < S, other=0.0).to(ACC), axis=0)
    return total


@triton.jit
def _drawn_position(WEIGHTS, base, S, total, seed, row, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    target = tl.rand(seed, row + tl.zeros((1,), dtype=tl.int32)).to(ACC) * total
    running = tl.zeros((1,), dtype=ACC)
    chosen = tl.full((1,), S, tl.int32)
    last_positive = tl.zeros((1,), dtype=tl.int32)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        weights = tl.load(WEIGHTS + base + offs, mask=offs < S, other=0.0).to(ACC)
        cumulative = tl.cumsum(weights, axis=0)[None, :] + running[:, None]
        passes = (cumulative > target[:, None]) & (weights > 0.0)[None, :]
        chosen = tl.minimum(chosen, tl.min(tl.where(passes, offs[None, :], S), axis=1))
        last_positive = tl.maximum(last_positive, tl.max(tl.where(weights > 0.0, offs, 0), axis=0))
        running += tl.sum(weights, axis=0)
    return tl.where(chosen < S, chosen, last_positive)


@triton.jit
def _largest_position(WEIGHTS, base, S, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    best = tl.full((1,), float("-inf"), ACC)
    chosen = tl.zeros((1,), dtype=tl.int32)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        weights = tl.load(WEIGHTS + base + offs, mask=offs < S, other=float("-inf")).to(ACC)
        chunk_best = tl.max(weights, axis=0)
        chunk_index = tl.min(tl.where(weights == chunk_best, offs, S), axis=0)
        better = chunk_best > best
        chosen = tl.where(better, chunk_index, chosen)
        best = tl.where(better, chunk_best, best)
    return chosen


@triton.jit
def _chosen_weight(WEIGHTS, base, S, chosen, ACC: tl.constexpr):
    """The weight at ``chosen`` (0 where it is outside [0, S): never read)."""
    inside = (chosen >= 0) & (chosen < S)
    return tl.load(WEIGHTS + base + tl.where(inside, chosen, 0), mask=inside, other=0.0).to(ACC)


@triton.jit
def _row_factor(total):
    """1 for a row with weights, 0 for a row of zeros, NaN for a NaN row."""
    return tl.where(total != total, total, tl.where(total != 0.0, 1.0, 0.0).to(total.dtype))


@triton.jit
def hard_attention_kernel(WEIGHTS, VALUES, CONTEXT, INDEX, LOG_PROB, T, S, DV, seed, SAMPLE: tl.constexpr,
                          tiny: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * S
    total = _row_total(WEIGHTS, base, S, ACC, BLOCK_S)
    if SAMPLE:
        chosen = _drawn_position(WEIGHTS, base, S, total, seed, row, ACC, BLOCK_S)
    else:
        chosen = _largest_position(WEIGHTS, base, S, ACC, BLOCK_S)
    chosen = tl.where(total > 0.0, chosen, 0)  # the reference's rule for rows of zeros and NaN rows
    one = tl.arange(0, 1)
    tl.store(INDEX + row + one, chosen.to(tl.int64))
    chosen_weight = _chosen_weight(WEIGHTS, base, S, chosen, ACC)
    log_prob = tl.log(tl.where(chosen_weight < tiny, tiny, chosen_weight)) - tl.log(tl.where(total < tiny, tiny, total))
    tl.store(LOG_PROB + row + one, tl.where(total != 0.0, log_prob, 0.0).to(LOG_PROB.dtype.element_ty))
    factor = _row_factor(total)
    value_row = VALUES + ((row // T).to(tl.int64) * S + chosen) * DV
    for start in range(0, DV, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        value = tl.load(value_row + offs, mask=offs < DV, other=0.0).to(ACC)
        tl.store(CONTEXT + row.to(tl.int64) * DV + offs, (value * factor).to(CONTEXT.dtype.element_ty), mask=offs < DV)


@triton.jit
def hard_attention_weights_backward_kernel(WEIGHTS, INDEX, GRAD_LOG_PROB, GRAD_WEIGHTS, FACTOR, OK, S,
                                           HAS_GRAD_LOG_PROB: tl.constexpr, WRITE_FACTOR: tl.constexpr,
                                           tiny: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * S
    one = tl.arange(0, 1)
    chosen = tl.load(INDEX + row + one)
    inside = (chosen >= 0) & (chosen < S)
    tl.store(OK + one, tl.zeros((1,), dtype=tl.float32), mask=~inside)
    total = _row_total(WEIGHTS, base, S, ACC, BLOCK_S)
    if WRITE_FACTOR:
        tl.store(FACTOR + row + one, _row_factor(total).to(tl.float32))
    if HAS_GRAD_LOG_PROB:
        g = tl.load(GRAD_LOG_PROB + row + one).to(ACC)
        chosen_weight = _chosen_weight(WEIGHTS, base, S, chosen, ACC)
        # d log(clamp_min(x, tiny)) / dx = 1 / x where x >= tiny, else 0 (torch's clamp_min)
        total_kept, chosen_kept = total >= tiny, chosen_weight >= tiny  # (no division where they did not)
        of_total = tl.where(total_kept, g / tl.where(total_kept, total, 1.0), 0.0)
        of_chosen = tl.where(chosen_kept, g / tl.where(chosen_kept, chosen_weight, 1.0), 0.0)
        valid = total != 0.0
        for start in range(0, S, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            grad = tl.where(offs[None, :] == chosen[:, None], (of_chosen - of_total)[:, None], -of_total[:, None])
            grad = tl.where(valid[:, None], grad, 0.0)
            tl.store(GRAD_WEIGHTS + base + offs[None, :], grad.to(GRAD_WEIGHTS.dtype.element_ty),
                     mask=offs[None, :] < S)


@triton.jit
def hard_attention_values_backward_kernel(GRAD_CONTEXT, INDEX, FACTOR, GRAD_VALUES, T, S, DV,
                                          ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    for t in range(0, T):
        row = n * T + t
        chosen = tl.load(INDEX + row)
        inside = (chosen >= 0) & (chosen < S)
        factor = tl.load(FACTOR + row).to(ACC)
        grad = tl.load(GRAD_CONTEXT + row * DV + offs, mask=offs < DV, other=0.0).to(ACC)
        target = GRAD_VALUES + (n * S + tl.where(inside, chosen, 0)) * DV + offs
        kept = offs < tl.where(inside, DV, 0)
        tl.store(target, tl.load(target, mask=kept, other=0.0) + grad * factor, mask=kept)
