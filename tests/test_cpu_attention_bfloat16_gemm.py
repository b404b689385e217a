"""The bfloat16 GEMMs of the C++ attention's matrix-multiply path (dot and cosine scores,
S >= 16, N T S (D + Dv) >= 2^19, 2 rows a key or 1 for the dot score's backward, most keys
visible), on a CPU with AVX512-BF16 (csrc/cpu/bfloat16_gemm.h): the scores and the
backward's dW = dC v^T in float32 from the bfloat16 inputs as they are (the cosine's norms
divided out after q.k), W @ V and the backward's other three GEMMs as bfloat16 at::bmm on
W and dE rounded to bfloat16 (and the cosine's unit vectors).  Shapes cover every remainder
of the GEMM's blocks: rows (T) modulo its 6-row block, columns (S) about its 16-column
panels, and odd feature sizes (D, Dv), with and without the 16 x 16 transposes of its
packing, keys shared by the batch, and key rows further apart than D."""

import os
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import _extension, backends
from tests.cpu_capability import run_with_cpu_capability
from tests.problems import BLOCK_SCORES, BLOCK_SHAPES, attention_shape_ids, score_blocks

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

BFLOAT16_GEMMS = "avx512_bf16" in (_extension.cpu_kernels() or ())
needs_bfloat16_gemms = pytest.mark.skipif(not BFLOAT16_GEMMS, reason="this CPU has no AVX512-BF16")

# (N, T, S, D, Dv): T = 16 .. 21 takes each remainder of 6 rows; S = 16, 17, 31, 33, 47
# panels of 16 whole, with one column, and short; D = 129 and 255 odd (255: 7 transposes
# of 16 pairs and 15 pairs after them), 128 and 130 even; Dv = 33 and 47 odd (dW's K); N
# enough for N T S (D + Dv) >= 2^19 (test_the_shapes_take_the_bfloat16_gemms).
SHAPES = [(12, 16, 17, 129, 33), (4, 17, 47, 130, 40), (1, 64, 64, 256, 64), (3, 18, 33, 255, 47),
          (6, 19, 31, 128, 32), (10, 20, 16, 131, 35), (3, 21, 48, 160, 64)]
# Few rows and small, odd features: T = 1..5, D = 2, 9, 24 and 37 (no whole 16 x 16 transpose,
# one and a tail), Dv = 1, 5, 7, 9 and 19.  At T = 1 with keys of their own the forward and the
# cosine's backward take the per-row kernel, the dot score's backward the GEMMs (each op
# answers for itself).
SMALL_SHAPES = [(8, 3, 2048, 9, 5), (32, 2, 4096, 2, 1), (4, 5, 1024, 37, 19), (16, 2, 600, 24, 7),
                (16, 1, 1024, 24, 9)]
# Decode steps (T = 1, 2; N T S (D + Dv) >= 2^19): with keys shared by the batch (the location
# score's W_a) N T query rows read each key, and the matrix-multiply path runs one GEMM over all of them; at
# T = 1, W v in blocks of 64 keys (S = 150: three) by 64 columns, then 16, then a masked few
# (Dv = 83 = 64 + 16 + 3).
DECODE_SHAPES = [(17, 1, 150, 136, 83), (8, 2, 300, 129, 33)]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them, or an empty set elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_the_bfloat16_gemms_run_where_the_cpu_has_avx512_bf16():
    """`info()["cpu_kernels"]` names the widest clones the CPU runs (avx512 where Linux lists
    AVX2, FMA and AVX-512 F, BW, VL and DQ, else avx2 where it lists AVX2 and FMA, else
    baseline) and lists avx512_bf16 exactly where it lists AVX-512 BF16 too; under
    ATEN_CPU_CAPABILITY=avx2 neither AVX-512 entry (a process of its own: the choice is made
    once a process)."""
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to check the CPU's flags against")
    has_avx2 = {"avx2", "fma"} <= flags
    has_avx512 = has_avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    capability = os.environ.get("ATEN_CPU_CAPABILITY")  # set where tests/test_cpu_isa_tiers.py runs this
    avx2, avx512 = has_avx2 and capability != "default", has_avx512 and capability not in ("default", "avx2")
    kernels = fastattn.info()["cpu_kernels"]
    assert kernels[0] == ("avx512" if avx512 else "avx2" if avx2 else "baseline")
    assert ("avx512_bf16" in kernels) == (avx512 and "avx512_bf16" in flags)
    script = "import fastattn; print(','.join(fastattn.info()['cpu_kernels']))"
    result = run_with_cpu_capability(script, "avx2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split(",")[0] == ("avx2" if has_avx2 else "baseline") and "avx512" not in result.stdout


def _case(shape, shared_keys, seed):
    """bfloat16 leaves of one call: keys whose rows are 3 elements further apart than D
    (a slice), lengths with a fully masked row (0) and a short one, and a padding mask."""
    batch, queries, source, dim, value_dim = shape
    generator = torch.Generator().manual_seed(seed)

    def tensor(*size):
        return torch.randn(*size, generator=generator).bfloat16()

    wide_keys = tensor(1 if shared_keys else batch, source, dim + 3)
    lengths = torch.tensor(([source, 0, source - 3, source - 1] * batch)[:batch]) if batch > 1 else None
    padding = torch.rand(batch, source, generator=generator) > 0.9
    return {"query": tensor(batch, queries, dim), "keys": wide_keys[..., 1:dim + 1], "values": tensor(batch, source, value_dim),
            "lengths": lengths, "key_padding_mask": padding, "grad_context": tensor(batch, queries, value_dim)}


def _op(case, dtype, score="dot", scale=0.6):
    """The op's context, weights, logsumexp and gradients of query, keys, values, on the
    case's tensors in dtype."""
    query, keys, values, grad_context = (case[name].to(dtype) for name in ("query", "keys", "values", "grad_context"))
    arguments = [query, keys, values, None, None, score, scale, case["lengths"], case["key_padding_mask"], False,
                 None, None, False]
    context, weights, logsumexp = torch.ops.fastattn.attention_forward(*arguments, True)
    grads = torch.ops.fastattn.attention_backward(grad_context, None, *arguments, logsumexp)
    return context, weights, logsumexp, *grads[:3]


def check_scores(shape, shared_keys, score="dot"):
    """logsumexp, float32, is that of the float64 scores of the same bfloat16 inputs to
    float32's rounding (a score rounded to bfloat16 would be off by 2^-9 of itself), and
    the bfloat16 weights are those scores' softmax rounded once (one unit in the last
    place): every block of the GEMM computed, none twice or misplaced."""
    case = _case(shape, shared_keys, seed=sum(shape))
    _, weights, logsumexp, *_ = _op(case, torch.bfloat16, score)
    _, exact_weights, exact_logsumexp, *_ = _op(case, torch.float64, score)
    visible = torch.isfinite(exact_logsumexp)
    assert torch.equal(torch.isfinite(logsumexp), visible) and visible.sum() > 0
    magnitude = exact_logsumexp[visible].abs().max().item() + 1.0
    torch.testing.assert_close(logsumexp[visible].double(), exact_logsumexp[visible], rtol=0, atol=2e-6 * magnitude)
    torch.testing.assert_close(weights.double(), exact_weights.bfloat16().double(), rtol=torch.finfo(torch.bfloat16).eps,
                               atol=1e-30)
    if case["lengths"] is not None:  # lengths 0: a fully masked row, zeros
        assert weights[1].abs().max() == 0


def check_errors(shape, shared_keys, score="dot", case=None):
    """The project's rule for 16-bit dtypes: the context, weights and the gradients of
    query, keys and values err against float64 at most twice as much as the reference run
    in bfloat16 does (plus a floor of one bfloat16 rounding of the largest entry)."""
    case = case or _case(shape, shared_keys, seed=7 * sum(shape))
    got = _op(case, torch.bfloat16, score)
    exact = _op(case, torch.float64, score)
    leaves = [case[name].clone().requires_grad_() for name in ("query", "keys", "values")]
    keys = leaves[1].expand(shape[0], -1, -1)  # shared: the gradient of the (1, S, D) leaf sums over the batch
    with fastattn.backend("reference"):
        context, weights = fastattn.attention(leaves[0], keys, leaves[2], score="scaled_dot" if score == "dot" else score,
                                              scale=0.6,
                                              lengths=case["lengths"], key_padding_mask=case["key_padding_mask"],
                                              return_weights=True)
    in_bfloat16 = [context, weights, *torch.autograd.grad(context, leaves, case["grad_context"])]
    names = ["context", "weights", "grad_query", "grad_keys", "grad_values"]
    for name, output, reference, oracle in zip(names, [got[0], got[1], *got[3:]], in_bfloat16,
                                               [exact[0], exact[1], *exact[3:]]):
        assert output.dtype == torch.bfloat16 and output.shape == oracle.shape == reference.shape, name
        error = (output.double() - oracle).abs().max().item()
        reference_error = (reference.double() - oracle).abs().max().item()
        floor = torch.finfo(torch.bfloat16).eps * oracle.abs().max().item()
        assert error <= 2 * reference_error + floor, (name, error, reference_error)


SHAPE_IDS, SMALL_SHAPE_IDS = attention_shape_ids(SHAPES), attention_shape_ids(SMALL_SHAPES)
BLOCK_SHAPE_IDS = attention_shape_ids(BLOCK_SHAPES)
SHARING = pytest.mark.parametrize("shared_keys", [False, True], ids=["keys_per_batch", "keys_shared_by_the_batch"])
SCORES = pytest.mark.parametrize("score", ["dot", "cosine"])


@needs_bfloat16_gemms
@SCORES
@SHARING
@pytest.mark.parametrize("shape", SHAPES + SMALL_SHAPES, ids=SHAPE_IDS + SMALL_SHAPE_IDS)
def test_scores_are_float32_sums_of_the_bfloat16_products(shape, shared_keys, score):
    check_scores(shape, shared_keys, score)


@needs_bfloat16_gemms
@SCORES
@SHARING
@pytest.mark.parametrize("shape", SHAPES[:4] + SMALL_SHAPES + BLOCK_SHAPES,
                         ids=SHAPE_IDS[:4] + SMALL_SHAPE_IDS + BLOCK_SHAPE_IDS)
def test_outputs_and_gradients_err_at_most_twice_the_reference_in_bfloat16(shape, shared_keys, score):
    check_errors(shape, shared_keys, score)


@needs_bfloat16_gemms
@SHARING
@pytest.mark.parametrize("shape", SHAPES + SMALL_SHAPES + BLOCK_SHAPES, ids=SHAPE_IDS + SMALL_SHAPE_IDS + BLOCK_SHAPE_IDS)
def test_the_shapes_take_the_bfloat16_gemms(shape, shared_keys):
    """The shapes the checks above run are on the matrix-multiply path: the forward's
    softmax and W @ V (an at::bmm) for each block of scores at T > 1 (at T = 1 one softmax
    and bfloat16_decode_context), and the backward's three at::bmm (dot score), for each
    block where its batch elements are whole and have keys of their own, else once over all
    rows; at T = 1 with keys of their own the forward is the per-row kernel's (it needs 2
    rows a key), the dot score's backward the GEMMs."""
    case = _case(shape, shared_keys, seed=1)
    arguments = [case["query"], case["keys"], case["values"], None, None, "dot", 0.6, case["lengths"],
                 case["key_padding_mask"], False, None, None, False]
    outputs = []
    forward = matrix_products(lambda: outputs.extend(torch.ops.fastattn.attention_forward(*arguments, False)))
    backward = matrix_products(lambda: torch.ops.fastattn.attention_backward(case["grad_context"], None, *arguments,
                                                                             outputs[2]))
    queries = shape[1]
    forward_gemms = ["fastattn::softmax_rows", "aten::bmm"] * score_blocks(*shape[:3]) if queries > 1 else ["fastattn::softmax_rows"]
    assert forward == (forward_gemms if queries > 1 or shared_keys else [])
    gemms_per_block = not shared_keys and queries * shape[2] <= BLOCK_SCORES
    assert backward == ["aten::bmm"] * 3 * (score_blocks(*shape[:3]) if gemms_per_block else 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=attention_shape_ids(DECODE_SHAPES))
def test_decode_steps_with_keys_shared_by_the_batch_take_one_gemm_over_the_batch(shape, dtype):
    """Decode steps (T = 1, 2), keys shared by the batch, bfloat16 where the CPU has
    AVX512-BF16: the matrix-multiply path (a softmax), its scores one GEMM of ours over the
    batch's rows, and W @ V an at::bmm, or at T = 1 a pass that reads the values as stored
    (no matrix product); with per-batch keys the same path at T = 2 and the per-row kernel
    at T = 1 (one row a key: the forward's GEMMs need 2); in float32 (under 4 rows a key)
    the per-row kernel (neither); the scores, outputs and gradients pass the checks above."""
    case = _case(shape, True, seed=sum(shape))
    forward = lambda keys: torch.ops.fastattn.attention_forward(  # noqa: E731
        case["query"].to(dtype), keys.to(dtype), case["values"].to(dtype), None, None, "dot", 0.6, case["lengths"],
        case["key_padding_mask"], False, None, None, False, True)
    matrix_path = ["fastattn::softmax_rows"] + (["aten::bmm"] if shape[1] > 1 else [])
    shared = matrix_path if dtype == torch.bfloat16 and BFLOAT16_GEMMS else []
    assert matrix_products(lambda: forward(case["keys"])) == shared
    per_batch = shared if shape[1] > 1 else []
    assert matrix_products(lambda: forward(case["keys"].expand(shape[0], -1, -1).contiguous())) == per_batch
    if dtype == torch.bfloat16:
        for score in ("dot", "cosine"):
            check_scores(shape, True, score)
            check_errors(shape, True, score)


def matrix_products(function) -> list[str]:
    """The matrix products (ATen's bmm and mm, fastattn::batched_matmul: our float32 tiles)
    and softmaxes (the matrix-multiply path's; the per-row kernel calls neither) `function`
    calls, in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        function()
    names = ("aten::bmm", "aten::mm", "fastattn::batched_matmul", "fastattn::softmax_rows")
    return [event.name for event in profile.events() if event.name in names]


@needs_bfloat16_gemms
def test_the_cosine_takes_q_k_from_the_bfloat16_gemm_where_every_norm_suits_it():
    """A bfloat16 cosine forward runs one ATen matrix product (W @ V; q.k is the bfloat16
    GEMM of our own), its backward three (dW = dC v^T ours); with a query row of norm below
    2^-50 (whose q.k the instruction's flush to zero would lose) or a key row above 2^50,
    both run the float32 GEMMs on the unit vectors (two and five), and the outputs and
    gradients still keep to the 2x rule."""
    shape = SHAPES[0]
    case = _case(shape, False, seed=11)
    assert matrix_products(lambda: _op(case, torch.bfloat16, "cosine")) == ["fastattn::softmax_rows"] + ["aten::bmm"] * 4
    check_errors(shape, False, "cosine", case)
    for name, row, factor in (("query", (0, 2), 1e-17), ("keys", (1, 3), 1e17)):
        tiny_or_huge = {**case, name: case[name].clone()}
        tiny_or_huge[name][row] *= factor
        float32_gemms = ["fastattn::batched_matmul", "fastattn::softmax_rows"] + ["fastattn::batched_matmul"] * 6
        assert matrix_products(lambda: _op(tiny_or_huge, torch.bfloat16, "cosine")) == float32_gemms, name
        check_errors(shape, False, "cosine", tiny_or_huge)


def test_the_float32_gemms_on_a_cpu_without_avx512_bf16_pass_the_same_checks():
    """ATEN_CPU_CAPABILITY=avx2 turns the bfloat16 GEMMs off (as on a CPU without
    AVX512-BF16): the float32 GEMMs on widened copies pass the same checks."""
    script = ("from tests import test_cpu_attention_bfloat16_gemm as t\n"
              "assert 'avx512_bf16' not in t._extension.cpu_kernels()\n"
              "for shape in t.SHAPES[:3]:\n"
              "    for shared_keys in (False, True):\n"
              "        for score in ('dot', 'cosine'):\n"
              "            t.check_scores(shape, shared_keys, score)\n"
              "            t.check_errors(shape, shared_keys, score)\n"
              "print('passed')\n")
    result = run_with_cpu_capability(script, "avx2")
    assert result.returncode == 0 and result.stdout.strip().endswith("passed"), result.stderr[-3000:]
