"""The config list of every Triton kernel: what the interpreter runs (one config,
16-wide blocks) and what a GPU tunes over, for Hopper (H100/H200: 228 KB shared
memory, 64K registers per SM) and Ampere (A100: 164 KB); see
``fastattn.ops.triton_launch`` for how a list is used.

- Attention (dot and cosine): query block x key block for ``tl.dot``, the features in
  tiles of BLOCK_D chosen by the caller from D; narrow blocks for wide values (Dv
  512-1024).  Keys: T, S, D, Dv.
- A decode step's forward and weights (T = 1), every score, and its additive backward:
  blocks of one query row (BLOCK_T = 1), summed on the FMA units (the *_DECODE lists).
- Attention (additive): a (BLOCK_T, BLOCK_S, BLOCK_D + BLOCK_D_POLY) tile of tanh per
  step, bound by the special-function unit; configs with BLOCK_D_POLY > 0 move that
  share of the tanh to the FMA units (``rational_tanh``), so tuning balances the pipes.
- The additive backward's key-value kernel adds into its gradients (queries', keys', v's)
  atomically, and hard attention's value backward adds into its sums: ``reset_to_zero``
  re-zeroes them between trials.  Every other kernel only stores (the weights kernel leaves
  fully masked tiles at zero, which is also what it would write), so trials are safe.
- The combine step, hard attention (choice and outputs, and their backward) and the
  LSTM/GRU cells tune block shapes and warps on their own size arguments.
"""

from __future__ import annotations

import torch
import triton

from fastattn.ops.triton_launch import INTERPRETED, SMALLEST_BLOCK, KernelConfigs

Config = triton.Config
# Per thread: at most this many float32 registers of accumulator tiles (of 255).  The
# backward kernels also hold the probabilities, their gradient and two operand tiles per
# step: ptxas (sm_90, triton 3.9, bfloat16, the compile check's problems) spills in 24 of
# their 32 configs at 128 accumulator registers (up to 808 bytes) and 8 of 27 at 64.
REGISTER_BUDGET = 128
BACKWARD_REGISTER_BUDGET = 64
# Per program: the dot operand tiles in shared memory, the pipelined ones num_stages times
# (A100's is 164 KB; sm_90 refuses above 227 KB, which float32 tiles reach under TF32).
SHARED_BUDGET = 160 * 1024
# Per thread, IEEE float32 dots only: at most this many multiply-adds a key/query block
# step of the kernel's dots.  Triton lowers a DOT_PRECISION "ieee" dot to FMA loops whose
# operands it holds in registers; ptxas reports (sm_90, triton 3.9) spills of 0 to 48
# bytes a thread for the dot-family configs at or under this and up to 24 KB above it,
# where the accumulator budget alone let 64x64 backward tiles through.
FMA_BUDGET = 1024


def _fits(accumulators, staged, resident=(), dots=(), register_budget=REGISTER_BUDGET):
    """An ``early_config_prune`` that keeps the configs whose accumulator tiles (pairs of
    meta-parameter names, float32) fit ``register_budget`` a thread, whose operand tiles in
    shared memory (``staged``: pipelined over the loop, ``resident``: loaded once a
    program) fit SHARED_BUDGET, and, for IEEE float32 dots, whose dots (rows, columns,
    inner dimension: triples of names) fit FMA_BUDGET; when none does, the closest."""

    def footprint(config, sizes):
        meta = {**sizes, **config.kwargs}
        threads = 32 * config.num_warps
        registers = sum(meta[rows] * meta[columns] for rows, columns in accumulators) / threads
        query = sizes.get("Q")
        element = query.element_size() if isinstance(query, torch.Tensor) else 4
        shared = element * (
            sum(meta[rows] * meta[columns] for rows, columns in staged) * config.num_stages
            + sum(meta[rows] * meta[columns] for rows, columns in resident)
        )
        fma_loops = meta.get("DOT_PRECISION") == "ieee"
        fma = sum(meta[rows] * meta[columns] * meta[inner] for rows, columns, inner in dots) / threads if fma_loops else 0
        return fma, registers, shared

    def prune(configs, named_args, **kwargs):
        sizes = {**named_args, **kwargs}
        budgets = (FMA_BUDGET, register_budget, SHARED_BUDGET)
        footprints = [footprint(config, sizes) for config in configs]
        fitting = [
            config for config, used in zip(configs, footprints)
            if all(value <= budget for value, budget in zip(used, budgets))
        ]
        if fitting:
            return fitting

        def closest(pair):
            # The least shared memory over the budget first (past sm_90's 227 KB a kernel
            # cannot launch at all; spilled registers only cost time), then the rest.
            fma, registers, shared = pair[1]
            return max(shared - SHARED_BUDGET, 0), fma, registers, shared

        return [min(zip(configs, footprints), key=closest)[0]]

    return prune


def _interpreted(*names: str, query_rows: int = SMALLEST_BLOCK) -> Config:
    """The interpreter's config: every block the smallest, BLOCK_T ``query_rows``."""
    return Config({name: query_rows if name == "BLOCK_T" else SMALLEST_BLOCK for name in names})


def _dot_configs(tiles) -> tuple[Config, ...]:
    """The configs of (BLOCK_T, BLOCK_S, num_warps, num_stages) tiles."""
    return tuple(Config({"BLOCK_T": t, "BLOCK_S": s}, num_warps=warps, num_stages=stages) for t, s, warps, stages in tiles)


def _additive_configs(tiles, num_stages: int = 2) -> tuple[Config, ...]:
    """The configs of (BLOCK_T, BLOCK_S, BLOCK_D, BLOCK_D_POLY, num_warps) tiles."""
    return tuple(
        Config({"BLOCK_T": t, "BLOCK_S": s, "BLOCK_D": d, "BLOCK_D_POLY": poly}, num_warps=warps, num_stages=num_stages)
        for t, s, d, poly, warps in tiles
    )


ATTENTION_KEY = ("T", "S", "D", "DV")

FORWARD_DOT = KernelConfigs(
    interpreted=_interpreted("BLOCK_T", "BLOCK_S"),
    tuned=_dot_configs(
        ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (16, 128, 4, 2), (16, 64, 4, 3), (16, 32, 8, 2), (16, 16, 4, 1))
    ),
    key=ATTENTION_KEY,
    prune=_fits(
        accumulators=[("BLOCK_T", "BLOCK_DV")], staged=[("BLOCK_S", "BLOCK_DV"), ("BLOCK_S", "BLOCK_D")],
        resident=[("BLOCK_T", "BLOCK_D")], dots=[("BLOCK_T", "BLOCK_S", "BLOCK_D"), ("BLOCK_T", "BLOCK_DV", "BLOCK_S")],
    ),
)

# A decode step's forward (T = 1), dot and cosine: one query row a program (BLOCK_T = 1)
# instead of a 16-row block of which 15 are absent; the scores and the values are summed
# on the FMA units (tl.dot needs 16 rows), the (BLOCK_S, BLOCK_D) and (BLOCK_S, BLOCK_DV)
# float32 products held in registers.
FORWARD_DOT_DECODE = KernelConfigs(
    interpreted=_interpreted("BLOCK_T", "BLOCK_S", query_rows=1),
    tuned=_dot_configs(((1, 32, 8, 2), (1, 16, 4, 3), (1, 64, 8, 2), (1, 32, 4, 3), (1, 16, 8, 4))),
    key=ATTENTION_KEY,
    prune=_fits(
        accumulators=[("BLOCK_T", "BLOCK_DV"), ("BLOCK_S", "BLOCK_DV"), ("BLOCK_S", "BLOCK_D")],
        staged=[("BLOCK_S", "BLOCK_DV"), ("BLOCK_S", "BLOCK_D")],
    ),
)

_ADDITIVE_TILES = (
    # (BLOCK_T, BLOCK_S, BLOCK_D, BLOCK_D_POLY, num_warps): all-SFU tiles, then about a
    # fifth (float16/bfloat16: tanh.approx, one SFU op) or a third (float32: exp and a
    # division, two) of the features through the polynomial.
    (16, 32, 32, 0, 4),
    (32, 32, 16, 0, 4),
    (16, 64, 16, 0, 8),
    (16, 32, 32, 8, 4),
    (16, 64, 16, 4, 8),
    (16, 32, 32, 16, 4),
)
FORWARD_ADDITIVE = KernelConfigs(
    interpreted=_interpreted("BLOCK_T", "BLOCK_S", "BLOCK_D", "BLOCK_D_POLY"),
    tuned=_additive_configs(_ADDITIVE_TILES),
    key=ATTENTION_KEY,
    prune=_fits(
        accumulators=[("BLOCK_T", "BLOCK_DV")], staged=[("BLOCK_S", "BLOCK_DV")], dots=[("BLOCK_T", "BLOCK_DV", "BLOCK_S")]
    ),
)

# A decode step's additive forward (T = 1): one query row a program (BLOCK_T = 1), so that
# no tanh is spent on the 15 absent rows of a 16-row block; its values are summed on the
# FMA units (tl.dot needs 16 rows), their (BLOCK_S, BLOCK_DV) float32 products held in
# registers alongside the (BLOCK_S, BLOCK_D) tanh tile.  Tiles as _ADDITIVE_TILES.
_ADDITIVE_DECODE_TILES = (
    (1, 32, 64, 0, 8),
    (1, 16, 64, 0, 4),
    (1, 32, 32, 8, 8),
    (1, 16, 32, 8, 4),
    (1, 32, 64, 16, 8),
    (1, 16, 128, 0, 8),
)
FORWARD_ADDITIVE_DECODE = KernelConfigs(
    interpreted=_interpreted("BLOCK_T", "BLOCK_S", "BLOCK_D", "BLOCK_D_POLY", query_rows=1),
    tuned=_additive_configs(_ADDITIVE_DECODE_TILES),
    key=ATTENTION_KEY,
    prune=_fits(
        accumulators=[("BLOCK_T", "BLOCK_DV"), ("BLOCK_S", "BLOCK_DV"), ("BLOCK_S", "BLOCK_D")],
        staged=[("BLOCK_S", "BLOCK_DV")],
    ),
)

# Decode steps split their keys in multiples of this many keys: the largest forward
# BLOCK_S, a multiple of every other (powers of two), so no key block straddles two splits.
SPLIT_GRANULE = max(
    config.kwargs["BLOCK_S"]
    for configs in (FORWARD_DOT, FORWARD_ADDITIVE, FORWARD_DOT_DECODE, FORWARD_ADDITIVE_DECODE)
    for config in ((configs.interpreted,) if INTERPRETED else configs.tuned)
)

WEIGHTS_DOT = KernelConfigs(
    interpreted=_interpreted("BLOCK_T", "BLOCK_S"),
    tuned=_dot_configs(((64, 64, 4, 2), (64, 128, 8, 2), (16, 128, 4, 2), (32, 64, 4, 3))),
    key=("T", "S", "D"),
    prune=_fits(
        accumulators=[("BLOCK_T", "BLOCK_S")], staged=[("BLOCK_S", "BLOCK_D"), ("BLOCK_T", "BLOCK_D")],
        dots=[("BLOCK_T", "BLOCK_S", "BLOCK_D")],
    ),
)
WEIGHTS_ADDITIVE = KernelConfigs(
    interpreted=FORWARD_ADDITIVE.interpreted, tuned=FORWARD_ADDITIVE.tuned, key=("T", "S", "D")
)
# A decode step's weights (T = 1): one query row a program, as its forward.
WEIGHTS_DOT_DECODE = KernelConfigs(
    interpreted=_interpreted("BLOCK_T", "BLOCK_S", query_rows=1),
    tuned=_dot_configs(((1, 64, 4, 2), (1, 128, 4, 2), (1, 32, 4, 3), (1, 128, 8, 2))),
    key=("T", "S", "D"),
    prune=_fits(accumulators=[("BLOCK_T", "BLOCK_S"), ("BLOCK_S", "BLOCK_D")], staged=[("BLOCK_S", "BLOCK_D")]),
)
WEIGHTS_ADDITIVE_DECODE = KernelConfigs(
    interpreted=FORWARD_ADDITIVE_DECODE.interpreted, tuned=FORWARD_ADDITIVE_DECODE.tuned, key=("T", "S", "D")
)

_BACKWARD_DOT_TILES = (
    # (BLOCK_T, BLOCK_S, num_warps, num_stages); dQ, dK and dV are held whole in registers.
    # The 16x16 tile of 8 warps is for IEEE float32 at D = 256, where the others' FMA dots
    # do not fit (ptxas, sm_90: the cosine dQ kernel spilled 1.9 KB a thread in 4 warps, 224 B in 8).
    (64, 64, 4, 2),
    (128, 64, 8, 2),
    (64, 128, 8, 2),
    (32, 32, 4, 2),
    (16, 32, 4, 1),
    (16, 16, 4, 1),
    (16, 16, 8, 1),
)


def _backward_dot(**tiles) -> KernelConfigs:
    return KernelConfigs(
        interpreted=_interpreted("BLOCK_T", "BLOCK_S"),
        tuned=_dot_configs(_BACKWARD_DOT_TILES),
        key=ATTENTION_KEY,
        prune=_fits(**tiles, register_budget=BACKWARD_REGISTER_BUDGET),
    )


# Both backward kernels recompute the scores (a dot over D in BLOCK_D tiles) and the
# weights' gradient (dO V^T, over Dv); then dQ += dS K, or dV += P^T dO and dK += dS^T Q.
# The tiles of the program's own rows (queries, or keys and values) are loaded once.
_BACKWARD_SCORE_DOTS = [("BLOCK_T", "BLOCK_S", "BLOCK_D"), ("BLOCK_T", "BLOCK_S", "BLOCK_DV")]
GRAD_QUERY_DOT = _backward_dot(
    accumulators=[("BLOCK_T", "BLOCK_DQ")], staged=[("BLOCK_S", "BLOCK_DQ"), ("BLOCK_S", "BLOCK_DV")],
    resident=[("BLOCK_T", "BLOCK_D"), ("BLOCK_T", "BLOCK_DV")],
    dots=_BACKWARD_SCORE_DOTS + [("BLOCK_T", "BLOCK_DQ", "BLOCK_S")],
)
GRAD_KEY_VALUE_DOT = _backward_dot(
    accumulators=[("BLOCK_S", "BLOCK_DQ"), ("BLOCK_S", "BLOCK_DV")], staged=[("BLOCK_T", "BLOCK_DQ"), ("BLOCK_T", "BLOCK_DV")],
    resident=[("BLOCK_S", "BLOCK_D"), ("BLOCK_S", "BLOCK_DV")],
    dots=_BACKWARD_SCORE_DOTS + [("BLOCK_S", "BLOCK_DV", "BLOCK_T"), ("BLOCK_S", "BLOCK_DQ", "BLOCK_T")],
)

_BACKWARD_ADDITIVE_TILES = (
    # (BLOCK_T, BLOCK_S, BLOCK_D, BLOCK_D_POLY, num_warps): small tiles, the atomics dominate;
    # the 8-warp ones hold one score element a thread, for IEEE float32 (see below).  First
    # (the untuned launch's): 16 + 16 features a step, where 32 on the SFU alone spill 80 B
    # a thread in the key-value kernel's 16-bit compile (ptxas sm_90, triton 3.9), which
    # reduces each step's gradient tile over both keys and queries.
    (16, 16, 16, 16, 4),
    (16, 16, 32, 0, 4),
    (16, 32, 16, 0, 4),
    (32, 16, 16, 0, 4),
    (16, 16, 32, 8, 4),
    (16, 16, 32, 0, 8),
    (16, 16, 16, 0, 8),
)


def _one_score_a_thread_for_fma_dots(configs, named_args, **kwargs):
    """The additive backward's prune: with IEEE float32 dots (FMA loops over the whole Dv)
    only the tiles of at most one score element a thread.  ptxas (sm_90, triton 3.9, the
    compile check's float32 problems, Dv 128 and 256) spills 0.8 to 3 KB a thread in every
    16x16 tile of 4 warps and none in those of 8; TF32 and 16-bit dots keep every config."""
    if {**named_args, **kwargs}.get("DOT_PRECISION") != "ieee":
        return configs
    light = [config for config in configs if config.kwargs["BLOCK_T"] * config.kwargs["BLOCK_S"] <= 32 * config.num_warps]
    return light or configs


def _backward_additive(reset_to_zero) -> KernelConfigs:
    return KernelConfigs(
        interpreted=FORWARD_ADDITIVE.interpreted,
        tuned=_additive_configs(_BACKWARD_ADDITIVE_TILES, num_stages=1),
        key=ATTENTION_KEY,
        reset_to_zero=reset_to_zero,
        prune=_one_score_a_thread_for_fma_dots,
    )


GRAD_QUERY_ADDITIVE = _backward_additive(())  # the row terms and the centers' gradient, stored
GRAD_KEY_VALUE_ADDITIVE = _backward_additive(("GRAD_Q", "GRAD_K", "GRAD_VA"))

# A decode step's additive backward (T = 1): one query row a block, as its forward, so that
# no tanh is spent on the 15 absent rows of a 16-row block; the tile products run on the
# FMA units, holding the (BLOCK_S, BLOCK_DV) float32 products of dA = dO V^T (and in the
# key-value kernel dV's too, beside its accumulator) in registers, which the prune bounds.
# Dot and cosine keep their 16-row blocks there: what those spend on absent rows is
# tensor-core products, which cost less than such products held in registers.
_BACKWARD_ADDITIVE_DECODE_TILES = (
    (1, 16, 16, 16, 4),
    (1, 16, 32, 0, 8),
    (1, 32, 16, 0, 8),
    (1, 16, 32, 8, 8),
)


def _backward_additive_decode(reset_to_zero, value_products: int) -> KernelConfigs:
    return KernelConfigs(
        interpreted=FORWARD_ADDITIVE_DECODE.interpreted,
        tuned=_additive_configs(_BACKWARD_ADDITIVE_DECODE_TILES, num_stages=1),
        key=ATTENTION_KEY,
        reset_to_zero=reset_to_zero,
        prune=_fits(accumulators=[("BLOCK_S", "BLOCK_DV")] * value_products, staged=[],
                    register_budget=BACKWARD_REGISTER_BUDGET),
    )


GRAD_QUERY_ADDITIVE_DECODE = _backward_additive_decode((), value_products=1)
GRAD_KEY_VALUE_ADDITIVE_DECODE = _backward_additive_decode(("GRAD_Q", "GRAD_K", "GRAD_VA"), value_products=3)

COMBINE = KernelConfigs(
    interpreted=_interpreted("BLOCK_T"),
    tuned=(
        Config({"BLOCK_T": 16}, num_warps=4, num_stages=1),
        Config({"BLOCK_T": 16}, num_warps=8, num_stages=1),
        Config({"BLOCK_T": 32}, num_warps=8, num_stages=1),
    ),
    key=("T", "DV"),
)

# Hard attention's programs of one row of S weights: (BLOCK_S, num_warps), wider for longer rows.
_HARD_ATTENTION_ROWS = ((128, 1), (512, 2), (1024, 4), (2048, 8))

HARD_ATTENTION = KernelConfigs(
    interpreted=_interpreted("BLOCK_S", "BLOCK_D"),
    tuned=tuple(Config({"BLOCK_S": block, "BLOCK_D": block // 2}, num_warps=warps, num_stages=1)
                for block, warps in _HARD_ATTENTION_ROWS),
    key=("S", "DV"),
)

HARD_ATTENTION_WEIGHTS_BACKWARD = KernelConfigs(
    interpreted=_interpreted("BLOCK_S"),
    tuned=tuple(Config({"BLOCK_S": block}, num_warps=warps, num_stages=1) for block, warps in _HARD_ATTENTION_ROWS),
    key=("S",),
)

HARD_ATTENTION_VALUES_BACKWARD = KernelConfigs(
    interpreted=_interpreted("BLOCK_D"),
    tuned=(
        Config({"BLOCK_D": 64}, num_warps=1, num_stages=1),
        Config({"BLOCK_D": 128}, num_warps=1, num_stages=1),
        Config({"BLOCK_D": 256}, num_warps=2, num_stages=1),
    ),
    key=("T", "DV"),
    reset_to_zero=("GRAD_VALUES",),  # it adds into the sums
)

RECURRENT_POINTWISE = KernelConfigs(
    interpreted=_interpreted("BLOCK_B", "BLOCK_H"),
    tuned=(
        Config({"BLOCK_B": 16, "BLOCK_H": 64}, num_warps=4, num_stages=1),
        Config({"BLOCK_B": 16, "BLOCK_H": 128}, num_warps=4, num_stages=1),
        Config({"BLOCK_B": 32, "BLOCK_H": 128}, num_warps=8, num_stages=1),
        Config({"BLOCK_B": 64, "BLOCK_H": 64}, num_warps=8, num_stages=1),
        Config({"BLOCK_B": 8, "BLOCK_H": 256}, num_warps=4, num_stages=1),
    ),
    key=("B", "H"),
)

RECURRENT_STEP = KernelConfigs(
    # Small batches: the step's GEMMs read W_ih and W_hh once per batch block, so narrow
    # hidden blocks spread the weights over many programs; the wide ones are for large
    # batches.  A program holds four BLOCK_B x BLOCK_H gate tiles and runs eight GEMM
    # loops: ptxas (sm_90, triton 3.9, the compile check's problems, every dtype) spills
    # at most 248 B a thread in these, where 64x32 tiles with K tiles of 64 in 4 warps
    # spilled 0.6 to 2.6 KB and 16x16x128 in 2 warps 2 KB (float32).
    interpreted=_interpreted("BLOCK_B", "BLOCK_H", "BLOCK_K"),
    tuned=(
        Config({"BLOCK_B": 16, "BLOCK_H": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        Config({"BLOCK_B": 16, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        Config({"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_K": 32}, num_warps=2, num_stages=4),
        Config({"BLOCK_B": 32, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        Config({"BLOCK_B": 64, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        Config({"BLOCK_B": 32, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        Config({"BLOCK_B": 128, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ),
    key=("I", "B", "H"),
)

INPUT_PROJECTION = KernelConfigs(
    # A GEMM of T·B rows: the usual tensor-core tiles; the prune keeps the small ones for
    # IEEE float32 dots (FMA loops).
    interpreted=_interpreted("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    tuned=(
        Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    ),
    key=("M", "N", "K"),
    prune=_fits(
        accumulators=[("BLOCK_M", "BLOCK_N")], staged=[("BLOCK_M", "BLOCK_K"), ("BLOCK_N", "BLOCK_K")],
        dots=[("BLOCK_M", "BLOCK_N", "BLOCK_K")],
    ),
)
