"""Times fastattn.attention with float32 inputs on the cpu backend (the matrix-multiply
path) and on the reference in the same process, at sizes where the (N, T, S) scores are
large: `python attention_float32.py forward` the forward without gradients, `backward`
the backward.  The median of 10 calls each (30 at N=8), after 3 warm-up calls, in ms, as
one JSON line."""
import json
import statistics
import sys
import time

import torch

import fastattn

SHAPES = [(1, 2048, 4096, 128), (2, 1024, 2048, 64), (8, 256, 256, 64)]


def median_of(call, repeats):
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(direction):
    torch.manual_seed(0)
    results = {}
    backward = direction == "backward"
    for score in ("dot", "cosine"):
        for batch, queries, keys_length, dim in SHAPES:
            leaves = [torch.randn(batch, length, dim, requires_grad=backward) for length in (queries, keys_length, keys_length)]
            grad = torch.randn(batch, queries, dim)
            repeats = 10 if queries * keys_length > 10**6 else 30
            for backend in ("cpu", "reference"):
                name = f"{score} N={batch} T={queries} S={keys_length} D={dim} {backend}"
                with fastattn.backend(backend):
                    if backward:
                        context = fastattn.attention(*leaves, score=score)
                        call = lambda: torch.autograd.grad(context, leaves, grad, retain_graph=True)  # noqa: E731
                    else:
                        call = lambda: fastattn.attention(*leaves, score=score)  # noqa: E731
                    with torch.set_grad_enabled(backward):
                        results[name] = median_of(call, repeats)
    print(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("forward", "backward"):
        sys.exit("usage: python attention_float32.py forward|backward")
    main(sys.argv[1])
