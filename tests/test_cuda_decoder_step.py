"""The one-launch CUDA attention-decoder step (csrc/cuda/decoder_step.cu, the op
attention_decoder_step_inference) against the composed step.

Without a GPU: the kernel's own code under the CPU emulation (csrc/cuda/emulation/, all
blocks running at once so that the grid barriers work; marked slow) against the CPU op
attention_decoder_step at small odd sizes (scalar loads) and at sizes that take the 16-byte loads,
LSTM and GRU, additive (projected query, bias), dot and cosine scores, lengths (an empty row)
and a key padding mask, several batch tiles and key splits, with input feeding and in
Bahdanau's order, local-p windows (narrow, wide, most key splits outside); in float16 / bfloat16 under the 2x rule (a float64 oracle, the
reference ops run in that dtype); the plan on an H200 and which dtypes, sizes and
alignments it takes; the inference op on the CPU (the composed step) under opcheck;
and, on fake CUDA tensors, which calls of attention_decoder_step take the inference op.
With a GPU (marked ``gpu``): the kernel against the composed step on the device, in
float32 and under the 2x rule in float16 / bfloat16, and the step captured in a CUDA
graph."""

import copy
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fastattn
from fastattn import backends
from fastattn.nn import AttentionDecoderCell
from tests.op_log import OpLog
from tests.test_cuda_kernels import (  # noqa: F401 - emulated: the kernels' CPU build
    emulated, emulation, gpu, misaligned_copy)

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

# name -> (B, I, H, S, Dk, Dv, multiprocessors, threads): odd sizes (scalar loads), sizes
# that take the 16-byte loads with two batch tiles (B = 10 over tiles of 8) and more
# hidden units than warps, and a long source cut into 4 key splits per row (splits with
# no visible key under lengths), blocks of the plan's size, and fewer rows than warps
# (several warps per row, their sums exchanged in shared memory).
SHAPES = {
    "odd": (3, 5, 7, 11, 6, 5, 3, 64),
    "wide_loads_two_tiles": (10, 8, 12, 70, 12, 8, 4, 64),
    "key_splits": (2, 6, 9, 100, 5, 7, 8, 32),
    "production_threads": (4, 8, 16, 64, 8, 8, 2, 256),  # the plan's 256 threads per block
    "rows_shared_by_warps": (2, 45, 3, 20, 5, 40, 2, 256),  # 16 warps: 4 per unit and row of W_c
}


def step_arguments(shape, cell, score, masks, device="cpu", shared_keys=False, input_feeding=True, window=None):
    """attention_decoder_step's arguments (float32) for `shape`; with input feeding, or in
    Bahdanau's order (the cell reads [y; c_t]: W_ih of I + Dv columns); with `window`, a
    local-p window (W_p^T (H, 7), v_p large enough to spread the centres over the keys)."""
    batch, inputs, hidden, source, key_dim, value_dim = shape[:6]
    generator = torch.Generator().manual_seed(3)

    def random(*size):
        return torch.randn(*size, generator=generator).mul(0.5).to(device)

    gates = 4 if cell == "lstm" else 3
    additive = score == "additive"
    key_dim = key_dim if additive else hidden  # dot: q = s_t
    keys = random(1, source, key_dim).expand(batch, -1, -1) if shared_keys else random(batch, source, key_dim)
    lengths = torch.arange(batch).mul(7).remainder(source + 1).to(device)  # row 0: no visible key
    padding = (torch.rand(batch, source, generator=generator) < 0.3).to(device)
    return (
        random(batch, inputs), random(batch, hidden), random(batch, hidden) if cell == "lstm" else None,
        random(batch, hidden), keys, random(batch, source, value_dim),
        random(hidden, key_dim) if additive else None, random(key_dim) if additive else None,
        random(key_dim) if additive else None, score, 1.0 if additive else 0.37,
        lengths if "lengths" in masks else None, padding if "padding" in masks else None,
        random(gates * hidden, inputs + (hidden if input_feeding else value_dim)), random(gates * hidden, hidden),
        random(gates * hidden), random(gates * hidden), random(hidden, value_dim + hidden), input_feeding,
        *(() if window is None else (window, random(hidden, 7), random(7).mul(8))),
    )


def composed(arguments):
    """The composed step on the CPU (attention_decoder_step, no gradients)."""
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in arguments]
    with torch.no_grad():
        return torch.ops.fastattn.attention_decoder_step(*cpu)


def in_dtype(arguments, dtype):
    """The floating-point tensors of `arguments` in `dtype`."""
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in arguments]


def reference_step(arguments):
    """The step on the reference ops (torch.ops.fastattn.*_reference), in the arguments'
    dtype and on their device: the 2x rule's reference run."""
    (y, h, c, attentional, keys, values, query_weight, v, bias, score, scale, lengths, key_padding_mask, w_ih, w_hh,
     b_ih, b_hh, w_combine, input_feeding, *local_p) = arguments
    window, position_weight, position_v = local_p or (None, None, None)

    def cell_step(fed):
        cell_input = torch.cat([y, fed], dim=-1)
        if c is None:
            return torch.ops.fastattn.gru_cell_reference(cell_input, h, w_ih, w_hh, b_ih, b_hh), None
        return torch.ops.fastattn.lstm_cell_reference(cell_input, h, c, w_ih, w_hh, b_ih, b_hh)

    def attend(state):
        query = state if query_weight is None else state @ query_weight
        center = None
        if window is not None:  # p_t = S_b sigmoid(v_p . tanh(W_p s))
            sizes = lengths.to(state.dtype) if lengths is not None else keys.shape[1]
            center = (torch.sigmoid(torch.tanh(state @ position_weight) @ position_v) * sizes).unsqueeze(1)
        context, weights = torch.ops.fastattn.attention_reference(
            query.unsqueeze(1), keys, values, v, bias, score, scale, lengths, key_padding_mask, False, window, center,
            window is not None)
        return context.squeeze(1), weights.squeeze(1)

    if input_feeding:
        h_next, c_next = cell_step(attentional)
        context, weights = attend(h_next)
    else:
        context, weights = attend(h)
        h_next, c_next = cell_step(context)
    output = torch.tanh(torch.cat([context, h_next], dim=-1) @ w_combine.T)
    return output, h_next, c_next, weights


def assert_within_twice_the_reference_error(got, reference_run, exact, dtype):
    """Each output's error against the float64 step is at most twice the reference run's
    in `dtype`, plus one rounding of the largest entry (the outputs are stored in it)."""
    for name, actual, reference, want in zip(("output", "h_next", "c_next", "weights"), got, reference_run, exact):
        if reference is None:  # a GRU has no memory c_t
            assert (actual is None or actual.numel() == 0) and want.numel() == 0, name
            continue
        assert actual.dtype == dtype, name
        want = want.cpu()
        kernel_error = (actual.cpu().double() - want).abs().max()
        reference_error = (reference.cpu().double() - want).abs().max()
        bound = 2 * reference_error + torch.finfo(dtype).eps * want.abs().max()
        assert kernel_error <= bound, (name, float(kernel_error), float(reference_error))


def assert_step_close(got, want):
    for name, actual, expected in zip(("output", "h_next", "c_next", "weights"), got, want):
        if actual is None:
            assert expected.numel() == 0, name
            continue
        torch.testing.assert_close(actual.cpu(), expected, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- emulated on the CPU


@pytest.mark.slow
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("masks", [("lengths",), ("padding",), ("lengths", "padding")])
@pytest.mark.parametrize("score", ["additive", "dot", "cosine"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_emulated_decoder_step_matches_the_composed_step(emulated, cell, score, masks, shape_name):
    shape = SHAPES[shape_name]
    multiprocessors, threads = shape[6:]
    arguments = step_arguments(shape, cell, score, masks)
    got = emulation.decoder_step(emulated, arguments, multiprocessors, threads)
    assert_step_close(got, composed(arguments))


@pytest.mark.slow
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("score", ["additive", "dot", "cosine"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_emulated_bahdanau_step_matches_the_composed_step(emulated, cell, score, shape_name):
    """Without input feeding: attention with s_{t-1} first, then the cell on [y; c_t]."""
    shape = SHAPES[shape_name]
    arguments = step_arguments(shape, cell, score, ("lengths", "padding"), input_feeding=False)
    got = emulation.decoder_step(emulated, arguments, *shape[6:])
    assert_step_close(got, composed(arguments))


# shape name -> (score, cell, input feeding, window): windows of one key, wider than the
# source, and of 5 keys among 100 (most key splits hold none of them).
LOCAL_P_CASES = {
    "odd": ("additive", "lstm", True, 1),
    "wide_loads_two_tiles": ("dot", "gru", False, 40),
    "key_splits": ("cosine", "lstm", True, 2),
    "production_threads": ("additive", "gru", False, 6),
    "rows_shared_by_warps": ("dot", "lstm", False, 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("masks", [("lengths",), ("padding",), ("lengths", "padding")])
def test_emulated_local_p_step_matches_the_composed_step(emulated, shape_name, masks):
    score, cell, input_feeding, window = LOCAL_P_CASES[shape_name]
    shape = SHAPES[shape_name]
    arguments = step_arguments(shape, cell, score, masks, input_feeding=input_feeding, window=window)
    got = emulation.decoder_step(emulated, arguments, *shape[6:])
    want = composed(arguments)
    assert_step_close(got, want)
    visible = want[3] > 0
    assert visible.any() and (visible.sum(1) <= 2 * window + 1).all()  # the window cut the keys


@pytest.mark.slow
@pytest.mark.parametrize("cell, score, input_feeding, window", [("lstm", "additive", True, None),
                                                                ("gru", "cosine", False, None),
                                                                ("lstm", "dot", False, 2)])
def test_emulated_step_over_an_empty_source(emulated, cell, score, input_feeding, window):
    """S = 0 (no scores, so no scores pointer): a zero context, (B, 0) weights, the cell
    and output layer as composed (found by fuzzing: the launch refused it)."""
    shape = (3, 5, 7, 0, 6, 5, 2, 64)
    arguments = step_arguments(shape, cell, score, ("lengths", "padding"), input_feeding=input_feeding,
                               window=window)
    got = emulation.decoder_step(emulated, arguments, *shape[6:])
    assert got[3].shape == (3, 0)
    assert_step_close(got, composed(arguments))


@pytest.mark.slow
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_emulated_step_gives_nan_rows_for_nan_keys_as_the_composed_step(emulated, score):
    """Keys all NaN in batch row 1 (over 4 key splits): its weights and output are NaN, as
    the composed step's; row 0 stays finite.  The block and warp maxima had dropped the
    NaN (fmaxf), so row 1 came out as a fully masked row: weights and context 0."""
    shape = SHAPES["key_splits"]
    arguments = list(step_arguments(shape, "lstm", score, ()))
    arguments[4] = arguments[4].clone()
    arguments[4][1] = float("nan")
    want = composed(arguments)
    assert want[3][1].isnan().all() and want[0][1].isnan().all() and want[3][0].isfinite().all()
    got = emulation.decoder_step(emulated, arguments, *shape[6:])
    for name, actual, expected in zip(("output", "h_next", "c_next", "weights"), got, want):
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5, equal_nan=True,
                                   msg=lambda m, n=name: f"{n}: {m}")


# name -> shape as SHAPES: odd sizes (scalar loads), then every size a multiple of 8 (the
# 16-byte loads of float16 / bfloat16): two batch tiles, the plan's 256 threads, rows
# shared by warps.
LOW_PRECISION_SHAPES = {
    "odd_scalar_loads": (3, 5, 7, 40, 6, 5, 3, 64),
    "two_tiles_key_splits": (10, 8, 16, 70, 16, 8, 4, 64),
    "production_threads": (4, 8, 16, 64, 8, 8, 2, 256),
    "rows_shared_by_warps": (2, 48, 8, 20, 8, 40, 2, 256),
}


def test_the_reference_step_is_the_composed_step():
    """reference_step, the 2x rule's reference run, computes what the op does."""
    for cell, score, input_feeding, window in (("lstm", "additive", True, None), ("gru", "dot", False, None),
                                               ("lstm", "cosine", False, 2), ("gru", "additive", True, 3)):
        arguments = in_dtype(step_arguments(SHAPES["odd"], cell, score, ("lengths", "padding"),
                                            input_feeding=input_feeding, window=window), torch.float64)
        for got, want in zip(reference_step(arguments), composed(arguments)):
            torch.testing.assert_close(got if got is not None else want.new_empty(0), want, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape_name", list(LOW_PRECISION_SHAPES))
@pytest.mark.parametrize("score", ["additive", "dot", "cosine"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_emulated_low_precision_step_errs_at_most_twice_the_reference(emulated, cell, score, shape_name, dtype):
    shape = LOW_PRECISION_SHAPES[shape_name]
    input_feeding = shape_name != "production_threads"  # that shape in Bahdanau's order
    arguments = in_dtype(step_arguments(shape, cell, score, ("lengths", "padding"), input_feeding=input_feeding),
                         dtype)
    got = emulation.decoder_step(emulated, arguments, *shape[6:])
    exact = composed(in_dtype(arguments, torch.float64))
    assert_within_twice_the_reference_error(got, reference_step(arguments), exact, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_value_rows_wider_than_the_block_take_several_passes(emulated, dtype):
    """Value rows wider than the block (32 threads, Dv = 264 in 16-byte loads: one group of
    threads, three passes over a row in float32, two in bfloat16) and 100 keys in one
    split per row, so that a thread adds many rows with kRowUnroll loads in flight,
    lengths and padding cutting them."""
    shape = (2, 8, 16, 100, 8, 264, 2, 32)
    arguments = in_dtype(step_arguments(shape, "lstm", "dot", ("lengths", "padding")), dtype)
    got = emulation.decoder_step(emulated, arguments, *shape[6:])
    if dtype == torch.float32:
        assert_step_close(got, composed(arguments))
    else:
        assert_within_twice_the_reference_error(got, reference_step(arguments), composed(in_dtype(arguments, torch.float64)),
                                                dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape_name, score, cell, input_feeding, window", [
    ("two_tiles_key_splits", "additive", "lstm", True, 3), ("rows_shared_by_warps", "dot", "gru", False, 5),
    ("odd_scalar_loads", "cosine", "lstm", True, 2),
])
def test_emulated_low_precision_local_p_step_errs_at_most_twice_the_reference(emulated, shape_name, score, cell,
                                                                              input_feeding, window, dtype):
    shape = LOW_PRECISION_SHAPES[shape_name]
    arguments = in_dtype(step_arguments(shape, cell, score, ("lengths", "padding"), input_feeding=input_feeding,
                                        window=window), dtype)
    got = emulation.decoder_step(emulated, arguments, *shape[6:])
    exact = composed(in_dtype(arguments, torch.float64))
    assert_within_twice_the_reference_error(got, reference_step(arguments), exact, dtype)


@pytest.mark.slow
def test_emulated_decoder_step_reads_keys_shared_by_the_batch(emulated):
    """Keys with batch stride 0 (the "location" score's W_a[:S]), expanded over the batch or
    (1, S, Dk), which the binding expands; values every other row of a larger batch, whose
    batch stride the binding keeps."""
    arguments = list(step_arguments(SHAPES["odd"], "lstm", "dot", ("lengths",), shared_keys=True))
    assert arguments[4].stride(0) == 0
    want = composed(arguments)
    assert_step_close(emulation.decoder_step(emulated, arguments, 3, 64), want)
    arguments[4] = arguments[4][:1]
    arguments[5] = torch.stack([arguments[5], torch.full_like(arguments[5], math.nan)], 1).flatten(0, 1)[::2]
    assert arguments[5].stride(0) == 2 * arguments[5][0].numel()
    assert_step_close(emulation.decoder_step(emulated, arguments, 3, 64), want)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("argument", ["keys", "values", "query_weight", "w_ih", "w_hh", "w_combine", "position_weight"])
def test_emulated_step_takes_misaligned_views(emulated, argument, dtype):
    """One matrix the kernel reads in 16-byte loads a view one element (4 or 2 bytes) off
    the 16-byte boundary, in sizes that take those loads: the step picks scalar loads and
    gives the aligned step's outputs.  A misaligned 16-byte load in this cooperative
    kernel comes back from the launch as cudaErrorMisalignedAddress (the emulated
    cooperative launch had returned cudaSuccess, leaving the error to the next launch)."""
    shape = LOW_PRECISION_SHAPES["two_tiles_key_splits"]
    arguments = in_dtype(step_arguments(shape, "lstm", "additive", ("lengths", "padding"), window=3), dtype)
    position = {"keys": 4, "values": 5, "query_weight": 6, "w_ih": 13, "w_hh": 14, "w_combine": 17,
                "position_weight": 20}[argument]
    moved = list(arguments)
    if argument in ("query_weight", "position_weight"):  # the kernel reads the rows of their transposes
        moved[position] = misaligned_copy(arguments[position].t().contiguous()).t()
    else:
        moved[position] = misaligned_copy(arguments[position])
    got = emulation.decoder_step(emulated, moved, *shape[6:])
    if dtype == torch.float32:
        assert_step_close(got, composed(arguments))
    else:  # the scalar loads sum in another order than the aligned step's
        eps = torch.finfo(dtype).eps
        for actual, expected in zip(got, emulation.decoder_step(emulated, arguments, *shape[6:])):
            assert (actual is None) == (expected is None)
            if actual is not None:
                torch.testing.assert_close(actual.double(), expected.double(), rtol=2 * eps, atol=2 * eps)


@pytest.mark.slow
def test_emulated_plan_covers_the_bench_shapes_and_refuses_an_oversized_row(emulated):
    """On an H200 (132 SMs, 227 KiB per block, as the emulated device answers): the zoo's
    greedy-decoding shapes at batch 1 and 64 (H = 512, sources of 50) get one block per SM,
    8-row batch tiles at batch 64 and one key split per 32 keys or more; a batch row too
    long for shared memory gets no plan (the binding composes)."""
    def problem(cell, batch, inputs, hidden, source, key_dim, value_dim):  # sizes only: the plan reads no tensor
        return emulation.DecoderStepProblem(cell=emulation.CELLS[cell], score=emulation.SCORES["additive"],
                                            input_feeding=True, batch=batch, input_size=inputs, hidden=hidden,
                                            source_length=source, score_dim=key_dim, value_dim=value_dim)

    for batch in (1, 64):
        plan = emulation.decoder_step_plan(emulated, problem("lstm", batch, 512, 512, 50, 512, 512), 132)
        assert plan.blocks == 132 and plan.threads == 256
        on_device = emulation.decoder_step_plan(emulated, problem("lstm", batch, 512, 512, 50, 512, 512))
        assert bytes(on_device) == bytes(plan)
        assert plan.batch_tile == min(batch, 8)
        assert plan.splits * plan.keys_per_split >= 50 and plan.keys_per_split >= 32
        assert plan.shared_bytes <= emulation.SHARED_BYTES_PER_BLOCK
    assert emulation.decoder_step_plan(emulated, problem("gru", 1, 8, 30000, 4, 8, 8)).blocks == 0  # I + 2H > 227 KiB
    batch, inputs, hidden, source, key_dim, value_dim, multiprocessors, _ = SHAPES["key_splits"]
    plan = emulation.decoder_step_plan(emulated, problem("lstm", batch, inputs, hidden, source, key_dim, value_dim),
                                       multiprocessors)
    assert (plan.splits, plan.keys_per_split, plan.batch_tile) == (4, 32, 2)


@pytest.mark.slow
def test_emulated_plan_takes_every_float_dtype_but_float64_whatever_the_loads(emulated):
    """float32 / float16 / bfloat16 steps get a plan whether the sizes and rows fit 16-byte
    loads or not (scalar loads then); float64 none (the binding composes the step)."""
    def problem(dtype, hidden, w_ih=None):  # the plan reads the sizes, the dtype and the pointers' alignment
        return emulation.DecoderStepProblem(dtype=emulation.DTYPES[dtype], cell=emulation.CELLS["lstm"],
                                            score=emulation.SCORES["additive"], input_feeding=True, batch=4,
                                            input_size=16, hidden=hidden, source_length=40, score_dim=16,
                                            value_dim=16, keys_batch_stride=40 * 16, w_ih=w_ih)

    def blocks(problem, multiprocessors=None):
        return emulation.decoder_step_plan(emulated, problem, multiprocessors).blocks

    misaligned = 4096 + 2  # never read: the plan only looks at it
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert blocks(problem(dtype, 16), 132) == 132 and blocks(problem(dtype, 16)) == 132
        assert blocks(problem(dtype, 12), 132) == 132 and blocks(problem(dtype, 12)) == 132
        assert blocks(problem(dtype, 16, w_ih=misaligned)) == 132
    assert blocks(problem(torch.float64, 16), 132) == 0 and blocks(problem(torch.float64, 16)) == 0


@pytest.mark.slow
def test_emulated_plan_needs_the_position_projection_of_a_window(emulated):
    """A local-p window without W_p's rows (position_dim 0) or a negative one: no plan."""
    def blocks(window, position_dim):
        return emulation.decoder_step_plan(emulated, emulation.DecoderStepProblem(
            cell=emulation.CELLS["lstm"], score=emulation.SCORES["dot"], input_feeding=True, batch=2, input_size=4,
            hidden=8, source_length=20, score_dim=8, value_dim=8, window=window, position_dim=position_dim), 4).blocks

    assert blocks(0, 0) == 4 and blocks(3, 5) == 4
    assert blocks(3, 0) == 0 and blocks(-1, 0) == 0


# ---------------------------------------------------------------- the op on the CPU


def test_the_inference_op_composes_on_the_cpu_and_passes_opcheck():
    arguments = step_arguments(SHAPES["odd"], "gru", "additive", ("lengths",))
    with torch.no_grad():
        inference = torch.ops.fastattn.attention_decoder_step_inference(*arguments)
    assert_step_close(inference, composed(arguments))
    torch.library.opcheck(torch.ops.fastattn.attention_decoder_step_inference.default, arguments,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize(
    "device, grad_mode, leaf_requires_grad, routed",
    [("cuda", False, True, True), ("cuda", True, False, True), ("cpu", True, True, False),
     ("cpu", False, False, False)],
    ids=["cuda-no-grad-mode", "cuda-nothing-requires-grad", "cpu-gradients", "cpu"],
)
def test_attention_decoder_step_routes_cuda_inference_to_the_one_launch_op(device, grad_mode, leaf_requires_grad,
                                                                           routed):
    """Seen on fake tensors (a CUDA device needs no GPU there): CUDA calls that record no
    gradient go to attention_decoder_step_inference, the others compose (CUDA calls that
    record gradients: the gpu test below; fake CUDA tensors cannot record them here)."""
    mode = FakeTensorMode()
    arguments = [
        FakeTensor(mode, a.to("meta"), torch.device(device, 0) if device == "cuda" else torch.device(device))
        if isinstance(a, torch.Tensor) else a
        for a in step_arguments(SHAPES["odd"], "lstm", "additive", ("lengths",))
    ]
    arguments[13].requires_grad_(leaf_requires_grad)  # w_ih
    log = OpLog()
    with mode, log, torch.set_grad_enabled(grad_mode):
        output = torch.ops.fastattn.attention_decoder_step(*arguments)
    assert output[0].shape == (3, 7) and output[3].shape == (3, 11)
    assert ("fastattn::attention_decoder_step_inference" in log.names) == routed
    assert ("fastattn::attention_forward" in log.names) == (not routed)


# ---------------------------------------------------------------- on the GPU

GPU_SHAPE = (5, 16, 32, 40, 24, 16)


@gpu
@pytest.mark.parametrize("cell, score, input_feeding", [("lstm", "additive", True), ("gru", "dot", True),
                                                         ("lstm", "dot", False), ("gru", "cosine", False)])
def test_cuda_decoder_step_matches_the_composed_step(cell, score, input_feeding):
    arguments = step_arguments(GPU_SHAPE, cell, score, ("lengths", "padding"), device="cuda",
                               input_feeding=input_feeding)
    with torch.no_grad():
        got = torch.ops.fastattn.attention_decoder_step_inference(*arguments)
        routed = torch.ops.fastattn.attention_decoder_step(*arguments)
    assert_step_close(got, composed(arguments))
    for a, b in zip(got, routed):  # attention_decoder_step without gradients is the inference op
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    arguments[13].requires_grad_()  # w_ih: the composed step, which records the gradients
    composed_on_device = torch.ops.fastattn.attention_decoder_step(*arguments)
    assert composed_on_device[0].grad_fn is not None
    assert_step_close([t.detach() for t in composed_on_device], composed(arguments))
    torch.library.opcheck(torch.ops.fastattn.attention_decoder_step_inference.default, arguments,
                          test_utils=("test_schema", "test_faketensor"))


@gpu
@pytest.mark.parametrize("cell, score, input_feeding, dtype", [("lstm", "dot", True, torch.float32),
                                                                ("gru", "additive", False, torch.float32),
                                                                ("lstm", "cosine", True, torch.bfloat16)])
def test_cuda_local_p_step_matches_the_composed_step(cell, score, input_feeding, dtype):
    """A local-p window of 3 on the device: float32 against the composed step, bfloat16
    under the 2x rule."""
    arguments = in_dtype(step_arguments(GPU_SHAPE, cell, score, ("lengths", "padding"), device="cuda",
                                        input_feeding=input_feeding, window=3), dtype)
    with torch.no_grad():
        got = torch.ops.fastattn.attention_decoder_step_inference(*arguments)
    if dtype == torch.float32:
        assert_step_close(got, composed(arguments))
    else:
        exact = composed(in_dtype(arguments, torch.float64))
        assert_within_twice_the_reference_error(got, reference_step(arguments), exact, dtype)
    assert ((got[3] > 0).sum(1) <= 7).all()


@gpu
def test_cuda_decoder_step_over_an_empty_source():
    arguments = step_arguments((3, 16, 32, 0, 24, 16), "lstm", "additive", ("lengths",), device="cuda")
    with torch.no_grad():
        got = torch.ops.fastattn.attention_decoder_step_inference(*arguments)
    assert got[3].shape == (3, 0)
    assert_step_close(got, composed(arguments))


@gpu
def test_cuda_decoder_step_is_captured_in_a_cuda_graph():
    """The step captured once and replayed on new inputs copied into its static buffers
    gives what the eager kernel gives on them."""
    arguments = list(step_arguments(GPU_SHAPE, "lstm", "additive", ("lengths",), device="cuda"))
    with torch.no_grad():
        first = torch.ops.fastattn.attention_decoder_step_inference(*arguments)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            torch.ops.fastattn.attention_decoder_step_inference(*arguments)  # warm-up off the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = torch.ops.fastattn.attention_decoder_step_inference(*arguments)
        for index in (0, 1, 2, 3):  # new y, h, c, attentional in the static inputs
            arguments[index].copy_(arguments[index].flip(0) * 0.5)
        graph.replay()
        expected = torch.ops.fastattn.attention_decoder_step_inference(*arguments)
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(captured[0], first[0])  # the replay computed the new step


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell, score, shape", [("lstm", "additive", GPU_SHAPE), ("gru", "dot", GPU_SHAPE),
                                                ("lstm", "cosine", SHAPES["odd"])], ids=["lstm-additive",
                                                                                        "gru-dot", "odd-scalar-loads"])
def test_cuda_low_precision_step_errs_at_most_twice_the_reference(cell, score, shape, dtype, monkeypatch):
    """The kernel in float16 / bfloat16 (16-byte loads, and scalar loads at odd sizes), and
    the composed step it falls back on, under the 2x rule; they differ (the kernel keeps its
    intermediates in float32), so the kernel ran."""
    arguments = in_dtype(step_arguments(shape, cell, score, ("lengths", "padding"), device="cuda"), dtype)
    exact = composed(in_dtype(arguments, torch.float64))
    with torch.no_grad():
        fused = torch.ops.fastattn.attention_decoder_step_inference(*arguments)
        reference_run = reference_step(arguments)
        monkeypatch.setenv("FASTATTN_CUDA_FUSED_DECODER_STEP", "0")
        composed_on_device = torch.ops.fastattn.attention_decoder_step_inference(*arguments)
    for got in (fused, composed_on_device):
        assert_within_twice_the_reference_error(got, reference_run, exact, dtype)
    assert not torch.equal(fused[0], composed_on_device[0])


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_decoder_cell_in_low_precision_takes_the_fused_step(dtype):
    """AttentionDecoderCell in float16 / bfloat16 on the cuda backend: without gradients
    the one-launch op, under the 2x rule against the reference backend in that dtype;
    with them the composed op, whose backward reaches every parameter."""
    torch.manual_seed(0)
    decoder = AttentionDecoderCell(16, 32, 24, score="additive", cell="lstm").to("cuda", dtype)
    keys, y = torch.randn(5, 40, 24, device="cuda", dtype=dtype), torch.randn(5, 16, device="cuda", dtype=dtype)
    lengths = torch.tensor([40, 7, 0, 33, 12], device="cuda")

    def step(backend, module, y, keys):
        with fastattn.backend(backend):
            output, state, weights = module(y, None, module.precompute(keys), lengths=lengths)
        return output, state.hidden, state.cell, weights

    log = OpLog()
    with torch.no_grad():
        with log:
            fused = step("cuda", decoder, y, keys)
        reference_run = step("reference", decoder, y, keys)
        exact = step("reference", copy.deepcopy(decoder).double(), y.double(), keys.double())
    assert "fastattn::attention_decoder_step_inference" in log.names
    assert_within_twice_the_reference_error(fused, reference_run, exact, dtype)
    output = step("cuda", decoder, y, keys)[0]
    output.float().square().sum().backward()
    for name, parameter in decoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
