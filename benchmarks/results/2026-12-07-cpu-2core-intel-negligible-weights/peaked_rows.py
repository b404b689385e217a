"""The cpu backend's attention on rows whose weights run down past float32's subnormals
(q and k of unit entries: scores of standard deviation sqrt(D)) against the same problems
with flat rows (q scaled by 0.01), at one and two threads.  Median of 15 calls after 3.

    PYTHONPATH=<tree with a built fastattn> python peaked_rows.py
"""

import time

import torch

import fastattn

CASES = [  # (name, N, T or None for a decode step, S, D, dtype)
    ("decode step", 64, None, 64, 512, torch.float32),
    ("decode step", 64, None, 64, 1024, torch.float32),
    ("decode step", 64, None, 64, 512, torch.bfloat16),
    ("multi-query", 8, 64, 64, 512, torch.float32),
    ("multi-query", 16, 64, 256, 256, torch.float32),
    ("multi-query", 8, 64, 64, 512, torch.bfloat16),
]


def median_us(function, calls=15):
    for _ in range(3):
        function()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1e6


def forward_backward(query, keys):
    leaves = [query.detach().requires_grad_(), keys.detach().requires_grad_()]
    fastattn.attention(*leaves, score="dot").float().sum().backward()


def main():
    fastattn.set_backend("cpu")
    print(f"fastattn from {fastattn.__file__}, torch {torch.__version__}")
    print(f"{'case':<42} {'threads':>7} {'rows':>6} {'forward':>9} {'+weights':>9} {'fwd+bwd':>9}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, batch, queries, source, dim, dtype in CASES:
            generator = torch.Generator().manual_seed(0)
            keys = torch.randn(batch, source, dim, generator=generator).to(dtype)
            shape = (batch, dim) if queries is None else (batch, queries, dim)
            unit_query = torch.randn(*shape, generator=generator)
            label = f"{name} N={batch} T={queries or 1} S={source} D={dim} {str(dtype)[6:]}"
            for rows, scale in (("peaked", 1.0), ("flat", 0.01)):
                query = (unit_query * scale).to(dtype)
                times = (median_us(lambda: fastattn.attention(query, keys, score="dot")),
                         median_us(lambda: fastattn.attention(query, keys, score="dot", return_weights=True)),
                         median_us(lambda: forward_backward(query, keys)))
                print(f"{label:<42} {threads:>7} {rows:>6} " + " ".join(f"{t:>9.0f}" for t in times))


if __name__ == "__main__":
    main()
