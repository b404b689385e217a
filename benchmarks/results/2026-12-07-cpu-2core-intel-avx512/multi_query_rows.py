"""Times fastattn.attention (dot and cosine scores, float32) at B=32, T=S=64, D=256 on the
cpu backend: the fastest and the median of 300 calls after 30 untimed ones.

    python multi_query_rows.py <label>
"""
import torch, fastattn, time, sys
torch.manual_seed(0)
q, k, v = (torch.randn(32, 64, 256) for _ in range(3))
out = []
for score in ("dot", "cosine"):
    f = lambda: fastattn.attention(q, k, v, score=score)
    for _ in range(30): f()
    ts = []
    for _ in range(300):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    ts.sort(); out.append(f"{score} min {ts[0]*1e6:.0f} med {ts[150]*1e6:.0f}")
print(sys.argv[1], fastattn.info()["cpu_kernels"][0], " | ".join(out))
