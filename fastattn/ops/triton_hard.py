"""Hard attention's position choice on Triton: ``torch.ops.fastattn.triton_choose_positions``
(argmax, or a Philox draw reproducible for a fixed seed) and the ``choose_positions``
function that ``fastattn.ops.attention.hard_attention`` calls with the soft weights.
The seed comes from the caller's ``torch.Generator`` (or torch's default one), so
``torch.manual_seed`` and ``generator.manual_seed`` make the draws repeat.
"""

import torch
from torch import Tensor

from fastattn.kernels.hard_sampling import choose_positions_kernel
from fastattn.ops import triton_checks
from fastattn.ops.triton_configs import CHOOSE_POSITIONS
from fastattn.ops.triton_eager import triton_op
from fastattn.ops.triton_launch import Launcher

LAUNCHER = Launcher(choose_positions_kernel, CHOOSE_POSITIONS)


@triton_op("fastattn::triton_choose_positions")
def triton_choose_positions(weights: Tensor, sample: bool, seed: int) -> Tensor:
    """weights (..., S) -> index (...) int64 (see fastattn.kernels.hard_sampling)."""
    triton_checks.positions("triton_choose_positions", weights)
    source_length = weights.shape[-1]
    rows = weights.numel() // max(source_length, 1)
    index = weights.new_empty(weights.shape[:-1], dtype=torch.int64)
    LAUNCHER(lambda meta: (rows,), weights.contiguous(), index, source_length, seed, SAMPLE=sample)
    return index


def choose_positions(weights: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
    """The ``choose_positions`` of ``fastattn.ops.attention.hard_attention``."""
    seed = 0
    if sample:
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
    return triton_choose_positions(weights, sample, seed)
