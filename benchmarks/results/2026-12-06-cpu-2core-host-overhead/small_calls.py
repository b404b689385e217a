"""Per-call time of small fastattn calls, where the host side (Python, dispatch, thread
wake-ups) is most of the time: the best of 5 timeit repeats, in microseconds, with
gradients off and on.  Run from a checkout with that checkout first on PYTHONPATH, once
per build, alternating builds (README.md in this directory).

    PYTHONPATH=$PWD python benchmarks/results/2026-12-06-cpu-2core-host-overhead/small_calls.py
"""

import timeit

import torch

import fastattn


def best_microseconds(call, number=5000):
    call()
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def main():
    torch.manual_seed(0)
    query, keys, lengths = torch.randn(4, 32), torch.randn(4, 16, 32), torch.full((4,), 16)
    head_query, head_keys = torch.randn(2, 4, 1, 32), torch.randn(2, 4, 16, 32)
    rows = [
        ("attention decode B=4 S=16 D=32, lengths", lambda: fastattn.attention(query, keys, lengths=lengths)),
        ("sdpa (2,4,1,32) x (2,4,16,32)", lambda: fastattn.scaled_dot_product_attention(head_query, head_keys, head_keys)),
    ]
    for batch, hidden in ((1, 32), (1, 64), (1, 128), (4, 32)):
        lstm, gru = fastattn.nn.LSTMCell(hidden, hidden), fastattn.nn.GRUCell(hidden, hidden)
        x, h, c = torch.randn(batch, hidden), torch.randn(batch, hidden), torch.randn(batch, hidden)
        rows.append((f"LSTMCell B={batch} H={hidden}", lambda lstm=lstm, x=x, h=h, c=c: lstm(x, (h, c))))
        rows.append((f"GRUCell B={batch} H={hidden}", lambda gru=gru, x=x, h=h: gru(x, h)))
    for name, call in rows:
        with torch.no_grad():
            without = best_microseconds(call)
        print(f"{name}|{without:.2f}|{best_microseconds(call):.2f}", flush=True)


if __name__ == "__main__":
    main()
