"""Times the cpu backend's hard attention at the bench's shape (B=32, T=S=64, D=Dv=256,
scaled_dot, argmax): forward without gradients, forward and backward (query, keys and
values need gradients; loss = context.sum() + log_prob.sum()), and the outputs step alone on
the forward's weights and positions: hard_attention_outputs where the build has it, else
the reference's outputs_at, which the op composed before.  Then the forward and the forward
and backward for one decoding step of an image captioner (B=16, one query, keys and values
a 7 x 7 grid, D=Dv=256, sampled), where host time dominates.  Median and fastest of 200
calls each (500 for the decoding step), after a tenth as many untimed ones.

    PYTHONPATH=<a build's tree> python hard_outputs.py
"""

import time

import torch

import fastattn
from fastattn.reference.hard import outputs_at


def timed(name, call, calls=200):
    for _ in range(calls // 10):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"{name:46s} median {times[calls // 2] * 1e6:8.1f} us  fastest {times[0] * 1e6:8.1f} us")


def main():
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(32, 64, 256, generator=generator) for _ in range(3))
    leaves = [tensor.clone().requires_grad_() for tensor in (query, keys, values)]
    with fastattn.backend("cpu"):
        _, index, _, weights = fastattn.hard_attention(query, keys, values, sample=False)

        def forward_backward():
            context, _, log_prob, _ = fastattn.hard_attention(*leaves, sample=False)
            (context.sum() + log_prob.sum()).backward()

        timed("hard_attention forward", lambda: fastattn.hard_attention(query, keys, values, sample=False))
        timed("hard_attention forward + backward", forward_backward)
    if hasattr(torch.ops.fastattn, "hard_attention_outputs"):
        timed("outputs step: hard_attention_outputs", lambda: torch.ops.fastattn.hard_attention_outputs(weights, index, values))
    else:
        timed("outputs step: outputs_at", lambda: outputs_at(weights, index, values))
    decode_step()


def decode_step():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(16, 1, 256, generator=generator)
    keys, values = (torch.randn(16, 7, 7, 256, generator=generator) for _ in range(2))
    leaves = [tensor.clone().requires_grad_() for tensor in (query, keys, values)]
    draws = torch.Generator().manual_seed(1)
    with fastattn.backend("cpu"):

        def forward_backward():
            context, _, log_prob, _ = fastattn.hard_attention(*leaves, generator=draws)
            (context.sum() + log_prob.sum()).backward()

        timed("decode-step hard attention forward", lambda: fastattn.hard_attention(query, keys, values, generator=draws),
              calls=500)
        timed("decode-step hard attention forward + backward", forward_backward, calls=500)


if __name__ == "__main__":
    main()
