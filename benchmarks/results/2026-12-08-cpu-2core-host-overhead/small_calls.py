"""Per-call time of small fastattn calls, where the host side (Python checks, folding,
backend choice, dispatch, ATen's GEMM calls) is most of the time, next to torch's own
call for the same work: the best of 5 timeit repeats, in microseconds, with gradients off,
then the cells' forward and backward.  Run once per checkout with that checkout first on
PYTHONPATH, alternating checkouts (README.md here).

    PYTHONPATH=$PWD python benchmarks/results/2026-12-08-cpu-2core-host-overhead/small_calls.py
"""

import timeit

import torch

import fastattn


def best_microseconds(call, number=4000):
    call()
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def attention_rows():
    query, keys, lengths = torch.randn(4, 32), torch.randn(4, 16, 32), torch.full((4,), 16)
    big_query, big_keys = torch.randn(32, 256), torch.randn(32, 64, 256)
    head_query, head_keys = torch.randn(2, 4, 1, 32), torch.randn(2, 4, 16, 32)
    q_proj, k_proj, v = torch.randn(4, 32), torch.randn(4, 16, 32), torch.randn(32)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return [
        ("attention decode B=4 S=16 D=32", lambda: fastattn.attention(query, keys)),
        ("attention decode B=4 S=16 D=32, lengths", lambda: fastattn.attention(query, keys, lengths=lengths)),
        ("torch sdpa decode B=4 S=16 D=32 (4-D)", lambda: sdpa(query[:, None, None], keys[:, None], keys[:, None])),
        ("attention decode B=32 S=64 D=256", lambda: fastattn.attention(big_query, big_keys)),
        ("torch sdpa decode B=32 S=64 D=256 (4-D)",
         lambda: sdpa(big_query[:, None, None], big_keys[:, None], big_keys[:, None])),
        ("additive_attention decode B=4 S=16 Da=32", lambda: fastattn.additive_attention(q_proj, k_proj, v, keys)),
        ("sdpa (2,4,1,32) x (2,4,16,32)", lambda: fastattn.scaled_dot_product_attention(head_query, head_keys, head_keys)),
        ("torch sdpa (2,4,1,32) x (2,4,16,32)", lambda: sdpa(head_query, head_keys, head_keys)),
    ]


def cell_rows():
    rows = []
    for batch, hidden in ((1, 32), (4, 32), (1, 128)):
        x, h, c = torch.randn(batch, hidden), torch.randn(batch, hidden), torch.randn(batch, hidden)
        for name, ours, theirs, state in (
            ("LSTMCell", fastattn.nn.LSTMCell, torch.nn.LSTMCell, (h, c)),
            ("GRUCell", fastattn.nn.GRUCell, torch.nn.GRUCell, h),
        ):
            cell, torch_cell = ours(hidden, hidden), theirs(hidden, hidden)
            rows.append((f"{name} B={batch} H={hidden}", lambda cell=cell, x=x, state=state: cell(x, state)))
            rows.append((f"torch {name} B={batch} H={hidden}", lambda cell=torch_cell, x=x, state=state: cell(x, state)))
    return rows


def cell_training_rows():
    """One step forward and backward, the gradients of the inputs and the weights."""
    rows = []
    for batch, hidden in ((1, 32), (4, 32), (4, 128)):
        x, h, c = (torch.randn(batch, hidden, requires_grad=True) for _ in range(3))
        for name, ours, theirs, state in (
            ("LSTMCell", fastattn.nn.LSTMCell, torch.nn.LSTMCell, (h, c)),
            ("GRUCell", fastattn.nn.GRUCell, torch.nn.GRUCell, h),
        ):
            for prefix, module in (("", ours(hidden, hidden)), ("torch ", theirs(hidden, hidden))):
                tensors = (x, h, c, *module.parameters())

                def step(module=module, x=x, state=state, tensors=tensors):
                    outputs = module(x, state)
                    total = sum(o.sum() for o in outputs) if isinstance(outputs, tuple) else outputs.sum()
                    return torch.autograd.grad(total, tensors, allow_unused=True)

                rows.append((f"{prefix}{name} B={batch} H={hidden} forward+backward", step))
    return rows


def decoder_rows():
    rows = []
    for score in ("additive", "scaled_dot"):
        decoder = fastattn.nn.AttentionDecoderCell(32, 32, 32, score=score)
        cache = decoder.precompute(torch.randn(4, 16, 32))
        previous, state = torch.randn(4, 32), None
        rows.append((f"AttentionDecoderCell {score} B=4 S=16 H=32",
                     lambda decoder=decoder, cache=cache, previous=previous: decoder(previous, state, cache)))
    return rows


def main():
    torch.manual_seed(0)
    for name, call in attention_rows() + cell_rows() + decoder_rows():
        with torch.no_grad():
            print(f"{name}|{best_microseconds(call):.2f}", flush=True)
    for name, call in cell_training_rows():
        print(f"{name}|{best_microseconds(call, number=1000):.2f}", flush=True)


if __name__ == "__main__":
    main()
