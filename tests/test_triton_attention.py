"""The Triton attention kernels (backend "triton") against the reference: outputs,
weights and gradients for every score, mask and window, fully masked rows, the decode
step with its keys split across programs, hard attention, and opcheck on every op.

On a machine without a GPU they run on CPU tensors under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), at tiny odd shapes that still cross the
16-wide blocks; the tests marked ``gpu`` run at realistic shapes in float16/bfloat16
with the rule "error <= 2x the reference's own error in that dtype".
"""

import os

import pytest
import torch

import fastattn
from fastattn import backends
from tests.problems import (
    SCORES,
    assert_op_gradients_within_twice_the_reference_error,
    input_gradients,
    key_dim_for,
    peaked_additive_problem,
    score_parameters,
)

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=str(backends.unavailable_reason("triton"))
)
INTERPRETED_DEVICE = "cpu"
BATCH, QUERIES, KEYS = 2, 19, 21  # two query blocks and two key blocks of 16

MODES = {
    "global": {},
    "lengths": {"lengths": torch.tensor([0, 13])},
    "key_padding_mask": {"key_padding_mask": torch.tensor([[False, True] * 10 + [False], [True] * 21])},
    "causal": {"causal": True},
    "local_m_gaussian": {"window": 3, "gaussian": True, "lengths": torch.tensor([21, 11])},
    "local_p": {"window": 2, "center": torch.linspace(-1.5, 22.0, QUERIES).expand(BATCH, QUERIES)},
    "local_p_plain": {"window": 4, "center": torch.linspace(20.0, 0.3, QUERIES).expand(BATCH, QUERIES), "gaussian": False},
}
# Every score on the dot-product path once, every mode on each kernel kind.
CASES = (
    [("scaled_dot", mode) for mode in MODES]
    + [("additive", mode) for mode in ("global", "lengths", "local_m_gaussian", "local_p")]
    + [("cosine", mode) for mode in ("key_padding_mask", "causal", "local_p_plain")]
    + [("dot", "local_m_gaussian"), ("general", "lengths"), ("location", "global")]
)


def problem(score, mode, *, queries=QUERIES, keys_length=KEYS, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if MODES[mode].get("causal"):
        keys_length = queries  # causal needs T == S
    query_dim, key_dim = 20, key_dim_for(score, 20, 7)  # 20 > 16: two feature tiles

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()

    query, keys, values = leaf(BATCH, queries, query_dim), leaf(BATCH, keys_length, key_dim), leaf(BATCH, keys_length, 5)
    parameters = score_parameters(score, query_dim, key_dim, attention_dim=18, max_source_len=24, generator=generator)
    parameters = {name: value.to(dtype).requires_grad_() for name, value in parameters.items()}
    masking = {}
    for name, value in MODES[mode].items():
        if name == "center":
            value = value[:, :queries].to(dtype).requires_grad_()
        masking[name] = value
    return query, keys, values, parameters, masking


def run(backend_name, score, query, keys, values, parameters, masking, return_weights=True):
    """Outputs and the gradients of a fixed random projection of them."""
    leaves = [query, keys, values, *[p for p in parameters.values() if isinstance(p, torch.Tensor)]]
    leaves += [m for m in masking.values() if isinstance(m, torch.Tensor) and m.requires_grad]
    with fastattn.backend(backend_name):
        outputs = fastattn.attention(query, keys, values, score=score, return_weights=return_weights, **parameters, **masking)
    outputs = outputs if return_weights else (outputs,)
    generator = torch.Generator().manual_seed(1)
    projection = sum(
        (output * torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output)).sum()
        for output in outputs
    )
    grads = torch.autograd.grad(projection, leaves, allow_unused=True)
    return outputs, grads


def assert_matches(actual, expected, tolerance):
    for got, want in zip(actual[0], expected[0]):
        torch.testing.assert_close(got, want, **tolerance)
    for got, want in zip(actual[1], expected[1]):
        if want is None:
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, want, **tolerance)


FLOAT32 = {"rtol": 1e-4, "atol": 5e-5}  # float32 summed in another order, D = 20


@pytest.mark.parametrize("score,mode", CASES)
def test_outputs_weights_and_gradients_match_the_reference(score, mode):
    inputs = problem(score, mode)
    assert_matches(run("triton", score, *inputs), run("reference", score, *inputs), FLOAT32)


@pytest.fixture
def restore_deterministic_mode():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def test_deterministic_mode_refuses_the_additive_backward_only(restore_deterministic_mode):
    """Its atomics: an error under torch.use_deterministic_algorithms(True), a warning with
    warn_only=True (the gradients still computed); the dot score's backward has none."""
    additive, dot = problem("additive", "lengths"), problem("scaled_dot", "lengths")
    torch.use_deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match="triton_attention_backward with the additive score .*deterministic"):
        run("triton", "additive", *additive)
    assert_matches(run("triton", "scaled_dot", *dot), run("reference", "scaled_dot", *dot), FLOAT32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
        got = run("triton", "additive", *additive)
    assert_matches(got, run("reference", "additive", *additive), FLOAT32)


def test_fully_masked_rows_give_zeros_and_no_nan():
    query, keys, values, parameters, masking = problem("scaled_dot", "lengths")
    (context, weights), grads = run("triton", "scaled_dot", query, keys, values, parameters, masking)
    assert context[0].abs().max() == 0 and weights[0].abs().max() == 0
    assert all(torch.isfinite(grad).all() for grad in grads if grad is not None)
    assert grads[0][0].abs().max() == 0  # the query of the empty sequence gets no gradient


@pytest.mark.parametrize("score,mode", [("scaled_dot", "lengths"), ("additive", "local_p"), ("cosine", "global")])
def test_decode_step_with_split_keys(score, mode):
    # One query per sequence and 37 keys: three splits of 16 keys merged by the combine kernel.
    inputs = problem(score, mode if mode != "local_p" else "local_m_gaussian", queries=1, keys_length=37)
    query, keys, values, parameters, masking = inputs
    masking = {name: value for name, value in masking.items() if name != "lengths"}
    if mode == "lengths":
        masking["lengths"] = torch.tensor([0, 30])
    if mode == "local_p":
        masking["center"] = torch.tensor([3.5, 30.0]).requires_grad_()
    step = (query[:, 0].detach().requires_grad_(), keys, values, parameters, masking)
    assert_matches(run("triton", score, *step), run("reference", score, *step), FLOAT32)


DECODE_CASES = (
    [("additive", mode) for mode in ("global", "lengths", "key_padding_mask", "local_m_gaussian", "local_p")]
    + [("scaled_dot", mode) for mode in ("global", "key_padding_mask", "local_p_plain")]
    + [("cosine", "lengths"), ("cosine", "local_m_gaussian"), ("dot", "global"), ("general", "lengths"), ("location", "global")]
)


@pytest.mark.parametrize("score,mode", DECODE_CASES)
def test_a_decode_step_takes_blocks_of_one_query_row(score, mode, monkeypatch):
    """A decode step's forward and weights run one query row a block (BLOCK_T = 1: nothing
    spent on the absent rows of a 16-row block, the additive score's tanh above all), their
    scores and values summed without tl.dot, its 21 keys in two splits, and so does the
    additive score's backward (its two launches; the other scores' three keep 16 rows);
    outputs and gradients match the reference.  Multi-query keeps blocks of 16 rows or more."""
    from fastattn.ops import triton_launch

    query_rows = {}
    original = triton_launch.run_kernel

    def recording(kernel, grid, *arguments, **constexprs):
        query_rows.setdefault(kernel.__name__, []).append(constexprs["BLOCK_T"])
        return original(kernel, grid, *arguments, **constexprs)

    monkeypatch.setattr(triton_launch, "run_kernel", recording)
    query, keys, values, parameters, masking = problem(score, mode)
    if "center" in masking:
        masking["center"] = masking["center"][:, 0].detach().requires_grad_()
    step = (query[:, 0].detach().requires_grad_(), keys, values, parameters, masking)
    got = run("triton", score, *step)
    additive, sixteen = score == "additive", triton_launch.SMALLEST_BLOCK
    assert query_rows == {
        "attention_forward_kernel": [1], "attention_combine_kernel": [sixteen], "attention_weights_kernel": [1],
        "attention_grad_query_kernel": [1] if additive else [sixteen] * 2,
        "attention_grad_key_value_kernel": [1 if additive else sixteen],
    }
    assert_matches(got, run("reference", score, *step), FLOAT32)
    query_rows.clear()
    run("triton", score, *problem(score, mode, queries=3))
    assert min(min(rows) for rows in query_rows.values()) >= sixteen


def test_without_weights_output():
    inputs = problem("scaled_dot", "causal")
    assert_matches(
        run("triton", "scaled_dot", *inputs, return_weights=False),
        run("reference", "scaled_dot", *inputs, return_weights=False),
        FLOAT32,
    )


@pytest.mark.parametrize("mode", ["lengths", "key_padding_mask", "causal", "local_m_gaussian", "local_p"])
def test_an_infinite_weight_gradient_at_a_masked_key_leaves_the_row_finite(mode):
    """An entropy penalty on the weights, xlogy(w, w), has an infinite gradient where w = 0:
    at the masked keys.  The kernels multiplied it by their probability 0 and the NaN
    spread through the row's softmax term to its query and key gradients (a helper's
    audit); the reference and the cpu backend keep them finite, and so does Triton now."""
    inputs = problem("scaled_dot", mode)
    leaves = inputs[:3]
    results = {}
    for backend_name in ("cpu", "triton"):
        with fastattn.backend(backend_name):
            context, weights = fastattn.attention(*leaves, score="scaled_dot", return_weights=True, **inputs[4])
        loss = context.sum() - 0.1 * torch.special.xlogy(weights, weights).sum()
        results[backend_name] = torch.autograd.grad(loss, leaves)
    for got, want in zip(results["triton"], results["cpu"]):
        assert want.isfinite().all()
        torch.testing.assert_close(got, want, **FLOAT32)


def test_the_backward_keeps_neither_the_context_nor_the_weights():
    """It needs the inputs and the (N, T, 2) row statistics only: a (N, T, S) weights
    output kept alive by the graph would cost its memory until the backward."""
    query, keys, values = (torch.randn(2, length, 8, requires_grad=True) for length in (5, 7, 7))
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), fastattn.backend("triton"):
        context, weights = fastattn.attention(query, keys, values, score="scaled_dot", return_weights=True)
    shapes = [tuple(tensor.shape) for tensor in saved]
    assert (2, 5, 2) in shapes  # the row statistics, so the hook saw the op's saved tensors
    assert not any(tensor.data_ptr() in (context.data_ptr(), weights.data_ptr()) for tensor in saved), shapes


def test_additive_attention_with_projections_given():
    generator = torch.Generator().manual_seed(2)
    q_proj, k_proj = torch.randn(2, 3, 17, generator=generator), torch.randn(2, 18, 17, generator=generator)
    v, values = torch.randn(17, generator=generator), torch.randn(2, 18, 4, generator=generator)
    results = {}
    for name in ("triton", "reference"):
        with fastattn.backend(name):
            results[name] = fastattn.additive_attention(q_proj, k_proj, v, values, lengths=torch.tensor([5, 18]), return_weights=True)
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, **FLOAT32)


def test_scaled_dot_product_attention_drop_in():
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(2, 3, 17, 8, generator=generator) for _ in range(3))
    results = {}
    for name in ("triton", "reference"):
        with fastattn.backend(name):
            results[name] = fastattn.scaled_dot_product_attention(query, key, value, is_causal=True)
    torch.testing.assert_close(results["triton"], results["reference"], **FLOAT32)


def test_float64_runs_the_reference():
    inputs = problem("general", "causal", dtype=torch.float64)
    assert_matches(run("triton", "general", *inputs), run("reference", "general", *inputs), {"rtol": 1e-12, "atol": 1e-12})


@pytest.mark.parametrize("sample", [False, True])
def test_hard_attention(sample):
    query, keys, values, parameters, masking = problem("scaled_dot", "lengths")
    outputs = {}
    for name in ("triton", "reference"):
        with fastattn.backend(name):
            outputs[name] = fastattn.hard_attention(
                query, keys, values, score="scaled_dot", sample=sample, generator=torch.Generator().manual_seed(5),
                **masking,
            )
    context, index, log_prob, weights = outputs["triton"]
    torch.testing.assert_close(weights, outputs["reference"][3], **FLOAT32)
    assert (index[0] == 0).all() and context[0].abs().max() == 0  # the empty sequence
    assert (index[1] < 13).all()  # never a padded key
    torch.testing.assert_close(context, values.gather(1, index.unsqueeze(-1).expand(-1, -1, 5)) * (index >= 0)[..., None] * torch.tensor([0.0, 1.0])[:, None, None])
    if not sample:  # the same positions: the same outputs and gradients (through the weights' log-probability too)
        assert torch.equal(index, outputs["reference"][1])
        torch.testing.assert_close(log_prob, outputs["reference"][2], **FLOAT32)
        grads = {}
        for name in ("triton", "reference"):
            context, _, log_prob, _ = outputs[name]
            projection = (context * torch.linspace(-1, 1, 5)).sum() + (log_prob * torch.linspace(0, 2, QUERIES)).sum()
            grads[name] = torch.autograd.grad(projection, (query, keys, values))
        for got, want in zip(grads["triton"], grads["reference"]):
            torch.testing.assert_close(got, want, **FLOAT32)
    else:
        with fastattn.backend("triton"):
            again = fastattn.hard_attention(
                query, keys, values, score="scaled_dot", sample=True, generator=torch.Generator().manual_seed(5), **masking
            )
        assert torch.equal(again[1], index)


def opcheck(op, arguments):
    """torch.library.opcheck; under the interpreter the op is kept whole when traced (as
    torch.export does) instead of being decomposed into Triton's higher-order op, whose
    tracing needs compiled kernels."""
    from fastattn.ops.triton_launch import INTERPRETED

    if not INTERPRETED:
        return torch.library.opcheck(op, arguments)
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        return torch.library.opcheck(op, arguments)


def _opcheck_samples():
    query, keys, values, _, _ = problem("scaled_dot", "global")
    query, keys, values = (x.detach()[:, :17] for x in (query, keys, values))
    center = torch.full((BATCH, 17), 4.0)
    additive = dict(v=torch.randn(20), bias=torch.randn(20))
    return [
        (query, keys, values, None, None, "dot", 0.5, torch.tensor([3, 17]), None, True, None, None, False, True),
        (query, keys, values, None, None, "cosine", 2.0, None, None, False, 2, center, True, False),
        (query, keys, values, additive["v"], additive["bias"], "additive", 1.0, None, None, False, 3, None, True, True),
        (query, keys[:1], values, None, None, "dot", 1.0, None, None, False, None, None, False, True),  # shared keys
    ]


@pytest.mark.parametrize("sample_index", range(4))
def test_opcheck_attention(sample_index):
    arguments = list(_opcheck_samples()[sample_index])
    for position in (0, 1, 2, 3, 4, 11):
        if isinstance(arguments[position], torch.Tensor):
            arguments[position] = arguments[position].clone().requires_grad_()
    opcheck(torch.ops.fastattn.triton_attention_forward.default, tuple(arguments))


# ---------------------------------------------------------------- GPU, realistic shapes


def gpu_problem(score, mode, batch, queries, keys_length, features):
    """float64 CPU inputs at a realistic shape: (query, keys, values, parameters, masking)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, queries, features, generator=generator, dtype=torch.float64)
    key_features = key_dim_for(score, features, features)
    keys = torch.randn(batch, keys_length, key_features, generator=generator, dtype=torch.float64)
    values = torch.randn(batch, keys_length, features, generator=generator, dtype=torch.float64)
    parameters = score_parameters(score, features, key_features, attention_dim=features, max_source_len=keys_length, generator=generator)
    parameters = {name: value / features**0.5 for name, value in parameters.items()}
    masking = {"lengths": torch.randint(0, keys_length + 1, (batch,), generator=generator)} if mode == "lengths" else {}
    if mode == "causal":
        masking = {"causal": True}
    if mode == "local_p":
        masking = {"window": 8, "center": torch.rand(batch, queries, generator=generator, dtype=torch.float64) * keys_length}
    return query, keys, values, parameters, masking


def gpu_outputs(backend_name, dtype, device, score, query, keys, values, parameters, masking):
    """Context, weights and the input gradients of a fixed projection of the context, in
    float64, from ``backend_name`` run in ``dtype`` on ``device``."""

    def moved(tensor, to=dtype):
        if tensor.dtype == torch.int64:
            return tensor.to(device)
        return tensor.to(device=device, dtype=to).requires_grad_()

    inputs = [moved(x) for x in (query, keys, values)]
    params = {name: moved(value) for name, value in parameters.items()}
    # A local-p center in float32 below float64 (what 16-bit queries take: positions to 300 in
    # float16 move by up to 0.25, in bfloat16 by 2, which swamped every output's error).
    masks = {name: value if not isinstance(value, torch.Tensor)
             else moved(value, torch.float32 if name == "center" and dtype != torch.float64 else dtype)
             for name, value in masking.items()}
    with fastattn.backend(backend_name):
        context, weights = fastattn.attention(*inputs, score=score, return_weights=True, **params, **masks)
    grad_generator = torch.Generator(device=device).manual_seed(1)
    cotangent = torch.randn(context.shape, generator=grad_generator, device=device, dtype=torch.float64)
    projection = (context * cotangent.to(context.dtype)).sum()
    grads = torch.autograd.grad(projection, inputs, allow_unused=True)  # location ignores the keys
    return [context.double(), weights.double(), *(torch.zeros((), device=device, dtype=torch.float64) if g is None else g.double() for g in grads)]


def assert_within_twice_the_reference_error(dtype, score, mode, shape):
    problem_inputs = gpu_problem(score, mode, *shape)
    exact = gpu_outputs("reference", torch.float64, "cuda", score, *problem_inputs)
    ours = gpu_outputs("triton", dtype, "cuda", score, *problem_inputs)
    theirs = gpu_outputs("reference", dtype, "cuda", score, *problem_inputs)
    # Plus one rounding of the largest entry: a reference run may round an output almost
    # exactly where ours takes its one rounding in dtype.
    for index, (want, got, reference_result) in enumerate(zip(exact, ours, theirs)):
        our_error = (got - want).abs().max().item()
        reference_error = (reference_result - want).abs().max().item()
        rounding = torch.finfo(dtype).eps * want.abs().max().item()
        assert our_error <= 2 * reference_error + rounding + 1e-5, (index, our_error, reference_error)


# (score, mode, (batch, queries, keys, features)) of the float16/bfloat16 gpu test; also the
# problems whose Triton compiles gpu_check.sh warms (benchmarks/triton_compile_problems.py).
GPU_LOW_PRECISION_CASES = [
    ("scaled_dot", "global", (8, 256, 384, 64)),
    ("scaled_dot", "causal", (8, 257, 257, 128)),
    ("scaled_dot", "lengths", (64, 1, 1024, 512)),  # decode step, split keys
    ("general", "local_p", (8, 100, 300, 64)),
    ("cosine", "lengths", (16, 64, 200, 96)),
    ("additive", "lengths", (8, 33, 200, 128)),
    ("location", "global", (8, 64, 130, 64)),
    ("dot", "global", (64, 1, 4096, 64)),
]
# The float32 gpu test's one problem (eight kernel compiles: the gpu tests share gpu_check.sh's time).
GPU_FLOAT32_CASE = ("scaled_dot", "causal", (8, 257, 257, 128))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("score,mode,shape", GPU_LOW_PRECISION_CASES)
def test_gpu_low_precision_within_twice_the_reference_error(dtype, score, mode, shape):
    assert_within_twice_the_reference_error(dtype, score, mode, shape)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_gpu_float32_within_twice_the_reference_error_at_torchs_matmul_precision(precision):
    from fastattn.ops.triton_launch import float32_matmul_precision

    # The reference's float32 matmuls and the kernels' float32 dots both follow the setting
    # (TF32: errors near 1e-3, IEEE: summation order near 1e-6, hence the absolute slack).
    with float32_matmul_precision(precision):
        assert_within_twice_the_reference_error(torch.float32, *GPU_FLOAT32_CASE)


def test_cosine_with_a_large_scale_keeps_a_running_maximum():
    query, keys, values, _, masking = problem("cosine", "lengths")
    parameters = {"scale": 60.0}  # beyond the bounded-logit shortcut
    assert_matches(
        run("triton", "cosine", query, keys, values, parameters, masking),
        run("reference", "cosine", query, keys, values, parameters, masking),
        {"rtol": 1e-4, "atol": 2e-4},
    )


@pytest.mark.parametrize("scale", [3.0, 30.0])
def test_float16_cosine_with_a_large_scale_errs_at_most_twice_the_reference(scale):
    """float16 values take the probabilities cast to float16: with |scale| as the
    maximum (no running one) a row's probabilities exp(e - |scale|) underflowed there
    past |scale| ~8, leaving a zero context; float16 keeps a running maximum past 4."""
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in ((2, 3, 16), (2, 6, 16), (2, 6, 4)))

    def context(backend_name, dtype):
        with fastattn.backend(backend_name):
            return fastattn.attention(query.to(dtype), keys.to(dtype), values.to(dtype), score="cosine", scale=scale).double()

    exact = context("reference", torch.float64)
    reference_error = (context("reference", torch.float16) - exact).abs().max()
    assert (context("triton", torch.float16) - exact).abs().max() <= 2 * reference_error + 1e-3


@pytest.mark.parametrize("values_are_keys", [True, False])
def test_float16_cosine_gradients_next_to_zero_rows_are_finite(values_are_keys):
    """A zero query row and a zero key row in float16 (local-m windows of 3): their unit
    vectors are 0, but the tile products took dS / max(|x|, floor) (floor 2^-14) rounded
    to float16, which overflowed to inf, and inf times the zero row made the gradients NaN
    wherever a window held it.  The kernels now scale the rows themselves by
    1 / max(|x|, floor).  The gradients but the zero rows' own (~1e5, past float16 in the
    reference too) within twice the float16 reference's error."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 6, 8, generator=generator, dtype=torch.float64) * 3
    keys, values = (torch.randn(1, 12, 8, generator=generator, dtype=torch.float64) * 10 for _ in range(2))
    query[0, 0], keys[0, 2] = 0.0, 0.0

    def gradients(backend_name, dtype):
        leaves = [x.to(dtype).clone().requires_grad_() for x in ((query, keys) if values_are_keys else (query, keys, values))]
        with fastattn.backend(backend_name):
            context = fastattn.attention(*leaves[:2], leaves[1] if values_are_keys else leaves[2], score="cosine",
                                         scale=2.5, window=3)
        grads = [grad.double() for grad in torch.autograd.grad(context.double().sum(), leaves)]
        return [grads[0][:, 1:], torch.cat([grads[1][:, :2], grads[1][:, 3:]], 1), *grads[2:]]

    exact, theirs, ours = (gradients("reference", torch.float64), gradients("reference", torch.float16),
                           gradients("triton", torch.float16))
    for want, reference_result, got in zip(exact, theirs, ours):
        assert torch.isfinite(got).all()
        bound = 2 * (reference_result - want).abs().max() + torch.finfo(torch.float16).eps * want.abs().max()
        assert (got - want).abs().max() <= bound


BFLOAT16_UNDER_INTERPRETER = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1",
        reason="Triton's interpreter multiplies bfloat16 tl.dot operands wrongly (a 16x16 product is off by 1e10); "
        "the gpu tests cover bfloat16",
    ),
)


@pytest.mark.parametrize("dtype", [torch.float16, BFLOAT16_UNDER_INTERPRETER])
@pytest.mark.parametrize("score", ["scaled_dot", "additive"])
def test_low_precision_within_twice_the_reference_error(score, dtype):
    inputs64 = problem(score, "local_m_gaussian", dtype=torch.float64)
    low = problem(score, "local_m_gaussian", dtype=dtype)
    exact, ours, theirs = run("reference", score, *inputs64), run("triton", score, *low), run("reference", score, *low)
    for want, got, reference_result in zip((*exact[0], *exact[1]), (*ours[0], *ours[1]), (*theirs[0], *theirs[1])):
        if want is None:
            continue
        our_error = (got.double() - want).abs().max().item()
        reference_error = (reference_result.double() - want).abs().max().item()
        assert our_error <= 2 * reference_error + 1e-6, (our_error, reference_error)


@pytest.mark.parametrize("with_weights", [False, True], ids=["context", "context-and-weights"])
def test_a_peaked_float16_backward_sums_its_row_terms_from_float32_tiles(with_weights):
    """The softmax row term taken from the float16 context (and weights) broke the 2x rule
    here (grad_keys 1.8e-2 against the reference run's 5.7e-3); summed from the
    gradients' own float32 tiles it holds."""
    arguments, grad_context = peaked_additive_problem(5)
    grad_weights = torch.randn(1, 21, 37, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    grad_weights = grad_weights if with_weights else None
    ours = input_gradients(lambda *args: torch.ops.fastattn.triton_attention_forward(*args, with_weights), arguments,
                           grad_context, grad_weights)
    assert_op_gradients_within_twice_the_reference_error(ours, arguments, grad_context, grad_weights)


@pytest.mark.parametrize("score, arguments", [("scaled_dot", {"scale": 30.0}), ("general", {"weight": torch.eye(8) * 30})])
def test_float32_peaked_rows_err_at_most_twice_the_reference(score, arguments):
    """Scores tens apart make a row's softmax nearly one-hot.  The weights and the
    probabilities the backward recomputed, exp(e_j - logsumexp), carried logsumexp's
    rounding (half an ulp of the largest score, ~4e-6 at 100) into every p_j: over these
    12 problems the weights erred up to 120x the reference run's error (general 40x) and
    the values' gradient 16x; the forward now saves each row's shift m and 1 / l, and
    p_j = exp(e_j - m) / l repeats the forward's own rounding.  The score gradient
    p_j (dA_j - r) took r = dC . c from the context, which rounds otherwise than the
    kernel's dA_m: the query and key gradients erred up to 18x and 29x; the row terms
    are now summed from the kernel's own tiles, shifted by the most probable key's dA."""
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        query, keys, values, grad_context, grad_weights = (
            torch.randn(*shape, generator=generator, dtype=torch.float64)
            for shape in ((1, 4, 8), (1, 6, 8), (1, 6, 3), (1, 4, 3), (1, 4, 6))
        )

        def run(backend_name, dtype):
            leaves = [t.to(dtype).requires_grad_() for t in (query, keys, values)]
            with fastattn.backend(backend_name):
                context, weights = fastattn.attention(
                    *leaves, score=score, return_weights=True,
                    **{name: a.to(dtype) if isinstance(a, torch.Tensor) else a for name, a in arguments.items()})
            grads = torch.autograd.grad((context, weights), leaves, (grad_context.to(dtype), grad_weights.to(dtype)))
            return [weights.detach().double(), *(grad.double() for grad in grads)]

        exact, reference_run, kernel_run = run("reference", torch.float64), run("reference", torch.float32), run("triton", torch.float32)
        names = ("weights", "grad_query", "grad_keys", "grad_values")
        for name, truth, theirs, ours in zip(names, exact, reference_run, kernel_run):
            assert (ours - truth).abs().max() <= 2 * (theirs - truth).abs().max(), (seed, name)


def test_float32_peaked_additive_rows_keep_their_gradients():
    """v ten times larger makes the additive rows of these problems one-hot.  The score
    gradient's row term taken as dC . c from the context (float32) left rounding noise
    of 1e-4 in query and key gradients whose true size is 1e-15 (seed 6); summed from the
    kernel's own tiles and shifted by the most probable key's it keeps within twice the
    float32 reference run's error plus 1e-5 of the gradient's size (the kernels' tanh,
    within 4e-7, is summed over 128 features weighted by v)."""
    for seed in range(8):
        arguments, grad_context = peaked_additive_problem(seed, torch.float64)
        arguments[3] = arguments[3] * 10
        exact = input_gradients(torch.ops.fastattn.attention_reference, arguments, grad_context)
        low = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in arguments]
        reference_run = input_gradients(torch.ops.fastattn.attention_reference, low, grad_context.float())
        ours = input_gradients(lambda *args: torch.ops.fastattn.triton_attention_forward(*args, False), low,
                               grad_context.float())
        for name, got, want, theirs in zip(("query", "keys", "values"), ours, exact, reference_run):
            bound = 2 * (theirs.double() - want).abs().max() + 1e-5 * max(1.0, want.abs().max())
            assert (got.double() - want).abs().max() <= bound, (seed, name)


@pytest.mark.parametrize("score", ["dot", "cosine", "additive"])
@pytest.mark.parametrize("queries", [1, 70])  # a decode step (its keys would split) and two query blocks
def test_an_empty_source_gives_what_the_cpu_op_gives(score, queries):
    """S = 0 (reachable through the op; the functions refuse it): zero context and
    weights (N, T, 0), zero gradients; the split count divided by zero before."""
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(*shape, generator=generator) for shape in ((2, queries, 9), (2, 0, 9), (2, 0, 17))]
    vectors = [torch.randn(9, generator=generator) for _ in range(2)] if score == "additive" else [None, None]
    results = []
    for op in (torch.ops.fastattn.triton_attention_forward, torch.ops.fastattn.attention_forward):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        context, weights, _ = op(*leaves, *vectors, score, 1.0, None, None, False, None, None, False, True)
        results.append([context, weights, *torch.autograd.grad(context.sum(), leaves)])
    for got, want in zip(*results):
        assert got.shape == want.shape and torch.equal(got, want)


def test_an_additive_score_with_a_scale_is_refused():
    # e = v . tanh(q + k + bias) has no scale: one given is an error (as in the C++ ops), not applied.
    query, keys, values, v = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 4), torch.randn(8)
    with pytest.raises(ValueError, match=r"scale must be 1 with score 'additive' .* got 0.5"):
        torch.ops.fastattn.triton_attention_forward(query, keys, values, v, None, "additive", 0.5, None, None, False,
                                                    None, None, False, False)


def test_heads_and_image_grid_keys():
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 3, 5, 16, generator=generator)  # (B, heads, T, D)
    keys = torch.randn(2, 3, 4, 5, 16, generator=generator)  # (B, heads, H, W, D) grid
    lengths = torch.tensor([20, 7])  # broadcast over the heads
    results = {}
    for name in ("triton", "reference"):
        with fastattn.backend(name):
            results[name] = fastattn.attention(query, keys, score="dot", lengths=lengths, return_weights=True)
    assert results["triton"][1].shape == (2, 3, 5, 4, 5)
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, **FLOAT32)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the gpu test below covers compiled kernels")
def test_traces_with_fullgraph_under_the_interpreter():
    # The ops stay whole in the graph (the interpreter cannot run Triton's higher-order op);
    # this checks that the Python layers trace without a graph break, forward and backward.
    query, keys, values, parameters, masking = problem("additive", "local_m_gaussian", queries=5)

    def attend(query, keys, values):
        return fastattn.attention(query, keys, values, score="additive", return_weights=True, **parameters, **masking)

    with fastattn.backend("triton"), torch._functorch.config.patch(decompose_custom_triton_ops=False):
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(query, keys, values)
        eager = attend(query, keys, values)
        grads = torch.autograd.grad(compiled[0].sum() + compiled[1].square().sum(), (query, keys, values))
    expected = torch.autograd.grad(eager[0].sum() + eager[1].square().sum(), (query, keys, values))
    for got, want in zip((*compiled, *grads), (*eager, *expected)):
        torch.testing.assert_close(got, want, **FLOAT32)


def fullgraph_problem(score, device):
    """(attend, (query, keys, values)) on ``device``: attention with weights, the score's
    parameters and masks bound, for the torch.compile gpu test."""
    inputs = problem(score, "local_m_gaussian", queries=40, keys_length=70)
    query, keys, values = (x.detach().to(device).requires_grad_() for x in inputs[:3])
    parameters = {name: value.detach().to(device).requires_grad_() for name, value in inputs[3].items()}
    masking = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs[4].items()}

    def attend(query, keys, values):
        return fastattn.attention(query, keys, values, score=score, return_weights=True, **parameters, **masking)

    return attend, (query, keys, values)


def fullgraph_gradients(outputs, inputs):
    context, weights = outputs
    return torch.autograd.grad(context.sum() + weights.square().sum(), inputs)


# One score per kernel family: Inductor compiles each graph, forward and backward, within
# gpu_check.sh's 75 seconds for all the gpu tests (cosine runs scaled_dot's kernels).
FULLGRAPH_GPU_SCORES = ("scaled_dot", "additive")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("score", FULLGRAPH_GPU_SCORES)
def test_gpu_compiles_with_fullgraph(score):
    attend, inputs = fullgraph_problem(score, "cuda")
    with fastattn.backend("triton"):
        eager = attend(*inputs)
        compiled = torch.compile(attend, fullgraph=True)(*inputs)
        grads = fullgraph_gradients(compiled, inputs)
    expected = fullgraph_gradients(eager, inputs)
    for got, want in zip((*compiled, *grads), (*eager, *expected)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_offsets_past_32_bits_inside_a_batch_element_are_refused():
    from fastattn.ops.triton_launch import check_offsets

    # Meta tensors: real shapes and strides, no memory.
    check_offsets(torch.empty(2**20, 2**11, device="meta"), "kernel")  # 2^31 elements: a 64-bit batch offset
    check_offsets(torch.empty(2, 2**16, 2**15, device="meta"), "kernel")  # largest inner offset 2^31 - 1
    with pytest.raises(ValueError, match=r"32-bit offsets.* for attention_forward_kernel"):
        check_offsets(torch.empty(2, 2**16, 2**15 + 1, device="meta"), "attention_forward_kernel")
    with pytest.raises(ValueError, match=r"32-bit offsets"):
        check_offsets(torch.empty(2**31 + 1, device="meta"), "kernel")
    with pytest.raises(ValueError, match=r"32-bit offsets"):  # a view whose key stride spans the whole batch
        check_offsets(torch.empty(2**16, 2, 2**15, device="meta").transpose(0, 1), "kernel")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batch_offsets_past_32_bits(monkeypatch):
    import dataclasses

    from fastattn.ops import triton_attention
    from fastattn.ops.triton_launch import Launcher

    # One config per kernel: tuning over 4 GB of weights would take seconds.
    for name in ("forward", "weights"):
        launcher = triton_attention.LAUNCHERS[name, False]
        single = dataclasses.replace(launcher.configs, tuned=launcher.configs.tuned[:1])
        monkeypatch.setitem(triton_attention.LAUNCHERS, (name, False), Launcher(launcher.kernel, single))
    # weights (N, T, S) of 2^31 + 2^14 elements: the last batch element's lie past 2^31.
    batch, length, features = 2**17 + 1, 128, 16
    generator = torch.Generator(device="cuda").manual_seed(0)
    query, keys, values = (
        torch.randn(batch, length, features, generator=generator, device="cuda", dtype=torch.float16) for _ in range(3)
    )
    with fastattn.backend("triton"):
        context, weights = fastattn.attention(query, keys, values, score="scaled_dot", return_weights=True)
    with fastattn.backend("reference"):
        expected = fastattn.attention(query[-2:], keys[-2:], values[-2:], score="scaled_dot", return_weights=True)
    torch.testing.assert_close(context[-2:], expected[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(weights[-2:], expected[1], rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- arguments the kernels would misread


def _forward_arguments(score="dot"):
    generator = torch.Generator().manual_seed(5)
    query, keys, values = (torch.randn(*shape, generator=generator) for shape in ((2, 3, 8), (2, 5, 8), (2, 5, 4)))
    v = torch.randn(8, generator=generator) if score == "additive" else None
    return dict(query=query, keys=keys, values=values, v=v, bias=None, score=score, scale=1.0, lengths=None,
                key_padding_mask=None, causal=False, window=None, center=None, gaussian=False)


# (description, change to _forward_arguments(score), score, the argument the error names, the error)
MISREAD_ARGUMENTS = [
    ("keys of another feature size", dict(keys=torch.randn(2, 5, 7)), "dot", "keys", ValueError),
    ("keys of another batch", dict(keys=torch.randn(3, 5, 8)), "dot", "keys", ValueError),
    ("values of another length", dict(values=torch.randn(2, 6, 4)), "dot", "values", ValueError),
    ("values of another dtype", dict(values=torch.randn(2, 5, 4, dtype=torch.float64)), "dot", "values", TypeError),
    ("a 2-D query", dict(query=torch.randn(3, 8)), "dot", "query", ValueError),
    ("an unknown score", dict(score="general"), "dot", "score", ValueError),
    ("additive without v", dict(v=None), "additive", "v", ValueError),
    ("v of another size", dict(v=torch.randn(7)), "additive", "v", ValueError),
    ("bias of another size", dict(bias=torch.randn(9)), "additive", "bias", ValueError),
    ("v with the dot score", dict(v=torch.randn(8)), "dot", "v", ValueError),
    ("float lengths", dict(lengths=torch.tensor([1.0, 2.0])), "dot", "lengths", TypeError),
    ("lengths of another batch", dict(lengths=torch.tensor([1, 2, 3])), "dot", "lengths", ValueError),
    ("an integer key padding mask", dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.int64)), "dot",
     "key_padding_mask", TypeError),
    ("a key padding mask of another length", dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), "dot",
     "key_padding_mask", ValueError),
    ("a negative window", dict(window=-1), "dot", "window", ValueError),
    ("center without a window", dict(center=torch.zeros(2, 3)), "dot", "center", ValueError),
    ("center of another length", dict(window=2, center=torch.zeros(2, 4)), "dot", "center", ValueError),
    ("gaussian without a window", dict(gaussian=True), "dot", "gaussian", ValueError),
]


@pytest.mark.parametrize("change, score, name, error", [case[1:] for case in MISREAD_ARGUMENTS],
                         ids=[case[0] for case in MISREAD_ARGUMENTS])
def test_the_triton_ops_refuse_what_the_cpu_op_refuses_naming_the_argument(change, score, name, error):
    """Called directly (fastattn.attention checks its arguments before), the Triton forward
    and backward refuse what their kernels would misread, as the C++ op does, before any
    launch, with the same error: a TypeError for a dtype, a ValueError otherwise."""
    arguments = {**_forward_arguments(score), **change}
    outputs = torch.ops.fastattn.attention_forward(*_forward_arguments(score).values(), True)
    calls = [
        lambda: torch.ops.fastattn.attention_forward(*arguments.values(), True),
        lambda: torch.ops.fastattn.triton_attention_forward(*arguments.values(), True),
        lambda: torch.ops.fastattn.triton_attention_backward(torch.ones_like(outputs[0]), None, *arguments.values(),
                                                             outputs[2]),
    ]
    for call in calls:
        with pytest.raises(error, match=name):
            call()


@pytest.mark.parametrize("name, value", [
    ("grad_context", torch.ones(2, 3, 5)), ("row_stats", torch.ones(2, 3)), ("grad_weights", torch.ones(2, 3, 4)),
])
def test_the_triton_backward_refuses_misshapen_outputs_and_gradients(name, value):
    arguments = _forward_arguments()
    context, weights, row_stats = torch.ops.fastattn.triton_attention_forward(*arguments.values(), True)
    given = dict(grad_context=torch.ones_like(context), grad_weights=torch.ones_like(weights), row_stats=row_stats)
    given[name] = value
    with pytest.raises(ValueError, match=name):
        torch.ops.fastattn.triton_attention_backward(given["grad_context"], given["grad_weights"], *arguments.values(),
                                                     given["row_stats"])


def test_the_triton_ops_read_strided_arguments_as_the_cpu_op_does():
    """Views with other strides (a transposed query and values, every other length, a
    transposed mask and centres): the Triton op's outputs and gradients are the CPU op's."""
    generator = torch.Generator().manual_seed(6)
    query_storage = torch.randn(2, 9, 3, generator=generator)
    values_storage = torch.randn(2, 4, 5, generator=generator)
    keys = torch.randn(2, 5, 9, generator=generator)
    lengths = torch.tensor([5, 0, 3, 9])[::2]
    key_padding_mask = (torch.rand(5, 2, generator=generator) < 0.3).T
    center = torch.rand(3, 2, generator=generator).T * 5
    results = []
    for op in (torch.ops.fastattn.triton_attention_forward, torch.ops.fastattn.attention_forward):
        leaves = [tensor.clone().requires_grad_() for tensor in (query_storage, values_storage)]
        query, values = (leaf.transpose(1, 2) for leaf in leaves)  # feature strides 3 and 5
        assert query.stride(-1) != 1 and values.stride(-1) != 1
        context, weights, _ = op(query, keys, values, None, None, "dot", 1.0, lengths, key_padding_mask, False, 2,
                                 center, True, True)
        projection = (context * torch.arange(context.numel()).view(context.shape).cos()).sum()
        results.append([context, weights, *torch.autograd.grad(projection + weights.sum(), leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_lengths_past_32_bits_or_the_source_are_clamped_to_it():
    """lengths 2^32 + 2 and 2^31 mean every key, -2^32 + 3 none, as lengths 5 and 0 do (and
    as the CPU op reads them): the kernels had cut them to 32 bits (2 keys, no key, 3 keys),
    reachable through the ops and through a lengths tensor written past its checks (.data)."""
    generator = torch.Generator().manual_seed(7)
    query, keys, values = (torch.randn(2, n, 4, generator=generator) for n in (3, 5, 5))
    grad_context = torch.randn(2, 3, 4, generator=generator)

    def run(lengths):
        leaves = [tensor.clone().requires_grad_() for tensor in (query, keys, values)]
        context, weights, _ = torch.ops.fastattn.triton_attention_forward(
            *leaves, None, None, "dot", 1.0, torch.tensor(lengths), None, False, None, None, False, True)
        return [context, weights, *torch.autograd.grad(context, leaves, grad_context)]

    for got, want in zip(run([2**32 + 2, -(2**32) + 3]), run([5, 0]), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(run([2**31, 2]), run([5, 2]), strict=True):
        assert torch.equal(got, want)


def test_float32_long_row_query_gradient_errs_at_most_twice_the_reference():
    """A decoder step over a long source (two query rows, S = 4000 keys): the softmax
    backward's row term was summed over the S / BLOCK_S key blocks in float32, and the
    query's gradient erred up to 3.8x the reference's float32 error here (4-13x at
    S = 20000); the row term and the probability mass are now summed in float64."""
    generator = torch.Generator().manual_seed(2)
    source_length = 4000
    query = torch.randn(1, 2, 8, generator=generator, dtype=torch.float64) / 2
    keys = torch.randn(1, source_length, 8, generator=generator, dtype=torch.float64) / 2
    values = torch.randn(1, source_length, 3, generator=generator, dtype=torch.float64)
    grad_context = torch.randn(1, 2, 3, generator=generator, dtype=torch.float64)
    grad_weights = torch.randn(1, 2, source_length, generator=generator, dtype=torch.float64)

    def query_gradient(backend_name, dtype):
        leaf = query.to(dtype).requires_grad_()
        with fastattn.backend(backend_name):
            context, weights = fastattn.attention(leaf, keys.to(dtype), values.to(dtype), return_weights=True)
        loss = (context * grad_context.to(dtype)).sum() + (weights * grad_weights.to(dtype)).sum()
        return torch.autograd.grad(loss, leaf)[0].double()

    exact = query_gradient("reference", torch.float64)
    reference_error = (query_gradient("reference", torch.float32) - exact).abs().max()
    error = (query_gradient("triton", torch.float32) - exact).abs().max()
    assert error <= 2 * reference_error, (float(error), float(reference_error))


CUDA_GRID_AXIS_LIMIT = 65535  # programs on grid axes 1 and 2 (axis 0: 2^31 - 1)


@pytest.mark.parametrize("score", ["dot", "additive"])
@pytest.mark.parametrize("queries", [1, 20], ids=["decode", "multi_query"])
def test_a_batch_past_the_grid_axis_limit_launches(monkeypatch, score, queries):
    """A GPU grid holds at most 65,535 programs on axes 1 and 2, and a batch of B x heads
    passes that (2,048 sequences of 32 heads); every attention launch had the batch on
    axis 1 or 2, which fails there (the interpreter runs any grid).  The grids of a forward
    with weights and its backward at N = 70,000, for every config the launches could take,
    recorded instead of run."""
    from fastattn.ops.triton_launch import Launcher, RepeatedLaunch

    grids = {}

    def record(launcher, grid, *arguments, **constexprs):
        configs = [*launcher.configs.tuned, launcher.configs.interpreted]
        grids.setdefault(launcher.kernel.fn.__name__, []).extend(grid(dict(config.kwargs)) for config in configs)

    monkeypatch.setattr(Launcher, "__call__", record)
    monkeypatch.setattr(RepeatedLaunch, "__call__",
                        lambda launch, *tensors: launch.launcher(launch.grid, *tensors, *launch.scalars, **launch.constexprs))
    batch = 70_000
    query, keys = torch.zeros(batch, queries, 2, requires_grad=True), torch.zeros(batch, 3, 2, requires_grad=True)
    with fastattn.backend("triton"):
        context, weights = fastattn.attention(query, keys, score=score, return_weights=True,
                                              **score_parameters(score, 2, 2, dtype=torch.float32))
        (context.sum() + weights.sum()).backward()
    assert {"attention_forward_kernel", "attention_weights_kernel", "attention_grad_query_kernel",
            "attention_grad_key_value_kernel"} <= set(grids)
    for kernel, kernel_grids in grids.items():
        for grid in kernel_grids:
            assert all(size <= CUDA_GRID_AXIS_LIMIT for size in grid[1:]), (kernel, grid)
            assert grid[0] >= batch, (kernel, grid)


def test_a_nan_in_one_additive_feature_makes_the_row_nan():
    """A NaN in one feature of the projected query, the one the interpreter's config sends
    through rational_tanh (features 16-31 of each 32), makes its row NaN, as the reference
    does; that tanh's clamps had turned tanh(NaN) into -1 and left the row finite."""
    generator = torch.Generator().manual_seed(2)
    q_proj, k_proj = torch.randn(2, 3, 24, generator=generator), torch.randn(2, 5, 24, generator=generator)
    v, values = torch.randn(24, generator=generator), torch.randn(2, 5, 4, generator=generator)
    q_proj[1, 2, 20] = float("nan")
    outputs = {}
    for name in ("reference", "triton"):
        with fastattn.backend(name):
            outputs[name] = fastattn.additive_attention(q_proj, k_proj, v, values, return_weights=True)
    context, weights = outputs["triton"]
    assert context[1, 2].isnan().all() and weights[1, 2].isnan().all()
    for got, want in zip(outputs["triton"], outputs["reference"]):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, score, key_dim, value_dim, gradients, on_chip", [
    (torch.float32, "scaled_dot", 16, 1024, True, True),
    (torch.float32, "scaled_dot", 16, 2048, True, False),  # the backward's tiles: 263 KB
    (torch.float32, "scaled_dot", 16, 2048, False, True),  # the forward's: 132 KB
    (torch.float32, "scaled_dot", 4096, 16, True, False),
    (torch.float32, "additive", 16, 2048, False, False),
    (torch.float16, "scaled_dot", 4096, 2048, True, True),
    (torch.float16, "scaled_dot", 4096, 4096, True, False),
    (torch.bfloat16, "additive", 16, 4096, True, False),
    (torch.float16, "scaled_dot", 16, 8192, False, False),  # unmeasured past 4096
])
def test_features_past_what_the_kernels_hold_on_chip_run_the_reference(monkeypatch, dtype, score, key_dim, value_dim,
                                                                        gradients, on_chip):
    """The kernels hold a row's D and Dv features whole; past the sizes whose sm_90 compiles
    fit an H100's shared memory a launch fails there (the interpreter has no such limit), so
    those calls run the reference, gradients included, and the others the kernels.  Launches
    recorded, not run."""
    from fastattn.ops.triton_launch import Launcher, RepeatedLaunch

    kernels = []
    monkeypatch.setattr(Launcher, "__call__", lambda launcher, grid, *a, **k: kernels.append(launcher.kernel.fn.__name__))
    monkeypatch.setattr(RepeatedLaunch, "__call__",
                        lambda launch, *tensors: launch.launcher(launch.grid, *tensors, *launch.scalars, **launch.constexprs))
    query = torch.zeros(1, 2, key_dim if score == "scaled_dot" else 8, dtype=dtype, requires_grad=gradients)
    keys = torch.zeros(1, 3, key_dim if score == "scaled_dot" else 8, dtype=dtype)
    values = torch.ones(1, 3, value_dim, dtype=dtype)
    parameters = {} if score == "scaled_dot" else {
        name: parameter.to(dtype) for name, parameter in score_parameters(score, 8, 8, attention_dim=key_dim).items()}
    with fastattn.backend("triton"):
        context = fastattn.attention(query, keys, values, score=score, **parameters)
        if gradients:
            context.sum().backward()
    assert bool(kernels) == on_chip, kernels
    if on_chip:
        assert "attention_forward_kernel" in kernels and ("attention_grad_key_value_kernel" in kernels) == gradients
    else:  # the reference's context: the mean of the values (equal scores)
        torch.testing.assert_close(context, torch.ones(1, 2, value_dim, dtype=dtype))
        assert not gradients or query.grad.isfinite().all()
