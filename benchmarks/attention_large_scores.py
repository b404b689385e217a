"""Times fastattn.attention on the cpu backend (the matrix-multiply path) and on the
reference in the same process, at sizes where the (N, T, S) scores are large, dot and
cosine scores, and prints one JSON line of ms per case:

    python benchmarks/attention_large_scores.py forward|backward [--dtype bfloat16]
        [--statistic best]

``forward`` times the forward without gradients, ``backward`` the backward.  ``median``
(the default): the median of 10 calls (30 at N=8) after 3 warm-up calls; ``best``: the
best of 5 calls (20 at N=8) after one.  The results folders that cite it
(benchmarks/results/2026-12-06-cpu-2core-*-blocks/) run it alternating two builds and
summarise the lines with summarise.py there."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastattn

SHAPES = [(1, 2048, 4096, 128), (2, 1024, 2048, 64), (8, 256, 256, 64)]


def timed(call, large: bool, statistic: str) -> float:
    warm_up, repeats = (3, 10 if large else 30) if statistic == "median" else (1, 5 if large else 20)
    for _ in range(warm_up):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return (statistics.median(times) if statistic == "median" else min(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=["forward", "backward"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--statistic", choices=["median", "best"], default="median")
    arguments = parser.parse_args()
    dtype, backward = getattr(torch, arguments.dtype), arguments.direction == "backward"
    torch.manual_seed(0)
    results = {}
    for score in ("dot", "cosine"):
        for batch, queries, keys_length, dim in SHAPES:
            leaves = [torch.randn(batch, length, dim, dtype=dtype, requires_grad=backward)
                      for length in (queries, keys_length, keys_length)]
            grad = torch.randn(batch, queries, dim, dtype=dtype)
            for backend in ("cpu", "reference"):
                with fastattn.backend(backend):
                    if backward:
                        context = fastattn.attention(*leaves, score=score)
                        call = lambda: torch.autograd.grad(context, leaves, grad, retain_graph=True)  # noqa: E731
                    else:
                        call = lambda: fastattn.attention(*leaves, score=score)  # noqa: E731
                    with torch.set_grad_enabled(backward):
                        name = f"{score} N={batch} T={queries} S={keys_length} D={dim} {backend}"
                        results[name] = timed(call, queries * keys_length > 10**6, arguments.statistic)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
