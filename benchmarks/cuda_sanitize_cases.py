"""One small case of every CUDA kernel of csrc/cuda, forward and backward, checked
against the reference; exits 1 on any mismatch (2 when the CUDA kernels cannot run).

Small on purpose: benchmarks/gpu_check.sh runs it under ``compute-sanitizer --tool
memcheck`` and ``--tool racecheck``, which slow kernels down by orders of magnitude.
The cases reach every kernel and variant: the attention forward with one key split and
with several (plus the combine kernel, which then writes the weights), 16-byte and scalar loads, every
kernel score, the masks and the Gaussian, float16 natively, the tensor-core forward
(bfloat16: dot, cosine, additive) and backward (the same; grad_center), both per-row backward kernels, hard-attention positions (argmax and drawn) and the outputs there with their gradients,
fast_tanh, the LSTM/GRU step kernels of the cells, and layers with lengths (forward and
reverse) through both recurrent paths: the persistent kernels (one block per hidden
unit here, grid barrier; float32 FMAs, and the tensor cores in bfloat16) and the per-step
kernels (FASTATTN_CUDA_PERSISTENT_RNN=0), and
the one-launch attention-decoder step (LSTM + additive with lengths, GRU + dot with a key
padding mask, float32 scalar loads; three grid barriers; LSTM + additive in bfloat16,
16-byte loads; GRU + cosine in Bahdanau's order).

    python benchmarks/cuda_sanitize_cases.py
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.problems, run as a script

import fastattn  # noqa: E402
from fastattn import backends, reference  # noqa: E402
from tests.problems import key_dim_for, score_parameters  # noqa: E402

DEVICE = "cuda"


def report(name: str, got, want, tolerance: float) -> bool:
    """Prints one line per case; True when every tensor of `got` is close to `want`."""
    worst = 0.0
    for actual, expected in zip(got, want):
        if expected is None:
            continue
        expected = expected.detach()
        scale = max(1.0, float(expected.abs().max()))
        worst = max(worst, float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max()) / scale)
    ok = worst <= tolerance
    print(f"{'ok  ' if ok else 'FAIL'} {name:60s} max error {worst:.2e} (allowed {tolerance:.0e})")
    return ok


def leaves(*shapes, device, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype).requires_grad_()
            for shape in shapes]


def with_gradients(function, inputs):
    """Outputs of function(*inputs) and the gradients of a fixed projection of them."""
    outputs = function(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator().manual_seed(1)
    projection = sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device, o.dtype)).sum()
                     for o in outputs if o.is_floating_point())
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [*outputs, *torch.autograd.grad(projection, wanted, allow_unused=True)]


def attention_cases():
    """(name, score, (N, T, S, D, Dv), masking): the forward's 1 and 3 key splits
    (S = 96 over 2 rows), 16-byte (D = 8) and scalar (D = 5) loads, every mask."""
    lengths = torch.tensor([0, 70])
    padding = torch.arange(96).expand(2, 96) % 5 == 1
    center = torch.tensor([[3.5], [60.2]], dtype=torch.float64)
    for score in ("scaled_dot", "general", "location", "cosine", "additive"):
        yield f"{score} decode, key splits, lengths", score, (2, 1, 96, 8, 8), {"lengths": lengths}
    yield "scaled_dot decode, scalar loads, key_padding_mask", "scaled_dot", (2, 1, 96, 5, 3), {"key_padding_mask": padding}
    yield "additive decode, local-p Gaussian", "additive", (2, 1, 96, 8, 8), {"window": 6, "center": center}
    yield "cosine multi-query, causal", "cosine", (2, 9, 9, 8, 5), {"causal": True}
    yield "scaled_dot multi-query, local-m Gaussian", "scaled_dot", (2, 9, 40, 8, 8), {"window": 3, "gaussian": True}


def run_attention(score, shape, masking, device, dtype):
    batch, steps, source, query_dim, value_dim = shape
    key_dim = key_dim_for(score, query_dim, 6)
    query, keys, values = leaves((batch, steps, query_dim), (batch, source, key_dim), (batch, source, value_dim),
                                 device=device, dtype=dtype)
    parameters = score_parameters(score, query_dim, key_dim, attention_dim=8, max_source_len=source,
                                  generator=torch.Generator().manual_seed(2))
    parameters = {name: value.to(device, dtype).requires_grad_() for name, value in parameters.items()}
    masking = {name: value.to(device, dtype if value.is_floating_point() else value.dtype).requires_grad_(value.is_floating_point())
               if isinstance(value, torch.Tensor) else value for name, value in masking.items()}
    names = list(parameters)

    def attend(query, keys, values, *rest):
        given = dict(zip(names, rest[: len(names)]))
        return fastattn.attention(query, keys, values, score=score, return_weights=True, **given, **masking)

    floating_masks = [m for m in masking.values() if isinstance(m, torch.Tensor) and m.requires_grad]
    return with_gradients(attend, [query, keys, values, *parameters.values(), *floating_masks])


def check_attention() -> bool:
    ok = True
    for name, score, shape, masking in attention_cases():
        with fastattn.backend("reference"):
            want = run_attention(score, shape, masking, "cpu", torch.float64)
        with fastattn.backend("cuda"):
            got = run_attention(score, shape, masking, DEVICE, torch.float32)
        ok &= report(f"attention {name}", got, want, 1e-4)
    # float16 natively (the backend functions up-cast; the op itself does not).
    query, keys, values = leaves((2, 1, 16), (2, 96, 16), (2, 96, 16), device=DEVICE, dtype=torch.float16)

    def op(query, keys, values):
        context, weights, _ = torch.ops.fastattn.attention_forward(
            query, keys, values, None, None, "dot", 0.25, None, None, False, None, None, False, True)
        return context, weights

    def exact(query, keys, values):
        with fastattn.backend("reference"):
            return fastattn.attention(query, keys, values, score="scaled_dot", scale=0.25, return_weights=True)

    got = with_gradients(op, [query, keys, values])
    want = with_gradients(exact, [t.detach().double().cpu().requires_grad_() for t in (query, keys, values)])
    ok &= report("attention_forward/backward op, float16, 16-byte loads", got, want, 2e-2)
    ok &= check_tensor_core_attention()
    return ok


def check_tensor_core_attention() -> bool:
    """The tensor-core forward and backward (bfloat16 "dot", "cosine" and "additive", D =
    Dv = 64: 2 key tiles, a fully masked batch; dot with the local-p Gaussian too,
    grad_center included)."""
    query, keys, values = leaves((2, 20, 64), (2, 70, 64), (2, 70, 64), device=DEVICE, dtype=torch.bfloat16)
    v, bias = (torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in (1, 2))
    lengths = torch.tensor([0, 67])
    center = (torch.rand(2, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 70).to(torch.bfloat16)
    center = center.to(DEVICE).requires_grad_()
    ok = True
    for kernel_score, scale, local_p in (("dot", 0.125, False), ("cosine", 2.5, False), ("additive", 1.0, False),
                                         ("dot", 0.125, True)):
        additive = kernel_score == "additive"
        vectors = [v.to(DEVICE, torch.bfloat16), bias.to(DEVICE, torch.bfloat16)] if additive else [None, None]
        inputs = [query, keys, values, *([center] if local_p else [])]

        def op(query, keys, values, center=None):
            window = 6 if local_p else None
            return torch.ops.fastattn.attention_forward(query, keys, values, *vectors, kernel_score, scale,
                                                        lengths.to(DEVICE), None, False, window, center, local_p,
                                                        False)[0]

        def exact(query, keys, values, center=None):
            masking = {"lengths": lengths, **({"window": 6, "center": center, "gaussian": True} if local_p else {})}
            with fastattn.backend("reference"):
                if additive:
                    rounded = [t.to(torch.bfloat16).double() for t in (v, bias)]
                    return fastattn.additive_attention(query, keys, rounded[0], values, bias=rounded[1], **masking)
                score = "scaled_dot" if kernel_score == "dot" else kernel_score
                return fastattn.attention(query, keys, values, score=score, scale=scale, **masking)

        got = with_gradients(op, inputs)
        want = with_gradients(exact, [t.detach().double().cpu().requires_grad_() for t in inputs])
        masks = "lengths, local-p Gaussian" if local_p else "lengths"
        ok &= report(f"attention_forward op on the tensor cores, {kernel_score}, bfloat16, {masks}", got, want, 3e-2)
    return ok


def check_hard_attention_and_tanh() -> bool:
    weights = torch.rand(3, 4, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights[0, 0] = 0
    argmax = torch.ops.fastattn.sample_positions(weights.to(DEVICE), False, None)
    ok = report("sample_positions argmax", [argmax.double()],
                [torch.ops.fastattn.sample_positions(weights, False, None).double()], 0.0)
    drawn = torch.ops.fastattn.sample_positions(weights.to(DEVICE), True, torch.Generator(DEVICE).manual_seed(0))
    chosen = weights.gather(-1, drawn.cpu().unsqueeze(-1)).squeeze(-1)
    valid = bool((chosen.flatten()[1:] > 0).all()) and int(drawn[0, 0]) == 0
    print(f"{'ok  ' if valid else 'FAIL'} sample_positions drawn: positive-weight positions, 0 for an empty row")
    values = torch.randn(3, 50, 300, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    index = torch.tensor([[0, 7, 7, 49], [1, 2, 3, 4], [5, 5, 5, 5]])  # queries sharing a value row
    grads = torch.randn(3, 4, 300, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    on_device = [t.to(DEVICE) for t in (weights, index, values, *grads)]
    ok &= report("hard_attention_outputs", torch.ops.fastattn.hard_attention_outputs(*on_device[:3]),
                 torch.ops.fastattn.hard_attention_outputs(weights, index, values), 1e-12)
    ok &= report("hard_attention_outputs_backward",
                 torch.ops.fastattn.hard_attention_outputs_backward(*on_device[3:], *on_device[:2]),
                 torch.ops.fastattn.hard_attention_outputs_backward(*grads, weights, index), 1e-12)
    x = torch.linspace(-12, 12, 4097)
    ok &= report("fast_tanh", [torch.ops.fastattn.fast_tanh(x.to(DEVICE))], [torch.tanh(x.double())], 4e-7)
    return ok and valid


@contextlib.contextmanager
def persistent_rnn(setting: str | None):
    """FASTATTN_CUDA_PERSISTENT_RNN set to `setting` (unset for None) inside the block."""
    name, before = "FASTATTN_CUDA_PERSISTENT_RNN", os.environ.get("FASTATTN_CUDA_PERSISTENT_RNN")
    if setting is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = setting
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def check_recurrent() -> bool:
    ok = True
    steps, batch, inputs, hidden = 6, 3, 5, 7
    lengths = torch.tensor([6, 0, 3])
    cases = {  # name -> make(device, dtype): the arguments
        "lstm_cell": lambda d, t: (*leaves((batch, inputs), (batch, hidden), (batch, hidden), device=d, dtype=t),
                                   *leaves((4 * hidden, inputs), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,), device=d, dtype=t, seed=1)),
        "gru_cell": lambda d, t: (*leaves((batch, inputs), (batch, hidden), device=d, dtype=t),
                                  *leaves((3 * hidden, inputs), (3 * hidden, hidden), (3 * hidden,), (3 * hidden,), device=d, dtype=t, seed=1)),
    }
    for reverse in (False, True):
        cases[f"lstm_layer lengths reverse={reverse}"] = lambda d, t, reverse=reverse: (
            *leaves((steps, batch, inputs), (batch, hidden), (batch, hidden), device=d, dtype=t),
            *leaves((4 * hidden, inputs), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,), device=d, dtype=t, seed=1),
            None, lengths.to(d), reverse)
        cases[f"gru_layer lengths reverse={reverse}"] = lambda d, t, reverse=reverse: (
            *leaves((steps, batch, inputs), (batch, hidden), device=d, dtype=t),
            *leaves((3 * hidden, inputs), (3 * hidden, hidden), (3 * hidden,), (3 * hidden,), device=d, dtype=t, seed=1),
            lengths.to(d), reverse)
    for name, make in cases.items():
        op = name.split()[0]
        want = with_gradients(getattr(reference, op), list(make("cpu", torch.float64)))
        paths = {"": (None, torch.float32, 1e-4)}  # name -> (FASTATTN_CUDA_PERSISTENT_RNN, dtype, tolerance)
        if op.endswith("layer"):
            paths = {" persistent": (None, torch.float32, 1e-4), " per-step": ("0", torch.float32, 1e-4),
                     " persistent bfloat16 (tensor cores)": (None, torch.bfloat16, 1e-1)}
        for path, (setting, dtype, tolerance) in paths.items():
            with persistent_rnn(setting):
                got = with_gradients(backends.implementation(op, "cuda", "cuda"), list(make(DEVICE, dtype)))
            ok &= report(name + path, got, want, tolerance)
    return ok


def decoder_step_arguments(cell: str, score: str, device, dtype, wide=False, input_feeding=True, window=None):
    """attention_decoder_step_inference's arguments, with input feeding or in Bahdanau's
    order: B = 3, I = 5, H = 7, S = 40 (Dk = 6 additive, = H for dot), Dv = 5, or with
    `wide` I = H = Dk = Dv = 8 (16-byte loads in float16 / bfloat16); lengths or a
    padding mask; with `window` a local-p window (W_p^T (H, 5), v_p spreading the centres)."""
    batch, inputs, hidden, source, value_dim = (3, 8, 8, 40, 8) if wide else (3, 5, 7, 40, 5)
    additive, gates = score == "additive", 4 if cell == "lstm" else 3
    key_dim = (8 if wide else 6) if additive else hidden
    generator = torch.Generator().manual_seed(4)

    def random(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).mul(0.5).to(device, dtype)

    lengths = torch.tensor([40, 0, 17]).to(device) if additive else None
    padding = None if additive else (torch.arange(source).expand(batch, source) % 3 == 1).to(device)
    return (random(batch, inputs), random(batch, hidden), random(batch, hidden) if cell == "lstm" else None,
            random(batch, hidden), random(batch, source, key_dim), random(batch, source, value_dim),
            random(hidden, key_dim) if additive else None, random(key_dim) if additive else None,
            random(key_dim) if additive else None, score, 1.0 if additive else 0.3, lengths, padding,
            random(gates * hidden, inputs + (hidden if input_feeding else value_dim)), random(gates * hidden, hidden),
            random(gates * hidden), random(gates * hidden), random(hidden, value_dim + hidden), input_feeding,
            *(() if window is None else (window, random(hidden, 5), random(5).mul(8))))


def check_decoder_step() -> bool:
    ok = True
    for cell, score, masking, dtype, wide, feeding, window, tolerance in (
            ("lstm", "additive", "lengths", torch.float32, False, True, None, 1e-4),
            ("gru", "dot", "key_padding_mask", torch.float32, False, True, None, 1e-4),
            ("lstm", "additive", "lengths", torch.bfloat16, True, True, None, 3e-2),
            ("gru", "dot", "key_padding_mask", torch.float16, False, True, None, 3e-2),
            ("gru", "cosine", "key_padding_mask", torch.float32, False, False, None, 1e-4),
            ("lstm", "additive", "lengths", torch.float32, False, False, 3, 1e-4)):
        with torch.no_grad():
            got = torch.ops.fastattn.attention_decoder_step_inference(
                *decoder_step_arguments(cell, score, DEVICE, dtype, wide, feeding, window))
            want = torch.ops.fastattn.attention_decoder_step(
                *decoder_step_arguments(cell, score, "cpu", torch.float64, wide, feeding, window))
        present = [index for index, tensor in enumerate(want) if tensor.numel() > 0]  # a GRU has no c_next
        order = "input feeding" if feeding else "Bahdanau"
        local = "" if window is None else f", local-p window {window}"
        loads = "16-byte" if wide else "scalar"
        name = (f"attention_decoder_step one launch, {cell} {score}, {masking}, "
                f"{str(dtype).removeprefix('torch.')} ({loads} loads), {order}{local}")
        ok &= report(name, [got[i] for i in present], [want[i] for i in present], tolerance)
    return ok


def main() -> int:
    if not torch.cuda.is_available() or backends.unavailable_reason("cuda") is not None:
        print(f"cuda_sanitize_cases: cannot run: {backends.unavailable_reason('cuda') or 'no CUDA device'}")
        return 2
    results = [check_attention(), check_hard_attention_and_tanh(), check_recurrent(), check_decoder_step()]
    torch.cuda.synchronize()
    print("all cases match" if all(results) else "MISMATCH")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
