"""Times fastattn.nn.LSTM's forward and backward at T=100, B=64, H=1024 (float32) three
times after one untimed call, and prints the FASTATTN_CPU_LAYER_GEMM setting in effect:

    for i in 1 2; do for s in blas "" brgemm; do
        FASTATTN_CPU_LAYER_GEMM=$s python lstm_forward_backward.py "[$s]"; done; done
"""

import sys
import time

import torch

import fastattn

torch.manual_seed(0)
T, B, H = 100, 64, 1024
x = torch.randn(T, B, H, requires_grad=True)
layer = fastattn.nn.LSTM(H, H)


def forward_and_backward():
    output, _ = layer(x)
    output.sum().backward()


forward_and_backward()
milliseconds = []
for _ in range(3):
    start = time.perf_counter()
    forward_and_backward()
    milliseconds.append((time.perf_counter() - start) * 1e3)
print(sys.argv[1] if len(sys.argv) > 1 else "", fastattn.info()["cpu_kernels"][-1],
      " ".join(f"{ms:.0f}" for ms in milliseconds))
