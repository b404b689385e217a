"""Under torch.autocast("cpu", dtype=torch.bfloat16), no gradients: fastattn against torch,
medians of per-call times in ms (the script behind autocast-*.txt, run from the checkout of
each build: `python autocast_bench.py`).  The first two lines print the output dtypes,
fastattn's then torch's."""
import torch, time, statistics, fastattn, sys
torch.manual_seed(0)
def med(f, n=30, warm=5):
    for _ in range(warm): f()
    ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return statistics.median(ts)*1e3
low=torch.bfloat16
results={}
# LSTM layer T=100,B=32,I=H=256 forward
x=torch.randn(100,32,256)
ours=fastattn.nn.LSTM(256,256); theirs=torch.nn.LSTM(256,256); theirs.load_state_dict(ours.state_dict())
with torch.no_grad(), torch.autocast("cpu",dtype=low):
    results["lstm layer fwd fastattn"]=med(lambda: ours(x))
    results["lstm layer fwd torch"]=med(lambda: theirs(x))
    print("dtype", ours(x)[0].dtype, theirs(x)[0].dtype)
# attention multi-query dot B=16 T=64 S=256 D=64 (heads 8)
q=torch.randn(16,8,64,64); k=torch.randn(16,8,256,64); v=torch.randn(16,8,256,64)
with torch.no_grad(), torch.autocast("cpu",dtype=low):
    results["sdpa fastattn"]=med(lambda: fastattn.scaled_dot_product_attention(q,k,v))
    results["sdpa torch"]=med(lambda: torch.nn.functional.scaled_dot_product_attention(q,k,v))
    print("dtype", fastattn.scaled_dot_product_attention(q,k,v).dtype, torch.nn.functional.scaled_dot_product_attention(q,k,v).dtype)
# decoder cell step B=32 H=256 S=50
dec=fastattn.nn.AttentionDecoderCell(256,256,256,score="additive")
keys=torch.randn(32,50,256); y=torch.randn(32,256)
with torch.no_grad(), torch.autocast("cpu",dtype=low):
    cache=dec.precompute(keys)
    st=dec(y,None,cache)[1]
    results["decoder step fastattn"]=med(lambda: dec(y,st,cache), n=200)
for k_,v_ in results.items(): print(f"{k_:30s} {v_:8.3f} ms")
