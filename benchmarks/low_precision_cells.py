"""One LSTM/GRU cell step in float16 or bfloat16 without gradients, as a decoder takes it
once a token: fastattn's cpu backend against torch.nn.LSTMCell / GRUCell holding the same
weights, in alternating rounds, each round the mean of ``--calls`` back-to-back calls; the
best and median round of each are printed, in microseconds.

    python benchmarks/low_precision_cells.py --batch 32 --hidden 256 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastattn

CELLS = {"lstm": (torch.nn.LSTMCell, fastattn.lstm_cell), "gru": (torch.nn.GRUCell, fastattn.gru_cell)}


def mean_call_seconds(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu_kernels {fastattn.info()['cpu_kernels']}, B={args.batch}, H={args.hidden}, no grad")
    print(f"{'case':<16} {'fastattn best':>14} {'median':>8} {'torch best':>11} {'median':>8}")
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for name, (module_class, function) in CELLS.items():
            module = module_class(args.hidden, args.hidden).to(dtype)
            x = torch.randn(args.batch, args.hidden, dtype=dtype)
            h = torch.randn(args.batch, args.hidden, dtype=dtype)
            state = (h, torch.randn(args.batch, args.hidden, dtype=dtype)) if name == "lstm" else h
            weights = (module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)
            ours, theirs = [], []
            with torch.no_grad(), fastattn.backend("cpu"):
                for call in (lambda: function(x, state, *weights), lambda: module(x, state)):
                    mean_call_seconds(call, args.calls // 4)  # warm-up
                for _ in range(args.rounds):
                    ours.append(mean_call_seconds(lambda: function(x, state, *weights), args.calls))
                    theirs.append(mean_call_seconds(lambda: module(x, state), args.calls))
            figures = [1e6 * f(times) for times in (ours, theirs) for f in (min, statistics.median)]
            print(f"{name + ' ' + str(dtype)[6:]:<16} {figures[0]:>14.1f} {figures[1]:>8.1f} {figures[2]:>11.1f} "
                  f"{figures[3]:>8.1f}")


if __name__ == "__main__":
    main()
