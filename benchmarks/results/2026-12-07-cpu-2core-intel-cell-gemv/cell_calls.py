"""Per-call time of fastattn.nn.LSTMCell / GRUCell steps at a few rows (B <= 4), where
csrc/cpu/tile_gemm.h's matmul_transposed_into chooses one GEMV or a split over the weight
rows: the best of 5 timeit repeats, in microseconds, with gradients off and on.  Run from
a checkout with that checkout first on PYTHONPATH, once per build, alternating builds
(README.md in this directory).

    PYTHONPATH=$PWD python benchmarks/results/2026-12-07-cpu-2core-intel-cell-gemv/cell_calls.py
"""

import timeit

import torch

import fastattn


def best_microseconds(call, number):
    call()
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def main():
    torch.manual_seed(0)
    for batch in (1, 2, 4):
        for hidden in (32, 64, 128, 160, 192, 256):
            lstm, gru = fastattn.nn.LSTMCell(hidden, hidden), fastattn.nn.GRUCell(hidden, hidden)
            x, h, c = torch.randn(batch, hidden), torch.randn(batch, hidden), torch.randn(batch, hidden)
            number = 2000 if hidden <= 128 else 500
            for name, call in ((f"LSTMCell B={batch} H={hidden}", lambda: lstm(x, (h, c))),
                               (f"GRUCell B={batch} H={hidden}", lambda: gru(x, h))):
                with torch.no_grad():
                    without = best_microseconds(call, number)
                print(f"{name}|{without:.2f}|{best_microseconds(call, number):.2f}", flush=True)


if __name__ == "__main__":
    main()
