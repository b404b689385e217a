"""attention_forward on the matrix-multiply path with the weights returned and no values
(Dv = 0, as hard attention runs it), B=32, T=S=64, dot score: at D=4 the GEMM is ~10 us, so
the time is the row passes' (the mask pass, softmax and logsumexp); at D=256 the bench's
shape.  Median and fastest of 400 calls, five rounds each.

    PYTHONPATH=<a build's tree> python softmax_rows.py
"""

import time

import torch

import fastattn  # noqa: F401  (loads the ops)


def timed(call, calls=400):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[calls // 2] * 1e6, times[0] * 1e6


def main():
    torch.manual_seed(0)
    for dim in (4, 256):
        query, keys = torch.randn(32, 64, dim), torch.randn(32, 64, dim)
        no_values = keys.new_empty(32, 64, 0)

        def call():
            return torch.ops.fastattn.attention_forward(query, keys, no_values, None, None, "dot", 0.125, None, None,
                                                        False, None, None, False, True)

        for _ in range(50):
            call()
        rounds = [timed(call) for _ in range(5)]
        medians = " ".join(f"{median:6.1f}" for median, _ in rounds)
        print(f"D={dim:3d}: medians {medians} us; fastest {min(fastest for _, fastest in rounds):6.1f} us")


if __name__ == "__main__":
    main()
