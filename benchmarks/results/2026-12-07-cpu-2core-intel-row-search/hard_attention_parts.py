"""Times the parts of the cpu backend's hard attention at the bench's shape (B=32, T=S=64,
D=256, scaled_dot, argmax): the whole call, attention_forward with the weights and no
values (what hard_attention runs), sample_positions (argmax and sampling) and the
reference's outputs_at, which the op composes.  Median and fastest of 300 calls each.

    PYTHONPATH=<a build's tree> python hard_attention_parts.py
"""

import time

import torch

from fastattn.functional.attention import hard_attention
from fastattn.reference.hard import outputs_at


def timed(name, call, calls=300):
    for _ in range(30):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"{name:40s} median {times[calls // 2] * 1e6:8.1f} us  fastest {times[0] * 1e6:8.1f} us")


def main():
    torch.manual_seed(0)
    query, keys = torch.randn(32, 64, 256), torch.randn(32, 64, 256)
    no_values = keys.new_empty(32, 64, 0)
    _, index, _, weights = hard_attention(query, keys, score="scaled_dot", sample=False)
    timed("hard_attention", lambda: hard_attention(query, keys, score="scaled_dot", sample=False))
    timed("attention_forward, weights, Dv = 0", lambda: torch.ops.fastattn.attention_forward(
        query, keys, no_values, None, None, "dot", 0.0625, None, None, False, None, None, False, True))
    timed("sample_positions, argmax", lambda: torch.ops.fastattn.sample_positions(weights, False, None))
    timed("sample_positions, sampled", lambda: torch.ops.fastattn.sample_positions(weights, True, None))
    timed("outputs_at (reference)", lambda: outputs_at(weights, index, keys))


if __name__ == "__main__":
    main()
