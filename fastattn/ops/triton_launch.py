"""How the Triton kernels are launched: block sizes, autotuning config lists, and the
interpreter switch.

On a GPU each kernel is wrapped in ``triton.autotune`` over a short explicit config
list keyed on the sizes that change the best tiling (T, S, D, Dv).  Under Triton's
interpreter (``TRITON_INTERPRET=1``, CPU tensors, the tests) nothing is tuned: every
kernel runs with 16-wide blocks, so that small odd test shapes still cross block
boundaries, loop over feature tiles and split the keys of a decode step.
"""

from __future__ import annotations

import os

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SMALLEST_BLOCK = 16  # tl.dot needs 16 rows and columns at least
INDEX_LIMIT = 2**31  # element offsets are int32 in the kernels

# Dot and cosine: query block × key block, the features walked in tiles of BLOCK_D
# (chosen by the caller from D).  The (16, ...) configs serve a decode step (T = 1).
DOT_CONFIGS = [
    triton.Config({"BLOCK_T": 64, "BLOCK_S": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_T": 128, "BLOCK_S": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_T": 64, "BLOCK_S": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 16, "BLOCK_S": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_T": 16, "BLOCK_S": 64}, num_warps=4, num_stages=3),
    # Wide values (Dv 512-1024, the seq2seq decode step) need narrow key blocks to fit.
    triton.Config({"BLOCK_T": 16, "BLOCK_S": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_T": 16, "BLOCK_S": 16}, num_warps=4, num_stages=1),
]
# Additive: a (BLOCK_T, BLOCK_S, BLOCK_D) tile of tanh per step, bound by the
# special-function unit; small tiles keep it in registers.
ADDITIVE_CONFIGS = [
    triton.Config({"BLOCK_T": 16, "BLOCK_S": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_T": 32, "BLOCK_S": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_T": 16, "BLOCK_S": 64, "BLOCK_D": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_T": 32, "BLOCK_S": 16, "BLOCK_D": 32}, num_warps=4, num_stages=2),
]
TUNING_KEY = ["T", "S", "D", "DV"]
# Key splits of a decode step are multiples of the largest BLOCK_S of any config.
SPLIT_GRANULE = SMALLEST_BLOCK if INTERPRETED else 128
# Below this many (query block, batch) programs the keys are split across programs.
TARGET_PROGRAMS = 4 if INTERPRETED else 264


def _is_fake(value) -> bool:
    return isinstance(value, torch.Tensor) and (isinstance(value, FakeTensor) or value.device.type == "meta")


def run_kernel(kernel, grid, *arguments, **constexprs):
    """``wrap_triton(kernel)[grid](...)``.  Under the interpreter a launch on fake tensors
    (opcheck, torch.compile tracing) is skipped, as Triton's higher-order op does for
    compiled kernels: only the outputs' shapes matter there, and the interpreter would
    read the fake tensors' memory.  The kernels index with 32-bit offsets, so a tensor
    of 2^31 elements or more is refused before the launch."""
    if INTERPRETED and any(map(_is_fake, arguments)):
        return
    for value in arguments:
        if isinstance(value, torch.Tensor) and not _is_fake(value) and value.numel() >= INDEX_LIMIT:
            raise ValueError(
                f"the triton backend indexes with 32-bit offsets and takes tensors of fewer than 2^31 "
                f"elements, got one of shape {tuple(value.shape)} for {kernel.__name__}; use the cuda "
                f"or reference backend for it"
            )
    torch.library.wrap_triton(kernel)[grid](*arguments, **constexprs)


def power_of_two_block(size: int, cap: int | None = None) -> int:
    block = max(SMALLEST_BLOCK, triton.next_power_of_2(size))
    return block if cap is None else min(block, cap)


class Launcher:
    """A kernel with its config list: ``launcher(grid, *args, **constexprs)``.

    ``grid`` is a function of the chosen meta-parameters (BLOCK_T, BLOCK_S, ...).
    ``reset_to_zero`` names buffers that the kernel accumulates into atomically,
    re-zeroed between autotuning trials.
    """

    def __init__(self, kernel, configs, reset_to_zero=None):
        self._interpreted_meta = {
            name: (SMALLEST_BLOCK if name.startswith("BLOCK") else value) for name, value in configs[0].kwargs.items()
        }
        if INTERPRETED:
            self._kernel = kernel
        else:
            key = [name for name in TUNING_KEY if name in kernel.arg_names]
            self._kernel = triton.autotune(configs, key=key, reset_to_zero=reset_to_zero)(kernel)

    def __call__(self, grid, *arguments, **constexprs):
        if INTERPRETED:
            meta = dict(self._interpreted_meta)
            run_kernel(self._kernel, grid(meta), *arguments, **constexprs, **meta)
        else:
            run_kernel(self._kernel, grid, *arguments, **constexprs)
