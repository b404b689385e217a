"""The CUDA C++ kernels (backend "cuda", csrc/cuda) against the reference: attention
outputs, weights and gradients for every score and mask mode at decode-step and
multi-query shapes (key splits, several key tiles, odd and 16-byte-aligned feature
sizes), the kernels' native float16 / bfloat16 path under the 2x rule, hard-attention
positions and the outputs there (against the CPU op, in every pair of dtypes), the tanh
bound on the device, LSTM/GRU cells and layers, and opcheck on every op.  Marked
``gpu``: they need a CUDA device and fastattn built with its CUDA kernels
(benchmarks/gpu_check.sh runs them).

Without a GPU: `make cuda-check` (csrc/cuda/nvcc_check.sh, run by CI) compiles every
kernel for sm_80 and sm_90a, and the tests at the end of this file check the
framework-free rule and run the kernels' own code on the CPU under an emulation of the
CUDA execution model (csrc/cuda/emulation/, marked slow: one build of about a minute),
against the CPU ops."""

import ctypes
import importlib.util
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import backends, reference
from fastattn.ops import recurrent as recurrent_ops
from tests import hard_outputs_problems
from tests.problems import (
    PEAKED_SHAPES,
    SCORES,
    assert_peaked_float32_gradients_err_like_the_reference,
    assert_sigmoid_accurate,
    key_dim_for,
    leaves_in,
    opcheck_backward_sample_positions_and_fast_tanh,
    score_parameters,
    sigmoid_arguments,
)

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
    # float32 below float64, as 16-bit queries take it: rounded to float16 / bfloat16 the
    # positions move the window, an error that swamped the kernels' own in the 2x check.
    center_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    center = (torch.rand(batch, steps, generator=generator, dtype=torch.float64) * (source + 4) - 2).to(center_dtype)
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
            query, keys, values, tensors.get("v"), tensors.get("bias"), kernel_score,
            1.0 if kernel_score == "additive" else 0.8, full["lengths"],
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


HARD_OUTPUTS_SHAPES = [(3, 5, 7, 4), (2, 9, 33, 17), (2, 3, 40, 300)]  # S past a warp's 32 lanes, Dv past 256
HARD_OUTPUTS_DTYPES = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float16, torch.float16),
                       (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]  # (weights', values')


def hard_outputs_case(shape, weights_dtype, values_dtype):
    """(weights, index, values, grad_context, grad_log_prob) on the CPU, with the rows the
    rules single out (tests/hard_outputs_problems.py)."""
    weights, index, values = hard_outputs_problems.problem(shape)
    grad_context, grad_log_prob = hard_outputs_problems.gradients_of_outputs(weights, index, values)
    return (weights.to(weights_dtype), index, values.to(values_dtype), grad_context.to(values_dtype),
            grad_log_prob.to(weights_dtype))


def assert_hard_outputs_match(got, want, dtype):
    """Equal to the CPU op's: exactly in float64 (to 1e-12), within one rounding otherwise
    (the rows' sums are added in another order)."""
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    for ours, theirs in zip(got, want):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.cpu(), theirs, equal_nan=True, **tolerance)


@pytest.mark.parametrize("dtypes", HARD_OUTPUTS_DTYPES)
@gpu
def test_hard_attention_outputs_match_the_cpu_op(dtypes):
    for shape in HARD_OUTPUTS_SHAPES:
        weights, index, values, *grads = hard_outputs_case(shape, *dtypes)
        on_device = [t.to(DEVICE) for t in (weights, index, values, *grads)]
        assert_hard_outputs_match(torch.ops.fastattn.hard_attention_outputs(*on_device[:3]),
                                  torch.ops.fastattn.hard_attention_outputs(weights, index, values), dtypes[0])
        for present in ((True, True), (False, True), (True, False)):
            given = [g if keep else None for g, keep in zip(on_device[3:], present)]
            expected = torch.ops.fastattn.hard_attention_outputs_backward(
                *(g if keep else None for g, keep in zip(grads, present)), weights, index)
            assert_hard_outputs_match(torch.ops.fastattn.hard_attention_outputs_backward(*given, *on_device[:2]),
                                      expected, dtypes[0])


@gpu
def test_hard_attention_outputs_gradcheck_and_opcheck_on_the_device():
    weights = torch.softmax(torch.randn(2, 3, 5, dtype=torch.float64, device=DEVICE), dim=-1).requires_grad_()
    values = torch.randn(2, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    index = torch.tensor([[4, 0, 2], [1, 3, 1]], device=DEVICE)

    def outputs(weights, values):
        return torch.ops.fastattn.hard_attention_outputs(weights, index, values)

    assert torch.autograd.gradcheck(outputs, (weights, values))
    assert torch.autograd.gradgradcheck(outputs, (weights, values))
    torch.library.opcheck(torch.ops.fastattn.hard_attention_outputs.default, (weights, index, values))
    grads = (torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE),
             torch.randn(2, 3, dtype=torch.float64, device=DEVICE))
    torch.library.opcheck(torch.ops.fastattn.hard_attention_outputs_backward.default, (*grads, weights.detach(), index))


@gpu
def test_hard_attention_outputs_refuse_what_the_cpu_op_refuses():
    weights, index, values = (t.to(DEVICE) for t in hard_outputs_problems.problem((3, 5, 7, 4)))
    with pytest.raises(ValueError, match=r"hard_attention_outputs: values must be \(N=3, S=7, Dv\)"):
        torch.ops.fastattn.hard_attention_outputs(weights, index, values[:, :6])
    with pytest.raises(ValueError, match="index must be on cuda"):
        torch.ops.fastattn.hard_attention_outputs(weights, index.cpu(), values)
    with pytest.raises(ValueError, match=r"index must hold positions in \[0, S=0\)"):
        torch.ops.fastattn.hard_attention_outputs(weights[:, :, :0], index, values[:, :0])


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
    """Called directly in float16 / bfloat16 (the binding's GEMMs take the 16-bit operands
    with float32 output, its pointwise kernels compute in float32)."""
    exact_cases = recurrent_cases(torch.float64, True, lengths, False)
    low_cases = recurrent_cases(dtype, True, lengths, False)
    for name in exact_cases:
        exact = recurrent_outputs(name, exact_cases[name], "reference")
        in_dtype = recurrent_outputs(name, low_cases[name], "reference")
        kernel = recurrent_outputs(name, recurrent_cases(dtype, True, lengths, False)[name], "op")
        assert_within_reference_error(kernel, in_dtype, exact, gradient_factor=2, floor=torch.finfo(dtype).eps)


def cuda_kernel_names(function):
    """The names of the CUDA kernels that function() launches."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        function()
        torch.cuda.synchronize()
    return " ".join(event.name for event in profile.events())


@gpu
def test_a_bfloat16_lstm_cell_runs_its_gemms_on_the_weights_as_they_are():
    """lstm_cell_forward in bfloat16 at B = 64, H = I = 1024: the two GEMMs take the
    bfloat16 weights (aten::mm.dtype, float32 out), no float32 copy of them per call, and
    the step reads the biases and c and writes h', c' and the saved gates in bfloat16.
    No copy of any tensor, and no device kernel but the step's and what cuBLAS launches
    for those two GEMMs alone (converting x, h and both weights first, and every input
    and output around the step, a fastattn.lstm_cell call took 17 on an H200)."""
    batch, hidden = 64, 1024
    generator = torch.Generator().manual_seed(12)

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, torch.bfloat16)

    x, h, c = tensor(batch, hidden), tensor(batch, hidden), tensor(batch, hidden)
    w_ih, w_hh = tensor(4 * hidden, hidden, scale=hidden**-0.5), tensor(4 * hidden, hidden, scale=hidden**-0.5)
    b_ih, b_hh = tensor(4 * hidden), tensor(4 * hidden)

    def cell():
        torch.ops.fastattn.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh)

    def gemms():
        torch.ops.aten.mm.dtype(x, w_ih.t(), torch.float32)
        torch.ops.aten.mm.dtype(h, w_hh.t(), torch.float32)

    def profiled(function):
        function()  # first calls set up cuBLAS
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities, record_shapes=True) as profile:
            function()
            torch.cuda.synchronize()
        return profile.events()

    events = profiled(cell)
    copied = [event.input_shapes for event in events if event.name in ("aten::_to_copy", "aten::copy_", "aten::clone")]
    assert not copied, copied
    kernels = [event.name for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    gemm_kernels = [event.name for event in profiled(gemms) if event.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) <= len(gemm_kernels) + 1, (kernels, gemm_kernels)


def persistent_layer_case(cell, steps, batch, hidden, lengths, reverse):
    """A layer's arguments (float32 on the device), weights scaled by 1/sqrt(H)."""
    gates = 4 if cell == "lstm" else 3
    x, h0, c0 = recurrent_leaves((steps, batch, 8), (batch, hidden), (batch, hidden), dtype=torch.float32, seed=6)
    shapes = ((gates * hidden, 8), (gates * hidden, hidden), (gates * hidden,), (gates * hidden,))
    weights = [(w.detach() * hidden**-0.5).requires_grad_() for w in recurrent_leaves(*shapes, dtype=torch.float32, seed=7)]
    lengths = None if lengths is None else lengths.to(DEVICE)
    if cell == "lstm":
        return (x, h0, c0, *weights, None, lengths, reverse)
    return (x, h0, *weights, lengths, reverse)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@gpu
def test_layers_run_the_persistent_kernels_when_w_hh_fits_and_match_the_per_step_path(cell, monkeypatch):
    """H = 301 over B = 67 (three units per block, a ragged last block, two 64-row batch
    passes), reverse with lengths: one persistent kernel each way, equal to the reference
    and to the per-step path (FASTATTN_CUDA_PERSISTENT_RNN=0)."""
    lengths = torch.randint(0, 6, (67,), generator=torch.Generator().manual_seed(8))
    lengths[0] = 5
    arguments = persistent_layer_case(cell, 5, 67, 301, lengths, True)
    name = f"{cell}_layer"
    persistent = []
    names = cuda_kernel_names(lambda: persistent.extend(recurrent_outputs(name, arguments, "op")))
    assert "persistent_forward_kernel" in names and "persistent_backward_kernel" in names
    assert "step_forward_kernel" not in names and "step_backward_kernel" not in names
    expected = recurrent_outputs(name, leaves_in(arguments, torch.float64), "reference")
    assert_all_close(persistent, expected, rtol=1e-4, atol=1e-4, check_dtype=False)
    monkeypatch.setenv("FASTATTN_CUDA_PERSISTENT_RNN", "0")
    per_step = []
    names = cuda_kernel_names(lambda: per_step.extend(recurrent_outputs(name, arguments, "op")))
    assert "persistent" not in names and "step_forward_kernel" in names
    assert_all_close(persistent, per_step, rtol=2e-5, atol=2e-5)
    op_arguments = (*arguments[:7], *arguments[8:]) if cell == "lstm" else arguments  # the op has no w_hr
    torch.library.opcheck(getattr(torch.ops.fastattn, f"{name}_forward").default, op_arguments)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@gpu
def test_bfloat16_layers_run_the_tensor_core_persistent_kernels(cell, monkeypatch):
    """The shape above in bfloat16: one persistent kernel each way with the tensor-core
    GEMM (W_hh and the operands in bfloat16), no per-step kernel, and outputs and
    gradients within twice the error of the reference run in bfloat16 (float64 oracle);
    the per-step path (bfloat16 GEMMs on the rounded states) likewise."""
    lengths = torch.randint(0, 6, (67,), generator=torch.Generator().manual_seed(8))
    lengths[0] = 5
    arguments = leaves_in(persistent_layer_case(cell, 5, 67, 301, lengths, True), torch.bfloat16)
    name = f"{cell}_layer"
    persistent = []
    names = cuda_kernel_names(lambda: persistent.extend(recurrent_outputs(name, arguments, "op")))
    assert "persistent_forward_kernel" in names and "persistent_backward_kernel" in names
    assert "TensorCoreGemm" in names and "FmaGemm" not in names
    assert "step_forward_kernel" not in names and "step_backward_kernel" not in names
    exact = recurrent_outputs(name, leaves_in(arguments, torch.float64), "reference")
    in_dtype = recurrent_outputs(name, leaves_in(arguments, torch.bfloat16), "reference")
    assert_within_reference_error(persistent, in_dtype, exact, gradient_factor=2, floor=torch.finfo(torch.bfloat16).eps)
    monkeypatch.setenv("FASTATTN_CUDA_PERSISTENT_RNN", "0")
    per_step = []
    names = cuda_kernel_names(lambda: per_step.extend(recurrent_outputs(name, arguments, "op")))
    assert "persistent" not in names and "step_forward_kernel" in names and "step_backward_kernel" in names
    assert_within_reference_error(per_step, in_dtype, exact, gradient_factor=2, floor=torch.finfo(torch.bfloat16).eps)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@gpu
def test_layers_fall_back_to_the_per_step_path_when_w_hh_does_not_fit(cell):
    """H = 2048: W_hh's slices exceed shared memory on an H100 or H200, the layer runs per
    step and still matches the reference."""
    arguments = persistent_layer_case(cell, 3, 2, 2048, None, False)
    outputs = []
    names = cuda_kernel_names(lambda: outputs.extend(recurrent_outputs(f"{cell}_layer", arguments, "op")))
    assert "persistent" not in names and "step_forward_kernel" in names and "step_backward_kernel" in names
    assert_all_close(outputs, recurrent_outputs(f"{cell}_layer", leaves_in(arguments, torch.float64), "reference"),
                     rtol=1e-4, atol=1e-4, check_dtype=False)


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
            scale = 1.0 if kernel_score == "additive" else 0.7  # v . tanh(q + k + bias) takes no scale
            yield (query, keys, values, v, bias, kernel_score, scale, lengths, None, False, 2, center, True, return_weights)
            yield (query, keys, values, v, bias, kernel_score, 1.0, None, padding, False, None, None, False, return_weights)


@pytest.mark.parametrize("arguments", list(_opcheck_samples()) if CUDA_READY else [None])
@gpu
def test_opcheck_attention_forward(arguments):
    torch.library.opcheck(torch.ops.fastattn.attention_forward.default, arguments)


@gpu
def test_an_additive_score_with_a_scale_is_refused():
    query, keys, values, v = (torch.randn(*shape, device=DEVICE) for shape in ((2, 3, 8), (2, 5, 8), (2, 5, 4), (8,)))
    with pytest.raises(ValueError, match=r"attention_forward: scale must be 1 with score \"additive\" .* got 0.5"):
        torch.ops.fastattn.attention_forward(query, keys, values, v, None, "additive", 0.5, None, None, False, None,
                                             None, False, False)


@gpu
def test_threads_launching_one_kernel_with_different_shared_memory_sizes_all_succeed():
    """A kernel's dynamic shared memory opt-in is the kernel's on the device, for every host
    thread: two threads launching the float32 rows forward (one kernel: D = 16, Dv a
    multiple of 4) with 49,696 bytes (D + 4 Dv + 8 floats) and with the most the device
    allows each launch within the opt-in, which the smaller launch never lowers under the
    larger one."""
    optin = torch.cuda.get_device_properties(DEVICE).shared_memory_per_block_optin
    largest_value_dim = (optin // 4 - 24) // 16 * 4
    barrier, errors = threading.Barrier(2), []

    def launch_repeatedly(value_dim):
        query, keys, values = (torch.randn(*shape, device=DEVICE) for shape in ((2, 1, 16), (2, 5, 16), (2, 5, value_dim)))
        barrier.wait()
        try:
            for _ in range(300):
                torch.ops.fastattn.attention_forward(query, keys, values, None, None, "dot", 1.0, None, None, False, None,
                                                     None, False, False)
        except RuntimeError as error:
            errors.append(error)

    threads = [threading.Thread(target=launch_repeatedly, args=(value_dim,)) for value_dim in (3100, largest_value_dim)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.cuda.synchronize()
    assert not errors, errors


@gpu
def test_opcheck_attention_backward_sample_positions_fast_tanh_and_recurrent_ops():
    opcheck_backward_sample_positions_and_fast_tanh(next(_opcheck_samples()))
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
STANDARD_HEADERS = {"map", "mutex", "utility"}  # the host compiler's, for shared_memory_opt_in.h


def test_cuda_sources_include_only_the_toolkit_and_the_projects_own_headers():
    """The .cu files (and the headers they include) must compile without torch: the
    framework-free rule that lets `make cuda-check` build them on machines whose torch
    has no CUDA headers.  Only binding.cpp may include torch."""
    units = (sorted(CUDA_SOURCES.glob("*.cu")) + sorted(CUDA_SOURCES.glob("*.cuh"))
             + [CUDA_SOURCES / "launch.h", CUDA_SOURCES / "shared_memory_opt_in.h"])
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
                allowed = TOOLKIT_HEADERS | STANDARD_HEADERS
                assert name in allowed, f"{path.name} includes <{name}>: not a CUDA toolkit header"
    assert (CUDA_SOURCES / "nvcc_check.sh").exists()


# ---------------------------------------------------------------- the kernels emulated on the CPU


def _load_emulation():
    spec = importlib.util.spec_from_file_location("fastattn_cuda_emulation", CUDA_SOURCES / "emulation" / "emulation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


emulation = _load_emulation()


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The CUDA kernels built for the CPU emulation (skipped without g++ or the toolkit's headers)."""
    if emulation.toolkit_include() is None or shutil.which("g++") is None:
        pytest.skip("the emulation needs g++ and the CUDA toolkit's headers")
    if backends.unavailable_reason("cpu") is not None:
        pytest.skip("the emulated kernels are compared with the CPU ops")
    try:
        return emulation.build(tmp_path_factory.mktemp("cuda_emulation"))
    except subprocess.CalledProcessError as error:
        pytest.fail(f"building the emulated kernels failed:\n{error.stderr}")


def emulated_case(score, shape, mode, dtype, shared_keys=False):
    """attention_forward's arguments (without return_weights) on the CPU."""
    batch, steps, source, dim, value_dim = shape
    generator = torch.Generator().manual_seed(1)

    def random(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64)

    query = random(batch, steps, dim) * dim**-0.5
    keys = random(1, source, dim).expand(batch, source, dim) if shared_keys else random(batch, source, dim)
    values = random(batch, source, value_dim)
    v, bias = (random(dim), random(dim)) if score == "additive" else (None, None)
    lengths = key_padding_mask = center = window = None
    causal = gaussian = False
    if mode == "lengths":
        lengths = torch.tensor([0] + [source - 3] * (batch - 1))
    elif mode == "key_padding_mask":
        key_padding_mask = torch.rand(batch, source, generator=generator) < 0.3
        key_padding_mask[-1] = True
    elif mode == "causal":
        causal, lengths = True, torch.tensor([source] + [source - 2] * (batch - 1))
    elif mode == "local_m_gaussian":
        window, gaussian = 4, True
    elif mode == "local_p":
        window, gaussian = 5, True
        center = torch.rand(batch, steps, generator=generator, dtype=torch.float64) * (source + 4) - 2

    def cast(tensor):
        return None if tensor is None else tensor.to(dtype)

    # A 16-bit query's center in float32, as nn.Attention(local="p") predicts it.
    center_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    scale = 1.0 if score == "additive" else 0.7  # v . tanh(q + k + bias) takes no scale
    return [cast(query), cast(keys), cast(values), cast(v), cast(bias), score, scale, lengths, key_padding_mask, causal,
            window, None if center is None else center.to(center_dtype), gaussian]


def assert_matches_cpu_op(got, want, tolerance, what, equal_nan=False):
    """Equal infinities count as equal (logsumexp of a fully masked row), NaNs too with
    ``equal_nan``; the rest to `tolerance` relative to max(1, largest finite entry)."""
    for index, (actual, expected) in enumerate(zip(got, want)):
        if expected is None or expected.numel() == 0:
            assert actual is None or actual.numel() == 0, (what, index)
            continue
        assert actual.dtype == expected.dtype, (what, index, actual.dtype, expected.dtype)
        actual, expected = actual.double(), expected.double()
        same = (actual == expected) | (actual.isnan() & expected.isnan()) if equal_nan else actual == expected
        error = torch.where(same, torch.zeros(()), (actual - expected).abs()).max()
        finite = expected[torch.isfinite(expected)]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        assert error <= tolerance * scale, (what, index, float(error))


EMULATED_CASES = [  # shape (N, T, S, D, Dv), mode, keys shared by the batch
    ((2, 1, 100, 8, 8), "global", False),           # decode: 3 key splits, 16-byte loads
    ((2, 1, 100, 8, 8), "lengths", False),          # a fully masked row among splits
    ((3, 1, 70, 5, 3), "key_padding_mask", True),   # scalar loads, batch stride 0
    ((2, 9, 9, 8, 5), "causal", False),             # one split, multi-query
    ((2, 5, 70, 6, 10), "local_p", False),          # 2 splits, Gaussian, grad_center
    ((2, 5, 70, 6, 10), "local_m_gaussian", False),
    ((2, 1, 100, 40, 300), "lengths", False),       # forward: several packs of a value row a lane
    ((2, 3, 100, 16, 72), "key_padding_mask", False),  # forward: a value row's last pack on some lanes only
    ((2, 4, 70, 8, 0), "lengths", False),           # no value features: the weights alone (hard attention)
]


def _emulated_parameters():
    """float64 over every case; float32 / float16 / bfloat16 (the same code with other
    element types) over the Gaussian case."""
    for score in ("dot", "cosine", "additive"):
        for case in EMULATED_CASES:
            yield pytest.param(score, case, torch.float64, id=f"{score}-{case[1]}-S{case[0][2]}-float64")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            yield pytest.param(score, EMULATED_CASES[4], dtype, id=f"{score}-local_p-{str(dtype)[6:]}")


@pytest.mark.slow
@pytest.mark.parametrize(("score", "case", "dtype"), list(_emulated_parameters()))
def test_emulated_attention_kernels_match_the_cpu_op(emulated, score, case, dtype):
    shape, mode, shared_keys = case
    tolerance = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    arguments = emulated_case(score, shape, mode, dtype, shared_keys and score == "dot")
    want = torch.ops.fastattn.attention_forward(*arguments, True)
    context, weights, logsumexp, splits = emulation.attention_forward(emulated, arguments, True)
    assert splits == (3 if shape[2] == 100 else 2 if shape[2] == 70 else 1)
    forward_splits = splits
    assert_matches_cpu_op([context, weights, logsumexp], want, tolerance, "forward")
    context, _, logsumexp, _ = emulation.attention_forward(emulated, arguments, False)
    assert_matches_cpu_op([context, logsumexp], [want[0], want[2]], tolerance, "forward without weights")
    generator = torch.Generator().manual_seed(5)
    grad_context = torch.randn(want[0].shape, generator=generator, dtype=torch.float64).to(dtype)
    grad_weights = torch.randn(want[1].shape, generator=generator, dtype=torch.float64).to(dtype)
    # The rows kernel splits a row's keys over blocks as the forward does, with or without
    # grad_weights (then the row terms take them in) and grad_center (merged with them).
    for given_grad_weights in (grad_weights, None):
        expected = torch.ops.fastattn.attention_backward(grad_context, given_grad_weights, *arguments, want[2])
        *got, splits = emulation.attention_backward(emulated, grad_context, given_grad_weights, arguments, logsumexp)
        assert splits == forward_splits
        assert_matches_cpu_op(got, expected, tolerance if dtype == torch.float64 else 10 * tolerance, "backward")


@pytest.mark.slow
@pytest.mark.parametrize("score", ["dot", "cosine", "additive"])
@pytest.mark.parametrize("case", [EMULATED_CASES[i] for i in (0, 1, 3, 4)],
                         ids=["decode_splits", "decode_fully_masked", "multi_query_causal", "local_p_splits"])
def test_emulated_backward_kernels_add_the_value_terms_to_the_keys_that_are_the_values(emulated, score, case):
    """values_are_keys (one tensor as keys and values, D == Dv): the decode rows kernel
    and the keys kernel write dK + dV into grad_keys, the CPU op's, and leave grad_values
    alone (it stays NaN: the binding gives none)."""
    shape, mode, _ = case
    arguments = emulated_case(score, shape, mode, torch.float64)
    arguments[2] = arguments[1]
    logsumexp = torch.ops.fastattn.attention_forward(*arguments, False)[2]
    grad_context = torch.randn(arguments[1].shape[0], shape[1], shape[3], generator=torch.Generator().manual_seed(5),
                               dtype=torch.float64)
    expected = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, logsumexp, True)
    apart = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, logsumexp)
    assert apart[2].abs().max() > 0  # a value term to add
    *got, _ = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp, values_are_keys=True)
    assert got[2].isnan().all()
    assert_matches_cpu_op([got[i] for i in (0, 1, 3, 4, 5)], [expected[i] for i in (0, 1, 3, 4, 5)], 1e-10,
                          "backward, values_are_keys")


@pytest.mark.slow
@pytest.mark.parametrize("score", ["dot", "additive"])
@pytest.mark.parametrize("case", [EMULATED_CASES[0], EMULATED_CASES[3]], ids=["decode_splits", "multi_query"])
def test_emulated_attention_kernels_give_nan_rows_for_nan_inputs_as_the_cpu_op(emulated, score, case):
    """A NaN key makes batch 0's rows that see it NaN, a NaN query row its own row
    (forward and backward), as the CPU op (and the reference) do; the other rows stay
    as they were."""
    shape, mode, _ = case
    arguments = emulated_case(score, shape, mode, torch.float64)
    arguments[1] = arguments[1].clone()
    arguments[1][0, 4, 1] = float("nan")
    arguments[0] = arguments[0].clone()
    arguments[0][1, -1, 0] = float("nan")
    want = torch.ops.fastattn.attention_forward(*arguments, True)
    assert want[0][0, -1].isnan().all() and want[0][1, -1].isnan().all() and want[0][1, :-1].isfinite().all()
    context, weights, logsumexp, _ = emulation.attention_forward(emulated, arguments, True)
    assert_matches_cpu_op([context, weights, logsumexp], want, 1e-10, "forward", equal_nan=True)
    grad_context = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, want[2])
    *got, _ = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp)
    assert_matches_cpu_op(got, expected, 1e-10, "backward", equal_nan=True)


def misaligned_copy(tensor):
    """`tensor`'s values in a view one element (4 bytes in float32, 2 in 16-bit) past a
    16-byte boundary."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    return storage[1:].view(tensor.shape).copy_(tensor)


@pytest.mark.slow
@pytest.mark.parametrize("case", [EMULATED_CASES[0], EMULATED_CASES[7]], ids=["decode_splits", "keys_kernel"])
@pytest.mark.parametrize("argument", ["query", "keys", "values", "v", "bias", "grad_context"])
def test_emulated_attention_kernels_take_misaligned_views(emulated, case, argument):
    """One float32 argument a view off the 16-byte boundary, in shapes where the others
    take 16-byte loads: the launches pick scalar loads (a wide load there faults on a
    GPU; the emulation reports cudaErrorMisalignedAddress) and give the CPU op's
    outputs.  The backward loads the additive bias in packs; wide_loads_fit had not
    asked for its alignment."""
    shape, mode, _ = case
    arguments = emulated_case("additive", shape, mode, torch.float32)
    grad_context = torch.randn(shape[0], shape[1], shape[4], generator=torch.Generator().manual_seed(5))
    position = ["query", "keys", "values", "v", "bias"].index(argument) if argument != "grad_context" else None
    if position is None:
        grad_context = misaligned_copy(grad_context)
    else:
        arguments[position] = misaligned_copy(arguments[position])
    want = torch.ops.fastattn.attention_forward(*arguments, True)
    context, weights, logsumexp, _ = emulation.attention_forward(emulated, arguments, True)
    assert_matches_cpu_op([context, weights, logsumexp], want, 2e-5, "forward")
    expected = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, want[2])
    *got, _ = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp)
    assert_matches_cpu_op(got, expected, 2e-4, "backward")


def with_batch_stride(tensor, extra):
    """`tensor`'s (N, S, D) values in a view with contiguous rows whose batches lie
    `extra` elements further apart than a contiguous tensor's."""
    batch, rows, dim = tensor.shape
    storage = torch.empty(batch * (rows * dim + extra), dtype=tensor.dtype)
    return storage.as_strided(tensor.shape, (rows * dim + extra, dim, 1)).copy_(tensor)


@pytest.mark.slow
@pytest.mark.parametrize("case", [EMULATED_CASES[0], EMULATED_CASES[7]], ids=["decode_splits", "keys_kernel"])
@pytest.mark.parametrize("extras", [(1, 0), (0, 1), (4, 4)], ids=["odd_keys", "odd_values", "aligned_both"])
@pytest.mark.parametrize("score", ["dot", "additive"])
def test_emulated_attention_kernels_take_keys_and_values_batch_strides(emulated, score, case, extras):
    """float32 keys and values with contiguous rows, batches S D + extra elements apart:
    binding.cpp hands such tensors to the kernels as they are.  With an extra of 1 every
    batch but the first starts off the 16-byte boundary and the launches take scalar
    loads; with 4 they keep 16-byte loads.  Forward and backward give the CPU op's
    outputs."""
    shape, mode, _ = case
    arguments = emulated_case(score, shape, mode, torch.float32)
    arguments[1], arguments[2] = (with_batch_stride(arguments[i], extra) for i, extra in zip((1, 2), extras))
    problem = emulation.attention_problem([], *arguments)
    assert (problem.keys_batch_stride, problem.values_batch_stride) == (arguments[1].stride(0), arguments[2].stride(0))
    want = torch.ops.fastattn.attention_forward(*arguments, True)
    context, weights, logsumexp, _ = emulation.attention_forward(emulated, arguments, True)
    assert_matches_cpu_op([context, weights, logsumexp], want, 2e-5, "forward")
    grad_context = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(5))
    expected = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, want[2])
    *got, _ = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp)
    assert_matches_cpu_op(got, expected, 2e-4, "backward")


@pytest.mark.slow
@pytest.mark.parametrize("case", [EMULATED_CASES[0], EMULATED_CASES[4], EMULATED_CASES[7]],
                         ids=["decode_splits", "local_p", "keys_kernel"])
def test_emulated_gradients_of_a_row_with_one_key_scored_inf_are_nan_as_the_cpu_ops(emulated, case):
    """float32 dot scores that overflow: key 5 scores +inf and every other key -inf,
    none masked.  The softmax of such a row is NaN (exp(inf - inf)) in the reference and
    the CPU op; the backward's row terms had skipped the -inf keys and given the row
    finite gradients."""
    shape, mode, _ = case
    arguments = emulated_case("dot", shape, mode, torch.float32)
    arguments[1] = arguments[1].abs()
    arguments[1][:, 5] = -1.0
    arguments[0] = torch.full_like(arguments[0], -3e38)
    arguments[6] = 1.0
    want = torch.ops.fastattn.attention_forward(*arguments, False)
    _, _, logsumexp, _ = emulation.attention_forward(emulated, arguments, False)
    grad_context = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(5))
    expected = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, want[2])
    assert expected[0].isnan().any()
    *got, _ = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp)
    assert_matches_cpu_op(got, expected, 1e-6, "backward", equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("keys", [6, 100], ids=["one_split", "three_splits"])
def test_emulated_weights_of_peaked_float32_rows_err_like_the_reference(emulated, keys):
    """Scores tens apart (scale 30) make a row's softmax nearly one-hot.  The weights were
    exp(score - logsumexp), whose rounding (half an ulp of the largest score, 1e-6 here)
    reached every weight: over these 12 problems they erred 124x the float32 reference
    run's error at worst.  They now come from the row's max and sum (the forward's or,
    with splits, the merged ones); what is left is the scores' own rounding, which goes
    either way: summed over the problems, within 2x the reference run's."""
    ours_total = reference_total = 0.0
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        query, keys_, values = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                                for shape in ((1, 4 if keys == 6 else 1, 8), (1, keys, 8), (1, keys, 3)))
        arguments = [query, keys_, values, None, None, "dot", 30.0, None, None, False, None, None, False]
        truth = torch.ops.fastattn.attention_forward(*arguments, True)[1]
        low = [a.float() if isinstance(a, torch.Tensor) else a for a in arguments]
        with fastattn.backend("reference"):
            reference_run = fastattn.attention(*low[:3], score="scaled_dot", scale=30.0, return_weights=True)[1]
        _, weights, _, splits = emulation.attention_forward(emulated, low, True)
        assert splits == (1 if keys == 6 else 3)
        ours_total += float((weights.double() - truth).abs().max())
        reference_total += float((reference_run.double() - truth).abs().max())
    assert ours_total <= 2 * reference_total, (ours_total, reference_total)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(0, 3, 5), (2, 0, 5), (2, 3, 0), (2, 1, 0)], ids=["N0", "T0", "S0", "decode_S0"])
def test_emulated_empty_problems_give_the_cpu_ops_outputs(emulated, sizes):
    """No batch, no query rows or no keys: the launches succeed (the backward's row-terms
    scratch is empty without rows) and give the CPU op's outputs (zeros where a gradient
    has entries)."""
    batch, steps, source = sizes
    generator = torch.Generator().manual_seed(0)
    arguments = [torch.randn(batch, steps, 4, generator=generator), torch.randn(batch, source, 4, generator=generator),
                 torch.randn(batch, source, 3, generator=generator), None, None, "dot", 1.0, None, None, False, None,
                 None, False]
    want = torch.ops.fastattn.attention_forward(*arguments, False)
    context, _, logsumexp, _ = emulation.attention_forward(emulated, arguments, False)
    assert_matches_cpu_op([context, logsumexp], [want[0], want[2]], 1e-6, "forward")
    grad_context = torch.randn(batch, steps, 3, generator=generator)
    expected = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, want[2])
    *got, _ = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp)
    assert all(g.shape == e.shape for g, e in zip(got[:3], expected[:3]))
    assert_matches_cpu_op(got, expected, 1e-6, "backward")


@pytest.mark.slow
def test_emulated_launches_past_48_kib_of_shared_memory_opt_in_and_never_lower_it(emulated):
    """A launch of more than the default 48 KiB of dynamic shared memory needs its kernel's
    opt-in (the emulated launch fails without it, as a GPU's does), and the opt-in, which is
    the kernel's on the device for every host thread, is only ever raised: another thread's
    smaller launch of the same kernel between a launcher's opt-in and its launch cannot
    lower it under that launch (setting each launch's own size could)."""
    kib = 1024
    assert emulated.emu_opt_in_shared_bytes(64 * kib, 56 * kib) == 64 * kib
    assert emulated.emu_opt_in_shared_bytes(56 * kib, 96 * kib) == 96 * kib
    # At D = 16, Dv = 12,300 float32, the rows forward holds 196,896 bytes (D + 4 Dv + 8
    # floats), the backward's rows kernel over 50,000 and its keys kernel 98,800.
    arguments = emulated_case("dot", (1, 1, 5, 16, 12300), "global", torch.float32)
    want = torch.ops.fastattn.attention_forward(*arguments, False)
    context, _, logsumexp, _ = emulation.attention_forward(emulated, arguments, False)
    assert_matches_cpu_op([context, logsumexp], [want[0], want[2]], 2e-5, "forward")
    grad_context = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(5))
    expected = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, want[2])
    *got, _ = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp)
    assert_matches_cpu_op(got, expected, 2e-4, "backward")


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(PEAKED_SHAPES))
@pytest.mark.parametrize("score", ["dot", "cosine", "additive"])
def test_emulated_gradients_of_peaked_float32_rows_err_like_the_reference(emulated, score, shape):
    """Peaked rows (scale 30; additive: v x 10): the backward recomputed p from logsumexp,
    whose rounding reached every p, and took r from the forward's context where given,
    else as the plain sum of p_j dw_j: summed over these 12 problems, grad_values erred
    up to 12x the float32 reference run's error and grad_query 13x.  With each row's own
    max and sum, the row term shifted by the most probable key's (RowTerms) and the keys
    kernel scoring a pair to the bit as the rows kernel does, every gradient is within
    2x (one decode row over 3 key splits; 4 and 5 query rows through the keys kernel)."""

    def backward(arguments, grad_context):
        _, _, logsumexp, _ = emulation.attention_forward(emulated, arguments, False)
        *grads, splits = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp)
        assert splits == (3 if shape == "one_query" else 1)
        return grads

    assert_peaked_float32_gradients_err_like_the_reference(backward, score, shape)


@pytest.mark.slow
@pytest.mark.parametrize("case", [EMULATED_CASES[0], EMULATED_CASES[3]], ids=["decode_splits", "multi_query"])
def test_emulated_cosine_gradients_at_tiny_norms_are_the_cpu_ops(emulated, case):
    """float32 queries and keys of norms about the cosine's floor 1e-8, every other row
    and key below it: the rows and key-split backwards give the CPU op's finite gradients
    (of the size of 1 / max(|x|, floor); at norms of 1e-20, below the smallest normal
    number, the unit vectors' backward had overflowed to inf)."""
    shape, mode, _ = case
    arguments = emulated_case("cosine", shape, mode, torch.float64)

    def about_the_floor(rows):  # norms 2e-8 and 4e-9 by turns
        return torch.where(torch.arange(rows) % 2 == 0, 2e-8, 4e-9).double().unsqueeze(-1)

    arguments[0] = (arguments[0] * about_the_floor(arguments[0].shape[-2])).float()  # rows of norm ~1
    arguments[1] = (arguments[1] * about_the_floor(arguments[1].shape[-2]) / shape[3] ** 0.5).float()
    arguments[2] = arguments[2].float()
    want = torch.ops.fastattn.attention_forward(*arguments, True)
    context, weights, logsumexp, _ = emulation.attention_forward(emulated, arguments, True)
    assert_matches_cpu_op([context, weights, logsumexp], want, 2e-5, "forward")
    grad_context = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(5))
    expected = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, want[2])
    assert expected[0].abs().max() > 1e6 and all(torch.isfinite(grad).all() for grad in expected[:3])
    *got, splits = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp)
    assert splits == (3 if shape[1] == 1 else 1)  # the key splits (decode) or one block a row
    assert all(torch.isfinite(grad).all() for grad in got[:3])
    assert_matches_cpu_op(got, expected, 2e-4, "backward")


@pytest.mark.slow
@pytest.mark.parametrize("case", [EMULATED_CASES[0], EMULATED_CASES[3]], ids=["decode_splits", "multi_query"])
def test_emulated_float16_cosine_floors_norms_at_float16s_smallest_normal(emulated, case):
    """float16 norms floored at 2^-14, as the reference's and the CPU op's: a zero query row
    and a zero key row give finite gradients (with the floor 1e-8, 1e8 times the upstream
    one: inf in float16), a query row of norm 2e-5 the CPU op's weights."""
    shape, mode, _ = case
    arguments = emulated_case("cosine", shape, mode, torch.float64)
    arguments[0][0, 0] = 0.0
    arguments[1][0, 1] = 0.0
    arguments[0][-1, -1] *= 2e-5 / arguments[0][-1, -1].norm()
    arguments[:3] = [tensor.half() for tensor in arguments[:3]]
    want = torch.ops.fastattn.attention_forward(*arguments, True)
    context, weights, logsumexp, _ = emulation.attention_forward(emulated, arguments, True)
    assert_matches_cpu_op([context, weights, logsumexp], want, 2e-3, "forward")
    grad_context = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(5)).half()
    expected = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, want[2])
    assert all(torch.isfinite(grad).all() for grad in expected[:3])
    got = emulation.attention_backward(emulated, grad_context, None, arguments, logsumexp)[:6]
    assert all(torch.isfinite(grad).all() for grad in got[:3])
    assert_matches_cpu_op(got, expected, 2e-3, "backward")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_emulated_sample_positions_follow_the_shared_rule(emulated, dtype):
    weights = torch.rand(3, 5, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    weights[0, 0] = 0
    weights[1, 2, 4:9] = weights[1, 2].max() + 1  # ties: the first wins
    uniforms = torch.rand(15, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for sample in (False, True):
        index = torch.empty(3, 5, dtype=torch.int64)
        assert emulated.emu_sample_positions(emulation.DTYPES[dtype], weights.data_ptr(), 15, 37,
                                             uniforms.data_ptr() if sample else None, index.data_ptr()) == 0
        if sample:  # the first position whose running sum of weights exceeds u * total
            running = weights.double().reshape(15, 37).clamp_min(0).cumsum(1)
            total = running[:, -1]
            expected = torch.where(total > 0, (running > (uniforms * total)[:, None]).to(torch.int64).argmax(1), 0)
        else:
            expected = torch.ops.fastattn.sample_positions(weights, False, None).reshape(15)
        assert torch.equal(index.reshape(15), expected), sample


@pytest.mark.slow
@pytest.mark.parametrize("dtypes", HARD_OUTPUTS_DTYPES)
@pytest.mark.parametrize("shape", HARD_OUTPUTS_SHAPES)
def test_emulated_hard_attention_outputs_match_the_cpu_op(emulated, shape, dtypes):
    weights, index, values, grad_context, grad_log_prob = hard_outputs_case(shape, *dtypes)
    *got, outside = emulation.hard_attention_outputs(emulated, weights, index, values)
    assert not outside
    assert_hard_outputs_match(got, torch.ops.fastattn.hard_attention_outputs(weights, index, values), dtypes[0])
    for grads in ((grad_context, grad_log_prob), (None, grad_log_prob), (grad_context, None)):
        grad_weights, grad_values, outside = emulation.hard_attention_outputs_backward(emulated, *grads, weights, index)
        assert not outside
        expected = torch.ops.fastattn.hard_attention_outputs_backward(*grads, weights, index)
        got = [grad_weights] if grads[0] is None else [grad_weights, grad_values]
        assert_hard_outputs_match(got if grads[1] is not None else got[1:],
                                  expected if grads[1] is not None else expected[1:], dtypes[0])


@pytest.mark.slow
@pytest.mark.parametrize("position", [-1, 7, 2**40])
def test_emulated_hard_attention_outputs_flag_a_position_outside_the_row_and_keep_the_others(emulated, position):
    weights, index, values, grad_context, grad_log_prob = hard_outputs_case((3, 5, 7, 4), torch.float64, torch.float64)
    good = index.clone()
    index[2, 3] = position
    context, log_prob, outside = emulation.hard_attention_outputs(emulated, weights, index, values)
    expected = torch.ops.fastattn.hard_attention_outputs(weights, good, values)
    assert outside
    kept = torch.ones(3, 5, dtype=torch.bool)
    kept[2, 3] = False
    torch.testing.assert_close(context[kept], expected[0][kept], equal_nan=True)
    torch.testing.assert_close(log_prob[kept], expected[1][kept], equal_nan=True)
    *_, outside = emulation.hard_attention_outputs_backward(emulated, grad_context, grad_log_prob, weights, index)
    assert outside


@pytest.mark.slow
def test_emulated_fast_tanh_is_within_its_bound(emulated):
    x = torch.linspace(-30, 30, 20001)
    y = torch.empty_like(x)
    assert emulated.emu_fast_tanh(x.data_ptr(), y.data_ptr(), x.numel()) == 0
    assert (y.double() - torch.tanh(x.double())).abs().max() <= 4.0e-7
    assert (y[x.abs() > 8.75].abs() == 1).all()  # exactly +-1 where it saturates


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_recurrent_step_kernels_match_the_cells_and_freeze_finished_rows(emulated, dtype):
    """One step with lengths [3, 0, 5] at t = 2: rows 0 and 2 are the cell ops' results,
    row 1 keeps its state, outputs 0 and gets zero gate gradients."""
    batch, inputs, hidden = 3, 5, 7
    generator = torch.Generator().manual_seed(4)

    def random(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(dtype)

    x, h, c, grad_h, grad_c = random(batch, inputs), random(batch, hidden), random(batch, hidden), random(batch, hidden), random(batch, hidden)
    lengths, active = torch.tensor([3, 0, 5]), torch.tensor([True, False, True])
    step = emulation.recurrent_step(dtype, batch, hidden, lengths, 2)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}

    w_ih, w_hh, b_ih, b_hh = random(4 * hidden, inputs), random(4 * hidden, hidden), random(4 * hidden), random(4 * hidden)
    h_next, c_next, saved = torch.ops.fastattn.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh)
    gates = torch.cat([x @ w_ih.t(), torch.zeros(batch, hidden, dtype=dtype)], 1)  # [gates | c'], as a layer saves
    c_state, h_state, output = c.clone(), h.clone(), torch.empty(batch, hidden, dtype=dtype)
    assert emulated.emu_lstm_step_forward(ctypes_step(step), gates.data_ptr(), 5 * hidden, gates.data_ptr(),
                                          (h @ w_hh.t()).data_ptr(), b_ih.data_ptr(), b_hh.data_ptr(),
                                          c_state.data_ptr(), c_state.data_ptr(), h_state.data_ptr(),
                                          gates[:, 4 * hidden:].data_ptr(), output.data_ptr()) == 0
    torch.testing.assert_close(gates[active, : 4 * hidden], saved[active], **tolerance)
    torch.testing.assert_close(torch.where(active[:, None], c_next, c), c_state, **tolerance)
    torch.testing.assert_close(torch.where(active[:, None], h_next, h), h_state, **tolerance)
    torch.testing.assert_close(torch.where(active[:, None], h_next, 0), output, **tolerance)
    assert gates[1, : 4 * hidden].abs().max() == 0 and torch.equal(gates[:, 4 * hidden:], c_state)
    expected = torch.ops.fastattn.lstm_cell_backward(grad_h, grad_c, x, h, c, w_ih, w_hh, b_ih, b_hh, c_next, saved)
    grad_gates, grad_c_state = torch.empty(batch, 4 * hidden, dtype=dtype), grad_c.clone()
    saved_with_c = torch.cat([saved, c_next], 1)
    assert emulated.emu_lstm_step_backward(ctypes_step(step), grad_h.data_ptr(), None, grad_c_state.data_ptr(),
                                           saved_with_c.data_ptr(), 5 * hidden, c.data_ptr(), hidden,
                                           saved_with_c[:, 4 * hidden:].data_ptr(), 5 * hidden,
                                           grad_gates.data_ptr()) == 0
    torch.testing.assert_close((grad_gates @ w_hh)[active], expected[1][active], **tolerance)
    torch.testing.assert_close(torch.where(active[:, None], expected[2], grad_c), grad_c_state, **tolerance)
    assert grad_gates[1].abs().max() == 0

    w_ih, w_hh, b_ih, b_hh = random(3 * hidden, inputs), random(3 * hidden, hidden), random(3 * hidden), random(3 * hidden)
    h_next, saved = torch.ops.fastattn.gru_cell_forward(x, h, w_ih, w_hh, b_ih, b_hh)
    gates = torch.cat([x @ w_ih.t(), torch.zeros(batch, hidden, dtype=dtype)], 1)
    h_state, output = h.clone(), torch.empty(batch, hidden, dtype=dtype)
    assert emulated.emu_gru_step_forward(ctypes_step(step), gates.data_ptr(), gates.data_ptr(), (h @ w_hh.t()).data_ptr(),
                                         b_ih.data_ptr(), b_hh.data_ptr(), h_state.data_ptr(), h_state.data_ptr(),
                                         output.data_ptr()) == 0
    torch.testing.assert_close(gates[active], saved[active], **tolerance)
    torch.testing.assert_close(torch.where(active[:, None], h_next, h), h_state, **tolerance)
    torch.testing.assert_close(torch.where(active[:, None], h_next, 0), output, **tolerance)
    expected = torch.ops.fastattn.gru_cell_backward(grad_h, x, h, w_ih, w_hh, b_ih, b_hh, saved)
    grad_input_gates, grad_hidden_gates = torch.empty(batch, 3 * hidden, dtype=dtype), torch.empty(batch, 3 * hidden, dtype=dtype)
    direct = torch.zeros(batch, hidden, dtype=dtype)
    assert emulated.emu_gru_step_backward(ctypes_step(step), grad_h.data_ptr(), None, saved.data_ptr(), h.data_ptr(),
                                          grad_input_gates.data_ptr(), grad_hidden_gates.data_ptr(),
                                          direct.data_ptr()) == 0
    recurrent = grad_hidden_gates @ w_hh
    state_gradient = grad_h.clone()
    assert emulated.emu_take_recurrent_gradient(ctypes_step(step), recurrent.data_ptr(), direct.data_ptr(),
                                                state_gradient.data_ptr()) == 0
    torch.testing.assert_close(state_gradient[active], expected[1][active], **tolerance)
    torch.testing.assert_close(state_gradient[1], grad_h[1], **tolerance)  # a finished row passes it through
    torch.testing.assert_close((grad_input_gates @ w_ih)[active], expected[0][active], **tolerance)
    assert grad_input_gates[1].abs().max() == 0 and grad_hidden_gates[1].abs().max() == 0


@pytest.mark.slow
def test_emulated_gate_sigmoid_is_accurate_relative_to_its_value(emulated):
    """The float32 step kernel's forget gate alone (input gate closed, c = 1): c' =
    sigmoid(its pre-activation), one batch row each, as tests/test_cpu_recurrent.py
    checks the CPU cells (the two share csrc/common/fast_sigmoid.h)."""
    x = sigmoid_arguments()
    rows = x.numel()
    gates = torch.zeros(rows, 5)  # pre-activations [i | f | g | o] and the saved c'
    gates[:, 0], gates[:, 1] = -200.0, x
    c_state, h_state, output = torch.ones(rows, 1), torch.zeros(rows, 1), torch.empty(rows, 1)
    hidden_gates, zeros = torch.zeros(rows, 4), torch.zeros(4)
    lengths = torch.ones(rows, dtype=torch.int64)
    step = emulation.recurrent_step(torch.float32, rows, 1, lengths, 0)
    assert emulated.emu_lstm_step_forward(ctypes_step(step), gates.data_ptr(), 5, gates.data_ptr(),
                                          hidden_gates.data_ptr(), zeros.data_ptr(), zeros.data_ptr(),
                                          c_state.data_ptr(), c_state.data_ptr(), h_state.data_ptr(),
                                          gates[:, 4:].data_ptr(), output.data_ptr()) == 0
    assert_sigmoid_accurate(x, c_state[:, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_cell_steps_read_and_write_half_types_as_stored(emulated, dtype):
    """A float16 / bfloat16 cell's step (storage = its dtype) reads its biases and state
    and writes h', c' and the saved gates as stored: each output is the float32 step's
    rounded once to the dtype, bit for bit, the float32 GEMM outputs are left as they
    were, and a finished row (lengths) keeps its state.  A float64 step cannot store
    float16 / bfloat16."""
    batch, hidden = 3, 13
    generator = torch.Generator().manual_seed(5)

    def random(*size):
        return torch.randn(*size, generator=generator).to(dtype)

    lengths = torch.tensor([1, 0, 4])
    active = lengths > 0
    step16, step32 = (emulation.recurrent_step(torch.float32, batch, hidden, lengths, 0, storage)
                      for storage in (dtype, torch.float32))
    b_ih, b_hh, c, h = random(4 * hidden), random(4 * hidden), random(batch, hidden), random(batch, hidden)
    gates = torch.randn(batch, 4 * hidden, generator=generator)  # W_ih x, float32
    hidden_gates = torch.randn(batch, 4 * hidden, generator=generator)
    given = gates.clone()

    saved32, c32, h32 = gates.clone(), c.float(), h.float()
    assert emulated.emu_lstm_step_forward(ctypes_step(step32), saved32.data_ptr(), 4 * hidden, saved32.data_ptr(),
                                          hidden_gates.data_ptr(), b_ih.float().data_ptr(), b_hh.float().data_ptr(),
                                          c32.data_ptr(), c32.data_ptr(), h32.data_ptr(), None, None) == 0
    saved, c_next, h_next = torch.empty(batch, 4 * hidden, dtype=dtype), torch.empty_like(c), torch.empty_like(h)
    assert emulated.emu_lstm_step_forward(ctypes_step(step16), gates.data_ptr(), 4 * hidden, saved.data_ptr(),
                                          hidden_gates.data_ptr(), b_ih.data_ptr(), b_hh.data_ptr(), c.data_ptr(),
                                          c_next.data_ptr(), h_next.data_ptr(), None, None) == 0
    assert torch.equal(gates, given)
    assert torch.equal(saved, saved32.to(dtype)) and torch.equal(c_next, c32.to(dtype))
    assert torch.equal(h_next[active], h32[active].to(dtype))
    assert torch.equal(c_next[~active], c[~active]) and saved[~active].abs().max() == 0

    gates[:, 3 * hidden:] = 0
    given = gates.clone()
    hidden_gates = hidden_gates[:, : 3 * hidden].contiguous()
    b_ih, b_hh = b_ih[: 3 * hidden].contiguous(), b_hh[: 3 * hidden].contiguous()
    saved32, h32 = gates.clone(), h.float()
    assert emulated.emu_gru_step_forward(ctypes_step(step32), saved32.data_ptr(), saved32.data_ptr(),
                                         hidden_gates.data_ptr(), b_ih.float().data_ptr(), b_hh.float().data_ptr(),
                                         h32.data_ptr(), h32.data_ptr(), None) == 0
    saved, h_next = torch.empty(batch, 4 * hidden, dtype=dtype), torch.empty_like(h)
    assert emulated.emu_gru_step_forward(ctypes_step(step16), gates.data_ptr(), saved.data_ptr(),
                                         hidden_gates.data_ptr(), b_ih.data_ptr(), b_hh.data_ptr(), h.data_ptr(),
                                         h_next.data_ptr(), None) == 0
    assert torch.equal(gates, given)
    assert torch.equal(saved, saved32.to(dtype)) and torch.equal(h_next, h32.to(dtype))
    assert torch.equal(h_next[~active], h[~active]) and saved[~active].abs().max() == 0

    float64_step = emulation.recurrent_step(torch.float64, batch, hidden, None, 0, dtype)
    assert emulated.emu_gru_step_forward(ctypes_step(float64_step), gates.double().data_ptr(), saved.data_ptr(),
                                         hidden_gates.double().data_ptr(), None, None, h.data_ptr(),
                                         h_next.data_ptr(), None) != 0


def ctypes_step(step):
    return ctypes.byref(step)


# (T, B, I, H, lengths, reverse, multiprocessors): a ragged last block (H = 9 over 3
# blocks), lengths in both directions, two 64-row batch passes, several 32-deep K chunks.
PERSISTENT_CASES = {
    "odd_lengths": (6, 5, 4, 9, [6, 0, 3, 3, 1], False, 3),
    "odd_lengths_reverse": (6, 5, 4, 9, [6, 0, 3, 3, 1], True, 3),
    "two_batch_passes": (3, 67, 3, 5, None, False, 2),
    "deep_chunks_reverse": (4, 3, 2, 37, None, True, 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PERSISTENT_CASES))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_emulated_persistent_layer_kernels_match_the_reference(emulated, cell, case):
    """The persistent kernels' whole recurrent loop (blocks running at once, the grid
    barrier between steps) against fastattn.reference in float64: outputs, final states,
    the CPU op's `saved`, and the gradients of x, h0, c0 and the biases."""
    steps, batch, inputs, hidden, lengths, reverse, multiprocessors = PERSISTENT_CASES[case]
    gates = 4 if cell == "lstm" else 3
    generator = torch.Generator().manual_seed(5)

    def random(*size):
        return torch.randn(*size, generator=generator).mul(0.5)

    x, h0, c0 = random(steps, batch, inputs), random(batch, hidden), random(batch, hidden)
    w_ih, w_hh = random(gates * hidden, inputs), random(gates * hidden, hidden)
    b_ih, b_hh = random(gates * hidden), random(gates * hidden)
    lengths = None if lengths is None else torch.tensor(lengths)
    plan = emulation.persistent_plan(emulated, cell, False, batch, hidden, multiprocessors)
    assert plan.blocks == multiprocessors and plan.blocks * plan.units_per_block >= hidden

    output, h_n, c_n, saved = emulation.persistent_layer_forward(
        emulated, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, multiprocessors)
    leaves = [t.double().requires_grad_() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
    if cell == "lstm":
        expected = reference.lstm_layer(*leaves, None, lengths, reverse)
        cpu_saved = torch.ops.fastattn.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)[3]
    else:
        expected = reference.gru_layer(leaves[0], leaves[1], *leaves[3:], lengths, reverse)
        cpu_saved = torch.ops.fastattn.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)[2]
    tolerance = {"rtol": 2e-5, "atol": 2e-5}
    for got, want in zip((output, h_n, c_n), expected):
        torch.testing.assert_close(got.double(), want.detach(), **tolerance)
    torch.testing.assert_close(saved, cpu_saved, **tolerance)

    grads = [random(*t.shape) for t in expected]
    wanted = [leaves[0], leaves[1], leaves[2], leaves[5], leaves[6]] if cell == "lstm" else [
        leaves[0], leaves[1], leaves[5], leaves[6]]
    expected_grads = torch.autograd.grad(expected, wanted, [g.double() for g in grads])
    grad_c_n = grads[2] if cell == "lstm" else None
    got = emulation.persistent_layer_backward(emulated, cell, grads[0], grads[1], grad_c_n, x, h0, c0, w_ih, w_hh,
                                              lengths, reverse, output, saved, multiprocessors)
    names = ("x", "h0", "c0", "b_ih", "b_hh") if cell == "lstm" else ("x", "h0", "b_ih", "b_hh")
    got = [g for g in got if g is not None]
    assert len(got) == len(names) == len(expected_grads)
    for name, got_grad, want_grad in zip(names, got, expected_grads):
        torch.testing.assert_close(got_grad.double(), want_grad, **tolerance, msg=lambda m, n=name: f"grad_{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_emulated_persistent_plan_fits_the_bench_shape_and_refuses_a_big_hidden_size(emulated, cell):
    """On an H200 (132 SMs, 227 KiB per block, as the emulated device answers) H = 1024
    fits in one block per SM with float32 and with bfloat16 / float16 operands; H = 2048
    does not (the binding takes the per-step path), nor does any float64 layer.  The
    16-bit W_hh slice takes half the bytes: a forward at H = 1536 fits only with it."""
    for operand in (torch.float32, torch.bfloat16, torch.float16):
        for backward in (False, True):
            plan = emulation.persistent_plan(emulated, cell, backward, 64, 1024, operand=operand)
            assert 0 < plan.blocks <= 132 and plan.blocks * plan.units_per_block >= 1024
            assert plan.shared_bytes <= emulation.SHARED_BYTES_PER_BLOCK and plan.threads <= 256
            assert emulation.persistent_plan(emulated, cell, backward, 64, 1024, 132, operand).blocks == plan.blocks
            assert emulation.persistent_plan(emulated, cell, backward, 64, 2048, operand=operand).blocks == 0
    assert emulation.persistent_plan(emulated, cell, False, 64, 1536, operand=torch.bfloat16).blocks > 0
    assert emulation.persistent_plan(emulated, cell, False, 64, 1536).blocks == 0
    assert emulation.persistent_plan(emulated, cell, False, 64, 64, 132, torch.float64).blocks == 0


# (T, B, I, H, lengths, reverse, multiprocessors) for the tensor-core GEMM (8 warps, 16 x 8
# output tiles, 64-row batch passes).  odd_uneven: H = 37 over 3 blocks (13, 13, 11 units),
# element-wise loads (H, 3H, 4H odd), a second batch pass of 3 rows: one row tile, so the
# backward's 2 column tiles leave the warps splitting K 4 ways.  small_batch_wide_loads:
# H = 40 over 5 blocks of 8 units, 16-byte loads, one row tile everywhere: split K in both
# directions (forward 3-4 column tiles, backward 1: 8-way).
TENSOR_CORE_PERSISTENT_CASES = {
    "odd_uneven": (5, 67, 4, 37, "random", True, 3),
    "small_batch_wide_loads": (4, 5, 3, 40, None, False, 5),
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(TENSOR_CORE_PERSISTENT_CASES))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_emulated_tensor_core_persistent_layers_err_at_most_twice_the_reference(emulated, cell, case, dtype):
    """The persistent kernels with W_hh and the GEMM operands in float16 / bfloat16 (the
    tensor cores' m16n8k16, float32 elsewhere), as the binding runs layers in those
    dtypes: outputs, final states and the gradients of x, h0, c0 and the biases (each
    returned in the dtype) err at most twice as much as the reference run in that dtype,
    against the float64 reference."""
    steps, batch, inputs, hidden, lengths, reverse, multiprocessors = TENSOR_CORE_PERSISTENT_CASES[case]
    gates = 4 if cell == "lstm" else 3
    generator = torch.Generator().manual_seed(11)

    def random(*size, scale=0.5):
        return torch.randn(*size, generator=generator).mul(scale).to(dtype)

    low = [random(steps, batch, inputs), random(batch, hidden), random(batch, hidden),
           random(gates * hidden, inputs), random(gates * hidden, hidden, scale=hidden**-0.5),
           random(gates * hidden), random(gates * hidden)]
    if lengths == "random":
        lengths = torch.randint(0, steps + 1, (batch,), generator=generator)
        lengths[0] = steps
    for backward in (False, True):
        plan = emulation.persistent_plan(emulated, cell, backward, batch, hidden, multiprocessors, dtype)
        assert plan.blocks == multiprocessors and plan.threads == 256

    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (t.float() for t in low)
    output, h_n, c_n, saved = emulation.persistent_layer_forward(
        emulated, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, multiprocessors, dtype)

    def run_reference(leaves, grads):
        if cell == "lstm":
            outputs = reference.lstm_layer(*leaves, None, lengths, reverse)
            wanted = [leaves[0], leaves[1], leaves[2], leaves[5], leaves[6]]
        else:
            outputs = reference.gru_layer(leaves[0], leaves[1], *leaves[3:], lengths, reverse)
            wanted = [leaves[0], leaves[1], leaves[5], leaves[6]]
        return [o.detach() for o in outputs], torch.autograd.grad(outputs, wanted, [g.to(outputs[0].dtype) for g in grads])

    grads = [torch.randn(steps, batch, hidden, generator=generator), torch.randn(batch, hidden, generator=generator)]
    grads += [torch.randn(batch, hidden, generator=generator)] if cell == "lstm" else []
    exact, exact_grads = run_reference([t.double().requires_grad_() for t in low], grads)
    in_dtype, in_dtype_grads = run_reference([t.clone().requires_grad_() for t in low], grads)
    returned = [t.to(dtype).float() for t in (output, saved)]  # the forward's results as the op returns them
    got_grads = emulation.persistent_layer_backward(
        emulated, cell, grads[0], grads[1], grads[2] if cell == "lstm" else None, x, h0, c0, w_ih, w_hh, lengths,
        reverse, *returned, multiprocessors, dtype)
    got = [t.to(dtype) for t in (output, h_n, c_n) if t is not None]
    got += [g.to(dtype) for g in got_grads if g is not None]
    assert len(got) == len(exact) + len(exact_grads)
    assert_within_reference_error(got, [*in_dtype, *in_dtype_grads], [*exact, *exact_grads], gradient_factor=2,
                                  floor=torch.finfo(dtype).eps)
