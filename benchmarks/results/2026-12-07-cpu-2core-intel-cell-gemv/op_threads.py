"""The bare fastattn::lstm_cell_forward op in a tight loop at a few rows, with ATen's
threads set to the first argument (1: every projection one GEMV; 2: split over the weight
rows where csrc/cpu/tile_gemm.h's matmul_transposed_into splits): best and median of 5
runs, in microseconds.  README.md in this directory.

    PYTHONPATH=$PWD python benchmarks/results/2026-12-07-cpu-2core-intel-cell-gemv/op_threads.py 1
"""

import sys
import time

import torch

import fastattn  # noqa: F401  (loads the ops)


def main():
    torch.set_num_threads(int(sys.argv[1]))
    batches = [int(b) for b in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 2, 4]
    hiddens = [int(h) for h in sys.argv[3].split(",")] if len(sys.argv) > 3 else [32, 64, 128, 256, 512]
    for batch in batches:
        for hidden in hiddens:
            x, h, c = torch.randn(batch, hidden), torch.randn(batch, hidden), torch.randn(batch, hidden)
            w_ih, w_hh, bias = torch.randn(4 * hidden, hidden), torch.randn(4 * hidden, hidden), torch.randn(4 * hidden)
            arguments = (x, h, c, w_ih, w_hh, bias, bias)
            times = []
            for _ in range(5):
                for _ in range(100):
                    torch.ops.fastattn.lstm_cell_forward(*arguments)
                number = 2000 if hidden < 256 else 500
                start = time.perf_counter()
                for _ in range(number):
                    torch.ops.fastattn.lstm_cell_forward(*arguments)
                times.append((time.perf_counter() - start) / number * 1e6)
            times.sort()
            print(f"B={batch} H={hidden} macs/gemm={batch * 4 * hidden * hidden}: best {times[0]:.1f} med {times[2]:.1f}")


if __name__ == "__main__":
    main()
