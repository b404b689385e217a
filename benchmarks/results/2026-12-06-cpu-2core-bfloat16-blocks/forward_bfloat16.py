"""Times the forward of fastattn.attention in bfloat16 on the cpu backend (the
matrix-multiply path) and of the reference in the same process, at sizes where the
(N, T, S) scores are large: the best of `repeats` calls each, in ms, as one JSON line."""
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


def main():
    torch.manual_seed(0)
    results = {}
    for score in ("dot", "cosine"):
        for batch, queries, keys_length, dim in SHAPES:
            leaves = [torch.randn(batch, length, dim, dtype=torch.bfloat16)
                      for length in (queries, keys_length, keys_length)]
            repeats = 5 if queries * keys_length > 10**6 else 20
            for backend in ("cpu", "reference"):
                name = f"{score} N={batch} T={queries} S={keys_length} D={dim} {backend}"
                with fastattn.backend(backend), torch.no_grad():
                    results[name] = best_of(lambda: fastattn.attention(*leaves, score=score), repeats)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
