"""Times fastattn.attention with bfloat16 inputs on the cpu backend (the matrix-multiply
path) and on the reference in the same process, at sizes where the (N, T, S) scores are
large: `python attention_bfloat16.py forward` the forward without gradients, `backward`
the backward.  The best of 5 calls each (20 at N=8), in ms, as one JSON line."""
import json
import sys
import time

import torch

import fastattn

SHAPES = [(1, 2048, 4096, 128), (2, 1024, 2048, 64), (8, 256, 256, 64)]


def best_of(call, repeats):
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(direction):
    torch.manual_seed(0)
    results = {}
    for score in ("dot", "cosine"):
        for batch, queries, keys_length, dim in SHAPES:
            backward = direction == "backward"
            leaves = [torch.randn(batch, length, dim, dtype=torch.bfloat16, requires_grad=backward)
                      for length in (queries, keys_length, keys_length)]
            grad = torch.randn(batch, queries, dim, dtype=torch.bfloat16)
            repeats = 5 if queries * keys_length > 10**6 else 20
            for backend in ("cpu", "reference"):
                name = f"{score} N={batch} T={queries} S={keys_length} D={dim} {backend}"
                with fastattn.backend(backend):
                    if backward:
                        context = fastattn.attention(*leaves, score=score)
                        call = lambda: torch.autograd.grad(context, leaves, grad, retain_graph=True)  # noqa: E731
                    else:
                        call = lambda: fastattn.attention(*leaves, score=score)  # noqa: E731
                    with torch.set_grad_enabled(backward):
                        results[name] = best_of(call, repeats)
    print(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("forward", "backward"):
        sys.exit("usage: python attention_bfloat16.py forward|backward")
    main(sys.argv[1])
