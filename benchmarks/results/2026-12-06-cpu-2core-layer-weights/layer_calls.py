"""Per-call time of fastattn.nn.LSTM / GRU layers, float32, gradients off, next to
torch.nn's with the same weights: one step (T=1, B=1, the per-token decoder loop of many
seq2seq tutorials) at H=256 and 512, and T=100, B=32, H=256.  Best and median of timeit
repeats, in microseconds.  Run from a checkout with that checkout first on PYTHONPATH,
once per build, alternating builds (README.md in this directory).

    PYTHONPATH=$PWD python benchmarks/results/2026-12-06-cpu-2core-layer-weights/layer_calls.py
"""

import statistics
import timeit

import torch

import fastattn


def best_and_median_microseconds(call, number):
    call()
    times = [t / number * 1e6 for t in timeit.repeat(call, number=number, repeat=7)]
    return min(times), statistics.median(times)


def main():
    torch.manual_seed(0)
    for kind in ("LSTM", "GRU"):
        for steps, batch, hidden, number in ((1, 1, 256, 200), (1, 1, 512, 50), (100, 32, 256, 3)):
            theirs = getattr(torch.nn, kind)(hidden, hidden)
            ours = getattr(fastattn.nn, kind)(hidden, hidden)
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn(steps, batch, hidden)
            with torch.no_grad():
                mine, torchs = (best_and_median_microseconds(lambda m=m: m(x), number) for m in (ours, theirs))
            print(f"{kind} T={steps} B={batch} H={hidden}|{mine[0]:.0f}|{mine[1]:.0f}|{torchs[0]:.0f}|{torchs[1]:.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
