"""One process's median time of fastattn.attention with the general score at the bench's
shape (B=32, T=S=64, D=256, cpu backend) and the minor page faults a call takes.  Run in
several processes: glibc's malloc serves the call's 2 MiB tensors (q W_a, the context)
either from its heap (no faults) or from fresh mmaps whose pages fault in on every call,
depending on the process's history, and the time follows the faults.
"""

import resource
import time

import torch

from fastattn.functional.attention import attention


def main():
    torch.manual_seed(0)
    query, keys, values = torch.randn(32, 64, 256), torch.randn(32, 64, 256), torch.randn(32, 64, 256)
    weight = torch.randn(256, 256) / 16

    def call():
        return attention(query, keys, values, score="general", weight=weight)

    for _ in range(50):
        call()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(300):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    times.sort()
    print(f"general {times[150] * 1e6:6.0f} us, minor faults per call {faults / 300:.0f}")


if __name__ == "__main__":
    main()
