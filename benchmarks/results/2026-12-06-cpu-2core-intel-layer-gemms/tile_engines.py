"""Times one float32 GEMM h (M, K) @ b (K, N), split over the threads by columns, in the
ways a fastattn float32 tile can run (tile_engines.cpp): brgemm per block of columns (b
row-major, or packed block by block), sgemm per block, one sgemm per thread, at::mm_out on
views per block.  Prints GFLOP/s over all threads (after 3 untimed calls) and the largest
difference from h @ b.

    python tile_engines.py M K N BLOCK[,BLOCK...]
"""

import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

WAYS = ("brgemm", "brgemm packed", "sgemm", "sgemm thread", "at::mm_out")
DEPTH, REPEATS = 256, 30


def main():
    M, K, N = (int(v) for v in sys.argv[1:4])
    blocks = [int(v) for v in sys.argv[4].split(",")]
    module = load("tile_engines", [str(Path(__file__).with_name("tile_engines.cpp"))], extra_cflags=["-O3"])
    generator = torch.Generator().manual_seed(0)
    h, w = torch.randn(M, K, generator=generator), torch.randn(N, K, generator=generator)
    b = torch.empty(K, N + 16)[:, :N].copy_(w.t())  # rows not 4 KiB apart, as as_tile_operand pads them
    exact = h @ b
    print(f"{torch.get_num_threads()} threads, M={M} K={K} N={N}")
    for block in blocks:
        packed = b.reshape(K, N // block, block).permute(1, 0, 2).contiguous()
        for way, name in enumerate(WAYS):
            c = torch.zeros(M, N)
            module.time_gemm(h, b, packed, c, way, DEPTH, block, 3)  # warm-up: brgemm's JIT, the BLAS's buffers
            seconds = module.time_gemm(h, b, packed, c, way, DEPTH, block, REPEATS)
            error = (c - exact).abs().max().item()
            print(f"block {block:4d}  {name:14s} {2 * M * K * N / seconds / 1e9:6.0f} GFLOP/s  error {error:.1e}")


if __name__ == "__main__":
    main()
