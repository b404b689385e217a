"""Times a decode step of fastattn.attention (dot, cosine and general scores, float32) at
B=32, S=64, D=256 on the cpu backend: the fastest and the median of 2000 calls.

    python decode_step_rows.py <label>
"""
import torch, fastattn, time, sys
torch.manual_seed(0)
q, k, v = torch.randn(32, 256), torch.randn(32, 64, 256), torch.randn(32, 64, 256)
out = []
for score in ("dot", "cosine", "general"):
    kw = {"weight": torch.randn(256, 256) / 16} if score == "general" else {}
    f = lambda: fastattn.attention(q, k, v, score=score, **kw)
    for _ in range(50): f()
    ts = []
    for _ in range(2000):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    ts.sort(); out.append(f"{score} min {ts[0]*1e6:.1f} med {ts[1000]*1e6:.1f}")
print(sys.argv[1], " | ".join(out))
