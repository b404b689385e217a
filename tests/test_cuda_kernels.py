"""The CUDA C++ kernels (backend "cuda", csrc/cuda) against the reference: attention
outputs, weights and gradients for every score and mask mode at decode-step and
multi-query shapes (key splits, several key tiles, odd and 16-byte-aligned feature
sizes), the kernels' native float16 / bfloat16 path under the 2x rule, hard-attention
positions, the tanh bound on the device, LSTM/GRU cells and layers, and opcheck on
every op.  Marked ``gpu``: they need a CUDA device and fastattn built with its CUDA
kernels (benchmarks/gpu_check.sh runs them).  The CPU-only check of these sources is
their compilation, `make cuda-check` (csrc/cuda/nvcc_check.sh), which CI runs, plus
the header check at the end of this file."""

import re
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import backends, reference
from fastattn.ops import recurrent as recurrent_ops
from tests.problems import SCORES, key_dim_for, score_parameters

CUDA_READY = torch.cuda.is_available() and backends.unavailable_reason("cuda") is None
needs_cuda_kernels = pytest.mark.skipif(
    not CUDA_READY,
    reason="needs a CUDA device and fastattn built with CUDA kernels: "
    + str(backends.unavailable_reason("cuda") or "no CUDA device"),
)
DEVICE = "cuda"


def gpu(test):
    """Marks a test `gpu` and skips it without a device or without the CUDA kernels."""
    return pytest.mark.gpu(needs_cuda_kernels(test))

# Shapes (N, T, S, Dq, Dk, Dv): a decode step over long sources (keys split across
# blocks), multi-query with several 32-key tiles, odd sizes (scalar loads), and sizes
# that allow 16-byte loads in every dtype (multiples of 8).
SHAPES = {
    "small_odd": (3, 7, 7, 5, 6, 4),
    "decode": (3, 1, 301, 16, 24, 40),
    "multi_query": (2, 37, 45, 16, 16, 24),
    "multi_query_odd": (2, 19, 70, 9, 11, 13),
}


def masks(shape_name, dtype):
    """The mask modes for a shape: every mode of the reference."""
    batch, steps, source = SHAPES[shape_name][:3]
    generator = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, source + 1, (batch,), generator=generator)
    lengths[0] = 0  # a fully masked row
    padding = torch.rand(batch, source, generator=generator) < 0.3
    padding[-1] = True
    center = (torch.rand(batch, steps, generator=generator, dtype=torch.float64) * (source + 4) - 2).to(dtype)
    modes = {
        "global": {},
        "lengths": {"lengths": lengths},
        "key_padding_mask": {"key_padding_mask": padding},
        "local_m": {"window": 3},
        "local_m_gaussian": {"window": 4, "gaussian": True, "lengths": lengths},
        "local_p": {"window": 5, "center": center},
        "local_p_plain": {"window": 2, "center": center, "gaussian": False},
    }
    if steps == source:
        modes["causal"] = {"causal": True}
    return {name: {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in mode.items()}
            for name, mode in modes.items()}


def attention_problem(score, shape_name, dtype, seed=0):
    """(query, keys, values, score parameters) as float64 leaves' copies in dtype on the GPU."""
    batch, steps, source, query_dim, key_dim, value_dim = SHAPES[shape_name]
    key_dim = key_dim_for(score, query_dim, key_dim)
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_()

    # Query and score matrices scaled by 1/sqrt(fan-in), as initialised layers are: logits
    # of a few units, where float32 results are meaningful to compare.
    query = leaf(batch, steps, query_dim, scale=query_dim**-0.5)
    keys, values = leaf(batch, source, key_dim), leaf(batch, source, value_dim)
    parameters = score_parameters(score, query_dim, key_dim, attention_dim=24, max_source_len=source + 3,
                                  generator=generator)
    parameters = {name: (value * (value.shape[-1] ** -0.5 if name == "weight" else 1.0)).to(DEVICE, dtype).requires_grad_()
                  for name, value in parameters.items()}
    return query, keys, values, parameters


def run_attention(backend_name, score, query, keys, values, parameters, masking):
    """Context, weights and the gradients of a fixed random projection of both."""
    masking = {name: value.detach().requires_grad_() if name == "center" else value for name, value in masking.items()}
    leaves = [query, keys, values, *parameters.values(), *[m for m in masking.values() if isinstance(m, torch.Tensor) and m.requires_grad]]
    with fastattn.backend(backend_name):
        context, weights = fastattn.attention(query, keys, values, score=score, return_weights=True, **parameters,
                                              **masking)
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    projection = (context * torch.randn(context.shape, generator=generator, device=DEVICE, dtype=torch.float64).to(context.dtype)).sum()
    projection = projection + (weights * torch.randn(weights.shape, generator=generator, device=DEVICE, dtype=torch.float64).to(weights.dtype)).sum()
    grads = torch.autograd.grad(projection, leaves, allow_unused=True)
    return [context, weights, *grads]


def assert_all_close(actual, expected, **tolerance):
    for index, (got, want) in enumerate(zip(actual, expected)):
        if want is None:  # the location score never reads the keys
            assert got is None or got.abs().max() == 0, index
        else:
            torch.testing.assert_close(got, want, **tolerance, msg=lambda message: f"output {index}: {message}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["global", "lengths", "key_padding_mask", "causal", "local_m", "local_m_gaussian",
                                  "local_p", "local_p_plain"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("score", SCORES)
@gpu
def test_attention_matches_the_reference(score, shape_name, mode, dtype):
    modes = masks(shape_name, dtype)
    if mode not in modes:
        pytest.skip("causal attention needs T == S")
    inputs = attention_problem(score, shape_name, dtype)
    actual = run_attention("cuda", score, *inputs, modes[mode])
    if dtype == torch.float64:
        assert_all_close(actual, run_attention("reference", score, *inputs, modes[mode]), rtol=1e-9, atol=1e-10)
        return
    exact = run_attention("reference", score, *attention_problem(score, shape_name, torch.float64),
                          masks(shape_name, torch.float64)[mode])
    assert_within_reference_error(actual, run_attention("reference", score, *inputs, modes[mode]), exact)


def assert_within_reference_error(actual, in_dtype, exact, *, output_factor=2, gradient_factor=8, floor=1e-5):
    """Each result's error against the float64 reference is at most `factor` times the
    reference's own error in that dtype, plus `floor` times the largest entry.  The
    factors: the 2x rule for the outputs (indices 0, 1); gradients are recomputed from
    logsumexp where the reference reuses its saved softmax, which costs a few times the
    reference's gradient error at large logits (the CPU kernels measure 4-7x)."""
    for index, (got, reference_run, want) in enumerate(zip(actual, in_dtype, exact)):
        if want is None:  # the location score never reads the keys
            assert got is None or got.abs().max() == 0, index
            continue
        kernel_error = (got.double() - want).abs().max()
        reference_error = (reference_run.double() - want).abs().max()
        factor = output_factor if index < 2 else gradient_factor
        bound = factor * reference_error + floor * want.abs().max()
        assert kernel_error <= bound, (index, float(kernel_error), float(reference_error))


# ---------------------------------------------------------------- native float16 / bfloat16

KERNEL_SCORES = ("dot", "cosine", "additive")


def kernel_leaves(kernel_score, shape_name, dtype):
    """The op-level inputs of one kernel score (projections already applied)."""
    batch, steps, source, query_dim, _, value_dim = SHAPES[shape_name]
    generator = torch.Generator().manual_seed(11)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()

    tensors = {"query": leaf(batch, steps, query_dim), "keys": leaf(batch, source, query_dim),
               "values": leaf(batch, source, value_dim)}
    if kernel_score == "additive":
        tensors.update(v=leaf(query_dim), bias=leaf(query_dim))
    return tensors


def op_outputs(kernel_score, tensors, masking, through_op):
    """Context, weights and gradients of the op, or of the reference computing the same."""
    masking = {name: value.detach().requires_grad_() if name == "center" else value for name, value in masking.items()}
    leaves = [*tensors.values(), *[m for m in masking.values() if isinstance(m, torch.Tensor) and m.requires_grad]]
    query, keys, values = tensors["query"], tensors["keys"], tensors["values"]
    if through_op:
        full = {"lengths": None, "key_padding_mask": None, "causal": False, "window": None, "center": None}
        full.update({name: value for name, value in masking.items() if name != "gaussian"})
        gaussian = masking.get("gaussian")
        full["gaussian"] = masking.get("center") is not None if gaussian is None else gaussian
        context, weights, _ = torch.ops.fastattn.attention_forward(
            query, keys, values, tensors.get("v"), tensors.get("bias"), kernel_score, 0.8, full["lengths"],
            full["key_padding_mask"], full["causal"], full["window"], full["center"], full["gaussian"], True)
    else:
        with fastattn.backend("reference"):
            if kernel_score == "additive":
                context, weights = fastattn.additive_attention(query, keys, tensors["v"], values, bias=tensors["bias"],
                                                               return_weights=True, **masking)
            else:
                score = "scaled_dot" if kernel_score == "dot" else "cosine"
                context, weights = fastattn.attention(query, keys, values, score=score, scale=0.8,
                                                      return_weights=True, **masking)
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    projection = (context * torch.randn(context.shape, generator=generator, device=DEVICE, dtype=torch.float64).to(context.dtype)).sum()
    projection = projection + (weights * torch.randn(weights.shape, generator=generator, device=DEVICE, dtype=torch.float64).to(weights.dtype)).sum()
    return [context, weights, *torch.autograd.grad(projection, leaves, allow_unused=True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["global", "lengths", "key_padding_mask", "local_p"])
@pytest.mark.parametrize("shape_name", ["decode", "multi_query", "multi_query_odd"])
@pytest.mark.parametrize("kernel_score", KERNEL_SCORES)
@gpu
def test_op_in_low_precision_errs_at_most_twice_the_reference_in_that_dtype(kernel_score, shape_name, mode, dtype):
    """The op computes float16 / bfloat16 natively (float accumulation); its error
    against the float64 reference is at most 2x the reference's own in that dtype,
    plus the rounding of the largest entry (the outputs are stored in that dtype)."""
    modes_exact, modes_low = masks(shape_name, torch.float64), masks(shape_name, dtype)
    exact = op_outputs(kernel_score, kernel_leaves(kernel_score, shape_name, torch.float64), modes_exact[mode], False)
    in_dtype = op_outputs(kernel_score, kernel_leaves(kernel_score, shape_name, dtype), modes_low[mode], False)
    kernel = op_outputs(kernel_score, kernel_leaves(kernel_score, shape_name, dtype), modes_low[mode], True)
    assert_within_reference_error(kernel, in_dtype, exact, gradient_factor=2, floor=torch.finfo(dtype).eps)


@gpu
def test_a_fully_masked_row_gives_zeros_and_no_nan():
    query, keys, values = (torch.randn(2, 3, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([0, 3], device=DEVICE)
    with fastattn.backend("cuda"):
        context, weights = fastattn.attention(query, keys, values, lengths=lengths, return_weights=True)
    (context.sum() + weights.sum()).backward()
    assert context[0].abs().max() == 0 and weights[0].abs().max() == 0
    assert query.grad[0].abs().max() == 0
    assert all(torch.isfinite(t).all() for t in (context, weights, query.grad, keys.grad, values.grad))


@gpu
def test_hard_attention_argmax_matches_the_reference_and_sampling_follows_the_weights():
    from scipy import stats

    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 1, 4, generator=generator).expand(2, 5000, 4).to(DEVICE)
    keys = torch.randn(2, 6, 4, generator=generator).to(DEVICE)
    lengths = torch.tensor([6, 3], device=DEVICE)
    with fastattn.backend("reference"):
        expected = fastattn.hard_attention(query, keys, sample=False, lengths=lengths)
    with fastattn.backend("cuda"):
        argmax = fastattn.hard_attention(query, keys, sample=False, lengths=lengths)
        sampled = fastattn.hard_attention(query, keys, lengths=lengths, generator=torch.Generator(DEVICE).manual_seed(0))
        again = fastattn.hard_attention(query, keys, lengths=lengths, generator=torch.Generator(DEVICE).manual_seed(0))
    assert torch.equal(argmax[1], expected[1])
    torch.testing.assert_close(argmax[2], expected[2])
    assert torch.equal(sampled[1], again[1])
    for row, valid in enumerate(lengths.tolist()):
        observed = torch.bincount(sampled[1][row].cpu(), minlength=6).double()
        assert observed[valid:].sum() == 0
        probabilities = sampled[3][row, 0, :valid].double().cpu()
        _, p_value = stats.chisquare(observed[:valid].numpy(), (probabilities / probabilities.sum() * 5000).numpy())
        assert p_value > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@gpu
def test_sample_positions_follow_the_cpu_rule(dtype):
    """Argmax (first on ties), and rows with no positive weight give 0, in every dtype."""
    weights = torch.rand(4, 9, 33, dtype=torch.float64).to(dtype)
    weights[0, 0] = 0
    weights[1, 1, 5:9] = weights[1, 1].max() + 1  # a tie: the first wins
    on_gpu = torch.ops.fastattn.sample_positions(weights.to(DEVICE), False, None)
    assert torch.equal(on_gpu.cpu(), torch.ops.fastattn.sample_positions(weights, False, None))
    drawn = torch.ops.fastattn.sample_positions(weights.to(DEVICE), True, torch.Generator(DEVICE).manual_seed(3))
    assert drawn[0, 0] == 0
    drawn_positive = weights.gather(-1, drawn.cpu().unsqueeze(-1)).squeeze(-1) > 0
    drawn_positive[0, 0] = True  # the row without positive weight
    assert bool(drawn_positive.all())


@gpu
def test_fast_tanh_error_is_below_its_stated_bound_on_the_device():
    x = torch.linspace(-30, 30, 3_000_001)
    x = torch.cat([x, torch.tensor([float("inf"), float("-inf"), 0.0, 1e-30, -1e-30, 8.75, 8.7499])])
    error = (torch.ops.fastattn.fast_tanh(x.to(DEVICE)).cpu().double() - torch.tanh(x.double())).abs()
    assert error.max() <= 4.0e-7, float(error.max())
    assert torch.isnan(torch.ops.fastattn.fast_tanh(torch.tensor([float("nan")], device=DEVICE))).all()


# ---------------------------------------------------------------- LSTM / GRU

STEPS, BATCH, INPUT, HIDDEN = 9, 4, 5, 7
LENGTHS = torch.tensor([9, 0, 4, 4])  # unsorted, with a tie and an empty sequence


def recurrent_leaves(*shapes, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
            for shape in shapes]


def recurrent_weights(gates, with_bias, dtype):
    shapes = ((gates * HIDDEN, INPUT), (gates * HIDDEN, HIDDEN), (gates * HIDDEN,), (gates * HIDDEN,))
    w_ih, w_hh, b_ih, b_hh = recurrent_leaves(*shapes, dtype=dtype, seed=1)
    return (w_ih, w_hh, b_ih, b_hh) if with_bias else (w_ih, w_hh, None, None)


def recurrent_outputs(function_name, arguments, backend_name):
    """Outputs and gradients on the reference, the "cuda" backend, or the ops called
    directly (backend_name "op": no float32 up-cast around them)."""
    if backend_name == "reference":
        implementation = getattr(reference, function_name)
    elif backend_name == "op":
        implementation = getattr(recurrent_ops, function_name)
    else:
        implementation = backends.implementation(function_name, "cuda", backend_name)
    tensors = [a for a in arguments if isinstance(a, torch.Tensor) and a.requires_grad]
    outputs = implementation(*arguments)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    projection = sum((o * torch.randn(o.shape, generator=generator, device=DEVICE, dtype=torch.float64).to(o.dtype)).sum()
                     for o in outputs)
    return [*outputs, *torch.autograd.grad(projection, tensors)]


def recurrent_cases(dtype, with_bias, lengths, reverse):
    x_cell, h, c = recurrent_leaves((BATCH, INPUT), (BATCH, HIDDEN), (BATCH, HIDDEN), dtype=dtype)
    x, h0, c0 = recurrent_leaves((STEPS, BATCH, INPUT), (BATCH, HIDDEN), (BATCH, HIDDEN), dtype=dtype, seed=2)
    lengths = None if lengths is None else lengths.to(DEVICE)
    return {
        "lstm_cell": (x_cell, h, c, *recurrent_weights(4, with_bias, dtype)),
        "gru_cell": (x_cell, h, *recurrent_weights(3, with_bias, dtype)),
        "lstm_layer": (x, h0, c0, *recurrent_weights(4, with_bias, dtype), None, lengths, reverse),
        "gru_layer": (x, h0, *recurrent_weights(3, with_bias, dtype), lengths, reverse),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("with_bias", [True, False])
@gpu
def test_cells_and_layers_match_the_reference(with_bias, lengths, reverse, dtype):
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for name, arguments in recurrent_cases(dtype, with_bias, lengths, reverse).items():
        expected = recurrent_outputs(name, arguments, "reference")
        actual = recurrent_outputs(name, arguments, "cuda")
        assert_all_close(actual, expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@gpu
def test_recurrent_ops_in_low_precision_err_at_most_twice_the_reference(lengths, dtype):
    """Called directly in float16 / bfloat16 (the binding computes in float32)."""
    exact_cases = recurrent_cases(torch.float64, True, lengths, False)
    low_cases = recurrent_cases(dtype, True, lengths, False)
    for name in exact_cases:
        exact = recurrent_outputs(name, exact_cases[name], "reference")
        in_dtype = recurrent_outputs(name, low_cases[name], "reference")
        kernel = recurrent_outputs(name, recurrent_cases(dtype, True, lengths, False)[name], "op")
        assert_within_reference_error(kernel, in_dtype, exact, gradient_factor=2, floor=torch.finfo(dtype).eps)


# ---------------------------------------------------------------- opcheck


def _opcheck_samples():
    generator = torch.Generator().manual_seed(5)

    def tensor(*shape, grad=True):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE).requires_grad_(grad)

    for kernel_score, width in (("dot", 4), ("cosine", 4), ("additive", 6)):
        for return_weights in (True, False):
            query, keys, values = tensor(2, 3, width), tensor(2, 40, width), tensor(2, 40, 3)
            v = tensor(width) if kernel_score == "additive" else None
            bias = tensor(width) if kernel_score == "additive" else None
            center = torch.tensor([[0.5, 2.0, 34.4], [1.0, 1.0, 3.0]], dtype=torch.float64, device=DEVICE,
                                  requires_grad=True)
            lengths = torch.tensor([40, 0], device=DEVICE)
            padding = (torch.rand(2, 40, generator=generator) > 0.6).to(DEVICE)
            yield (query, keys, values, v, bias, kernel_score, 0.7, lengths, None, False, 2, center, True, return_weights)
            yield (query, keys, values, v, bias, kernel_score, 1.0, None, padding, False, None, None, False, return_weights)


@pytest.mark.parametrize("arguments", list(_opcheck_samples()) if CUDA_READY else [None])
@gpu
def test_opcheck_attention_forward(arguments):
    torch.library.opcheck(torch.ops.fastattn.attention_forward.default, arguments)


@gpu
def test_opcheck_attention_backward_sample_positions_fast_tanh_and_recurrent_ops():
    query, keys, values, v, bias, *rest = next(_opcheck_samples())
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in (query, keys, values, v, bias, *rest)]
    context, weights, logsumexp = torch.ops.fastattn.attention_forward(*detached)
    (query, keys, values, v, bias, score, scale, lengths, mask, causal, window, center, gaussian, _) = detached
    torch.library.opcheck(
        torch.ops.fastattn.attention_backward.default,
        (torch.randn_like(context), torch.randn_like(weights), query, keys, values, v, bias, score, scale, lengths,
         mask, causal, window, center, gaussian, logsumexp),
    )
    torch.library.opcheck(torch.ops.fastattn.sample_positions.default, (weights, False, None))
    torch.library.opcheck(torch.ops.fastattn.fast_tanh.default, (torch.randn(17, device=DEVICE),))
    cases = recurrent_cases(torch.float64, True, LENGTHS, True)
    x, h, c, w_ih, w_hh, b_ih, b_hh = cases["lstm_cell"]
    torch.library.opcheck(torch.ops.fastattn.lstm_cell_forward.default, (x, h, c, w_ih, w_hh, b_ih, b_hh))
    x, h, w_ih, w_hh, b_ih, b_hh = cases["gru_cell"]
    torch.library.opcheck(torch.ops.fastattn.gru_cell_forward.default, (x, h, w_ih, w_hh, b_ih, b_hh))
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _, lengths, reverse = cases["lstm_layer"]
    torch.library.opcheck(torch.ops.fastattn.lstm_layer_forward.default, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse = cases["gru_layer"]
    torch.library.opcheck(torch.ops.fastattn.gru_layer_forward.default, (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse))


# ---------------------------------------------------------------- without a GPU

CUDA_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
TOOLKIT_HEADERS = {"cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h", "stdint.h", "float.h", "math.h"}


def test_cuda_sources_include_only_the_toolkit_and_the_projects_own_headers():
    """The .cu files (and the headers they include) must compile without torch: the
    framework-free rule that lets `make cuda-check` build them on machines whose torch
    has no CUDA headers.  Only binding.cpp may include torch."""
    units = sorted(CUDA_SOURCES.glob("*.cu")) + sorted(CUDA_SOURCES.glob("*.cuh")) + [CUDA_SOURCES / "launch.h"]
    common = sorted((CUDA_SOURCES.parent / "common").glob("*.h"))
    assert len(units) >= 5, units
    for path in units + common:
        for line in path.read_text().splitlines():
            match = re.match(r'\s*#\s*include\s*([<"])([^>"]+)[>"]', line)
            if match is None:
                continue
            quote, name = match.groups()
            if quote == '"':
                assert (path.parent / name).exists(), (path.name, name)
            else:
                assert name in TOOLKIT_HEADERS, f"{path.name} includes <{name}>: not a CUDA toolkit header"
    assert (CUDA_SOURCES / "nvcc_check.sh").exists()
