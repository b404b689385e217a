"""Times the cpu backend's hard attention for one decoding step of an image captioner (B=16,
one query, keys and values a 7 x 7 grid, D=Dv=256, sampled with a generator), where host
time dominates: forward without gradients, and forward and backward (query, keys and
values need gradients; loss = context.sum() + log_prob.sum()).  Median and fastest of 500
calls each, after 50 untimed ones.

    PYTHONPATH=<a build's tree> python hard_decode_step.py
"""

import time

import torch

import fastattn


def timed(name, call, calls=500):
    for _ in range(50):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"{name:44s} median {times[calls // 2] * 1e6:8.1f} us  fastest {times[0] * 1e6:8.1f} us")


def main():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(16, 1, 256, generator=generator)
    keys, values = (torch.randn(16, 7, 7, 256, generator=generator) for _ in range(2))
    leaves = [tensor.clone().requires_grad_() for tensor in (query, keys, values)]
    draws = torch.Generator().manual_seed(1)
    with fastattn.backend("cpu"):

        def forward_backward():
            context, _, log_prob, _ = fastattn.hard_attention(*leaves, generator=draws)
            (context.sum() + log_prob.sum()).backward()

        timed("decode-step hard attention forward", lambda: fastattn.hard_attention(query, keys, values, generator=draws))
        timed("decode-step hard attention forward + backward", forward_backward)


if __name__ == "__main__":
    main()
