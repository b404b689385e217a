"""Hard attention's choice of one key position per row of attention weights (N*T rows
of S weights, contiguous), one program per row, walking the row in BLOCK_S chunks.

- argmax (``SAMPLE=False``): the first position holding the row's largest weight, as
  ``torch.argmax``;
- sampling (``SAMPLE=True``): position j with probability w_j / sum(w), by inverting
  the running sum at u * sum(w), u uniform from Philox (``tl.rand(seed, row)``), so a
  fixed seed gives the same positions.  Rounding that leaves u * sum(w) past the last
  running sum picks the last position of non-zero weight.

A row of zeros (no valid key) gives position 0.  The weights are not renormalised
here: the Gaussian factor of local-p makes them sum below one, and sampling divides by
the row's sum as the reference does.
"""

import triton
import triton.language as tl


@triton.jit
def choose_positions_kernel(WEIGHTS, INDEX, S, seed, SAMPLE: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * S
    if SAMPLE:
        total = tl.zeros((1,), dtype=tl.float32)
        for start in range(0, S, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            total += tl.sum(tl.load(WEIGHTS + base + offs, mask=offs < S, other=0.0).to(tl.float32), axis=0)
        target = tl.rand(seed, row + tl.zeros((1,), dtype=tl.int32)) * total
        running = tl.zeros((1,), dtype=tl.float32)
        chosen = tl.full((1,), S, tl.int32)
        last_positive = tl.zeros((1,), dtype=tl.int32)
        for start in range(0, S, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            weights = tl.load(WEIGHTS + base + offs, mask=offs < S, other=0.0).to(tl.float32)
            cumulative = tl.cumsum(weights, axis=0)[None, :] + running[:, None]
            passes = (cumulative > target[:, None]) & (weights > 0.0)[None, :]
            chosen = tl.minimum(chosen, tl.min(tl.where(passes, offs[None, :], S), axis=1))
            last_positive = tl.maximum(last_positive, tl.max(tl.where(weights > 0.0, offs, 0), axis=0))
            running += tl.sum(weights, axis=0)
        chosen = tl.where(chosen < S, chosen, last_positive)
    else:
        best = tl.full((1,), float("-inf"), tl.float32)
        chosen = tl.zeros((1,), dtype=tl.int32)
        for start in range(0, S, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            weights = tl.load(WEIGHTS + base + offs, mask=offs < S, other=float("-inf")).to(tl.float32)
            chunk_best = tl.max(weights, axis=0)
            chunk_index = tl.min(tl.where(weights == chunk_best, offs, S), axis=0)
            better = chunk_best > best
            chosen = tl.where(better, chunk_index, chosen)
            best = tl.where(better, chunk_best, best)
    tl.store(INDEX + row + tl.arange(0, 1), chosen.to(tl.int64))
