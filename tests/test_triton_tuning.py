"""How the Triton kernels are launched and tuned: every config list well formed, one
config and no tuning under the interpreter, every kernel safe to rerun as autotuning
trials do (the atomically accumulated gradients re-zeroed in between), one tuner per
power-of-two size bucket and constexpr specialization, the register/shared-memory and
FMA pruning, the dots' precision, and the tanh of the additive score
(``rational_tanh``'s bound on a dense grid).

Under Triton's interpreter on CPU tensors without a GPU; the ``gpu`` tests check the
autotuned launches against the reference and the hardware tanh's error.
"""

import dataclasses
import math

import pytest
import torch
import triton
import triton.language as tl

import fastattn
from fastattn import backends
from fastattn.kernels.attention_forward import attention_forward_kernel
from fastattn.kernels.attention_tiles import RATIONAL_TANH_MAX_ERROR, rational_tanh, sfu_tanh
from fastattn.ops import triton_attention, triton_configs, triton_hard, triton_launch, triton_recurrent
from fastattn.ops.triton_launch import INTERPRETED, SMALLEST_BLOCK, KernelConfigs, Launcher
from tests import hard_outputs_problems
from tests.test_triton_attention import FLOAT32, assert_matches, problem, run
from tests.test_triton_recurrent import cell_problem, run_cell

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=str(backends.unavailable_reason("triton"))
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAUNCHERS = {
    **{f"attention {name} {'additive' if additive else 'dot'}": launcher
       for (name, additive), launcher in triton_attention.LAUNCHERS.items()},
    "attention combine": triton_attention.COMBINE_LAUNCHER,
    **{f"hard attention {name}": launcher for name, launcher in triton_hard.LAUNCHERS.items()},
    **{f"recurrent {name}": launcher for name, launcher in triton_recurrent.LAUNCHERS.items()},
}
# Kernels whose blocks are tl.dot operands (16 rows and columns at least).
DOT_BLOCKS = ("BLOCK_T", "BLOCK_S", "BLOCK_K")
# Launchers whose blocks hold one query row (BLOCK_T = 1, its values summed without tl.dot).
ONE_QUERY_ROW = (
    *(f"attention {name} {score}" for name in ("decode", "decode weights") for score in ("dot", "additive")),
    "attention decode grad_query additive", "attention decode grad_key_value additive",
)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_config_lists_are_well_formed(name):
    launcher = LAUNCHERS[name]
    configs, arguments = launcher.configs, set(launcher.kernel.arg_names)
    assert configs.tuned and len(set(map(str, configs.tuned))) == len(configs.tuned)  # no duplicates
    assert set(configs.key) <= arguments and set(configs.reset_to_zero) <= arguments
    one_row = {"BLOCK_T": 1} if name in ONE_QUERY_ROW else {}
    assert configs.interpreted.kwargs == dict.fromkeys(configs.interpreted.kwargs, SMALLEST_BLOCK) | one_row
    step = name.startswith("recurrent") and "step" in name
    for config in configs.tuned:
        assert config.kwargs.keys() == configs.interpreted.kwargs.keys() and set(config.kwargs) <= arguments
        assert _is_power_of_two(config.num_warps) and config.num_warps <= 16 and config.num_stages >= 1
        assert config.kwargs.items() >= one_row.items()
        for block, value in config.kwargs.items():
            if block in one_row:
                continue
            if block == "BLOCK_D_POLY":
                assert value == 0 or _is_power_of_two(value)
            else:
                assert _is_power_of_two(value), (block, value)
            if block in DOT_BLOCKS or (step and block.startswith("BLOCK")):
                assert value >= SMALLEST_BLOCK, (block, value)


def test_key_splits_never_cut_a_key_block():
    for configs in (triton_configs.FORWARD_DOT, triton_configs.FORWARD_ADDITIVE, triton_configs.FORWARD_DOT_DECODE,
                    triton_configs.FORWARD_ADDITIVE_DECODE):
        in_use = [configs.interpreted] if INTERPRETED else configs.tuned
        assert all(triton_configs.SPLIT_GRANULE % config.kwargs["BLOCK_S"] == 0 for config in in_use)
        largest = max(config.kwargs["BLOCK_S"] for config in configs.tuned)
        assert all(largest % config.kwargs["BLOCK_S"] == 0 for config in configs.tuned)


def test_only_the_gradients_added_into_are_reset():
    resets = {name: launcher.configs.reset_to_zero for name, launcher in LAUNCHERS.items() if launcher.configs.reset_to_zero}
    atomic = ("GRAD_Q", "GRAD_K", "GRAD_VA")
    assert resets == {"attention grad_key_value additive": atomic, "attention decode grad_key_value additive": atomic,
                      "hard attention values_backward": ("GRAD_VALUES",)}


def test_a_config_list_naming_a_missing_argument_is_refused():
    bad = KernelConfigs(interpreted=triton.Config({}), tuned=(triton.Config({}),), key=("T", "LENGTH"))
    with pytest.raises(ValueError, match=r"key names \['LENGTH'\]"):
        Launcher(attention_forward_kernel, bad)


def test_one_tuner_per_size_bucket_and_specialization_with_its_configs_and_resets():
    launcher = Launcher(attention_forward_kernel, triton_configs.FORWARD_DOT)
    arguments = dict.fromkeys(attention_forward_kernel.arg_names)

    def tuner(precision="ieee", **sizes):
        arguments.update(sizes)
        return launcher.tuner_for(list(arguments.values()), {"SCORE_KIND": 0, "DOT_PRECISION": precision})

    first = tuner(T=1, S=300, D=64, DV=64)
    assert tuner(T=1, S=500, D=64, DV=64) is first  # 300 and 500 share the 512 bucket
    assert tuner(T=1, S=600, D=64, DV=64) is not first
    assert tuner("tf32", T=1, S=300, D=64, DV=64) is not first  # TF32 dots tune on their own
    assert len(launcher.tuners) == 3 and list(first.configs) == list(triton_configs.FORWARD_DOT.tuned)
    gradients = triton_attention.LAUNCHERS["grad_key_value", True]
    additive_tuner = Launcher(gradients.kernel, gradients.configs).tuner_for(
        [1] * len(gradients.kernel.arg_names), {}
    )
    assert additive_tuner.reset_to_zero == ["GRAD_Q", "GRAD_K", "GRAD_VA"]


def test_an_untuned_launch_takes_the_first_config_the_prune_keeps(monkeypatch):
    monkeypatch.setenv("FASTATTN_TRITON_AUTOTUNE", "0")
    assert not triton_launch.autotuning()
    seen = []

    def drop_the_first(configs, named_args, **kwargs):
        seen.append((named_args["S"], kwargs))
        return configs[1:]

    configs = dataclasses.replace(triton_configs.FORWARD_DOT, prune=drop_the_first)
    launcher = Launcher(attention_forward_kernel, configs)
    arguments = {**dict.fromkeys(attention_forward_kernel.arg_names), "T": 1, "S": 300, "D": 64, "DV": 64}
    assert launcher.untuned_config(list(arguments.values()), {"SCORE": 0}) is configs.tuned[1]
    assert seen == [(300, {"SCORE": 0})] and not launcher.tuners
    # Memoized on the constexprs and the tensors' dtypes (a prune reads nothing else):
    # other sizes reuse the choice, another constexpr or dtype prunes again.
    longer = list({**arguments, "S": 700}.values())
    assert launcher.untuned_config(longer, {"SCORE": 0}) is configs.tuned[1] and len(seen) == 1
    launcher.untuned_config(longer, {"SCORE": 1})
    with_query = list({**arguments, "Q": torch.empty(1, dtype=torch.float16)}.values())
    launcher.untuned_config(with_query, {"SCORE": 1})
    assert seen[1:] == [(700, {"SCORE": 1}), (300, {"SCORE": 1})]
    unpruned = Launcher(attention_forward_kernel, dataclasses.replace(configs, prune=None))
    assert unpruned.untuned_config(list(arguments.values()), {}) is configs.tuned[0]
    monkeypatch.setenv("FASTATTN_TRITON_AUTOTUNE", "1")
    assert triton_launch.autotuning()


def test_pruning_keeps_configs_that_fit_and_at_least_one():
    prune, tuned = triton_configs.FORWARD_DOT.prune, list(triton_configs.FORWARD_DOT.tuned)
    query = torch.empty(1, dtype=torch.bfloat16)
    assert prune(tuned, {"Q": query, "DV": 64}, BLOCK_DV=64, BLOCK_D=64) == tuned
    wide = prune(tuned, {"Q": query, "DV": 1024}, BLOCK_DV=1024, BLOCK_D=64)
    assert 0 < len(wide) < len(tuned)
    for config in wide:
        assert config.kwargs["BLOCK_T"] * 1024 / (32 * config.num_warps) <= triton_configs.REGISTER_BUDGET
    assert len(prune(tuned, {"Q": query, "DV": 2**16}, BLOCK_DV=2**16, BLOCK_D=64)) == 1


def _tiles(configs) -> list[tuple[int, int, int]]:
    return [(config.kwargs["BLOCK_T"], config.kwargs["BLOCK_S"], config.num_warps) for config in configs]


def test_ieee_float32_pruning_also_bounds_the_multiply_adds_of_its_dots():
    # IEEE float32 dots lower to FMA loops holding their operands in registers: at D = Dv
    # = 64 the key/value gradients' four dots take 4 * 64 * BLOCK_T * BLOCK_S multiply-adds
    # a step, which fit FMA_BUDGET a thread only for the 16-row tiles of 4 warps and the
    # 16x16 tile of 8 warps.
    configs = triton_configs.GRAD_KEY_VALUE_DOT
    sizes = dict(BLOCK_D=64, BLOCK_DQ=64, BLOCK_DV=64)
    single = torch.empty(1)
    ieee = configs.prune(list(configs.tuned), {"Q": single}, DOT_PRECISION="ieee", **sizes)
    assert _tiles(ieee) == [(16, 32, 4), (16, 16, 4), (16, 16, 8)]
    for config in ieee:
        assert 4 * 64 * config.kwargs["BLOCK_T"] * config.kwargs["BLOCK_S"] / (32 * config.num_warps) <= triton_configs.FMA_BUDGET
    # TF32 float32 and 16-bit dots run on the tensor cores: no such bound.
    assert configs.prune(list(configs.tuned), {"Q": single}, DOT_PRECISION="tf32", **sizes) == list(configs.tuned)
    half = torch.empty(1, dtype=torch.bfloat16)
    assert configs.prune(list(configs.tuned), {"Q": half}, DOT_PRECISION="tf32", **sizes) == list(configs.tuned)
    # At D = Dv = 128 dK and dV take 256 * BLOCK_S / (32 * warps) registers a thread: the
    # backward budget keeps the tiles at 64 or fewer (128 spilled in most of them).
    wider = configs.prune(list(configs.tuned), {"Q": half}, DOT_PRECISION="tf32", BLOCK_D=128, BLOCK_DQ=128, BLOCK_DV=128)
    assert _tiles(wider) == [(128, 64, 8), (32, 32, 4), (16, 32, 4), (16, 16, 4), (16, 16, 8)]
    assert all(256 * s / (32 * w) <= triton_configs.BACKWARD_REGISTER_BUDGET for _, s, w in _tiles(wider))
    # None fits at D = Dv = 1024: the smallest multiply-add count a thread, then the fewest registers.
    wide = configs.prune(list(configs.tuned), {"Q": single}, DOT_PRECISION="ieee", BLOCK_D=128, BLOCK_DQ=1024, BLOCK_DV=1024)
    assert _tiles(wide) == [(16, 16, 8)]


def test_ieee_float32_additive_backward_keeps_one_score_element_a_thread():
    for configs in (triton_configs.GRAD_QUERY_ADDITIVE, triton_configs.GRAD_KEY_VALUE_ADDITIVE):
        ieee = configs.prune(list(configs.tuned), {"Q": torch.empty(1)}, DOT_PRECISION="ieee")
        assert _tiles(ieee) == [(16, 16, 8), (16, 16, 8)]
        assert configs.prune(list(configs.tuned), {"Q": torch.empty(1)}, DOT_PRECISION="tf32") == list(configs.tuned)


def test_when_no_config_fits_the_least_shared_memory_wins():
    # The additive forward's value tiles at Dv = 1024 in float32 (TF32 dots stage them in
    # shared memory) pass the budget in every config: the narrowest key block is the one
    # sm_90 can still launch, whatever its registers.
    configs = triton_configs.FORWARD_ADDITIVE
    kept = configs.prune(list(configs.tuned), {"Q": torch.empty(1)}, DOT_PRECISION="tf32", BLOCK_DV=1024)
    assert len(kept) == 1 and kept[0].kwargs["BLOCK_S"] == min(config.kwargs["BLOCK_S"] for config in configs.tuned)


@pytest.mark.parametrize("setting,expected", [("ieee", "ieee"), ("tf32", "tf32")])
def test_float32_dots_follow_torchs_matmul_precision(monkeypatch, setting, expected):
    launched = []
    original = triton_launch.run_kernel

    def recording(kernel, grid, *arguments, **constexprs):
        if "DOT_PRECISION" in constexprs:
            launched.append((kernel.__name__, constexprs["DOT_PRECISION"]))
        return original(kernel, grid, *arguments, **constexprs)

    monkeypatch.setattr(triton_launch, "run_kernel", recording)
    with triton_launch.float32_matmul_precision(setting):
        run("triton", "scaled_dot", *problem("scaled_dot", "lengths", queries=5))
        x, h, c, weights = cell_problem(4, 3)
        run_cell("triton", "lstm", x, h, c, weights)
    kernels = {name for name, _ in launched}
    assert {"attention_forward_kernel", "attention_grad_key_value_kernel", "lstm_step_kernel"} <= kernels
    assert {precision for _, precision in launched} == {expected}
    assert triton_launch.dot_precision(torch.bfloat16) == "tf32"  # the tensor cores' own input type


@pytest.mark.parametrize("setting", ["ieee", "tf32"])
def test_the_precision_setting_leaves_torchs_own_matmuls_working(setting):
    """torch checks, before each cuBLAS float32 matmul, that its legacy and new precision
    settings agree (torch._C._get_cublas_allow_tf32 is that check); float32_matmul_precision
    sets both, and puts back the one before."""
    before = torch.get_float32_matmul_precision()
    with triton_launch.float32_matmul_precision(setting):
        assert torch._C._get_cublas_allow_tf32() == (setting == "tf32")
        assert triton_launch.dot_precision(torch.float32) == setting
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter's launch path")
def test_the_interpreter_runs_one_config_and_never_tunes(monkeypatch):
    launched = []
    original = triton_launch.run_kernel

    def recording(kernel, grid, *arguments, **constexprs):
        launched.append((kernel, {name: value for name, value in constexprs.items() if name.startswith("BLOCK")}))
        return original(kernel, grid, *arguments, **constexprs)

    monkeypatch.setattr(triton_launch, "run_kernel", recording)
    inputs = problem("additive", "local_p", queries=5)  # the centers' gradient: the grad_query kernel runs too
    run("triton", "additive", *inputs)
    assert {kernel.__name__ for kernel, _ in launched} >= {
        "attention_forward_kernel", "attention_weights_kernel", "attention_grad_query_kernel",
        "attention_grad_key_value_kernel",
    }
    tuned_blocks = {"BLOCK_T", "BLOCK_S", "BLOCK_D", "BLOCK_D_POLY"}
    for _, blocks in launched:
        assert all(blocks[name] == SMALLEST_BLOCK for name in tuned_blocks & blocks.keys())
    for launcher in LAUNCHERS.values():
        assert launcher.configs_in_use() == [launcher.configs.interpreted] and not launcher.tuners


def test_the_additive_backward_takes_grad_query_from_the_key_value_kernel(monkeypatch):
    """Three tanh per pair and feature for every gradient: the additive backward runs the
    query kernel once, for the row terms (and the local-p centers' gradient), and the
    key-value kernel, which adds dQ' too; the dot score runs the query kernel again for dQ."""
    launched = []
    original = triton_launch.run_kernel

    def recording(kernel, grid, *arguments, **constexprs):
        launched.append((kernel.__name__, constexprs.get("ROW_TERMS_GIVEN")))
        return original(kernel, grid, *arguments, **constexprs)

    monkeypatch.setattr(triton_launch, "run_kernel", recording)
    for score, mode in (("additive", "lengths"), ("additive", "local_p"), ("scaled_dot", "lengths")):
        launched.clear()
        run("triton", score, *problem(score, mode, queries=5))
        query_launches = [(name, given) for name, given in launched if name == "attention_grad_query_kernel"]
        expected = [("attention_grad_query_kernel", False)]
        if score != "additive":
            expected.append(("attention_grad_query_kernel", True))
        assert query_launches == expected, (score, mode, launched)
        assert ("attention_grad_key_value_kernel", None) in launched, (score, mode)


@pytest.fixture
def every_launch_twice(monkeypatch):
    """Run every kernel as the autotuner's trials do: launch, zero the ``reset_to_zero``
    buffers, launch again; a kernel that accumulates without a reset doubles its output.
    The attention kernels that the dot and the additive launchers share take the resets
    of the launcher of their SCORE_KIND."""
    resets = {(launcher.kernel, additive): launcher.configs.reset_to_zero
              for (_, additive), launcher in triton_attention.LAUNCHERS.items()}
    for launcher in LAUNCHERS.values():
        resets.setdefault((launcher.kernel, None), launcher.configs.reset_to_zero)
    original = triton_launch.run_kernel

    def twice(kernel, grid, *arguments, **constexprs):
        original(kernel, grid, *arguments, **constexprs)
        named = dict(zip(kernel.arg_names, arguments))
        additive = constexprs.get("SCORE_KIND") == triton_attention.ADDITIVE if (kernel, True) in resets else None
        for name in resets[kernel, additive]:
            named[name].zero_()
        original(kernel, grid, *arguments, **constexprs)

    monkeypatch.setattr(triton_launch, "run_kernel", twice)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's launch path")
@pytest.mark.parametrize("score,mode", [("additive", "local_m_gaussian"), ("scaled_dot", "lengths")])
def test_attention_kernels_are_safe_to_rerun_as_trials(every_launch_twice, score, mode):
    inputs = problem(score, mode, queries=5)
    assert_matches(run("triton", score, *inputs), run("reference", score, *inputs), FLOAT32)
    step = problem(score, mode, queries=1, keys_length=37)  # split keys and the combine step
    step = (step[0][:, 0].detach().requires_grad_(), *step[1:])
    assert_matches(run("triton", score, *step), run("reference", score, *step), FLOAT32)
    indices = []
    for name in ("triton", "reference"):
        with fastattn.backend(name):
            indices.append(fastattn.hard_attention(*inputs[:3], score=score, sample=False, **inputs[3], **inputs[4])[1])
    assert torch.equal(*indices)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's launch path")
def test_hard_attention_kernels_are_safe_to_rerun_as_trials(every_launch_twice):
    """The value gradient adds each query's share into its sums: five queries on one row."""
    weights, index, values = hard_outputs_problems.problem((3, 5, 7, 4))
    index[:] = index[:, :1]
    grads = hard_outputs_problems.gradients_of_outputs(weights, index, values)
    got = torch.ops.fastattn.triton_hard_attention_backward(*grads, weights, index)
    expected = hard_outputs_problems.outputs_and_gradients(hard_outputs_problems.reference, weights, index, values, *grads)
    for ours, want in zip(got, expected[2:]):
        torch.testing.assert_close(ours, want, equal_nan=True)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's launch path")
@pytest.mark.parametrize("kind,batch", [("lstm", 3), ("lstm", 37), ("gru", 3)])
def test_recurrent_kernels_are_safe_to_rerun_as_trials(every_launch_twice, kind, batch):
    x, h, c, weights = cell_problem(4 if kind == "lstm" else 3, batch)
    actual, expected = run_cell("triton", kind, x, h, c, weights), run_cell("reference", kind, x, h, c, weights)
    for got, want in zip((*actual[0], *actual[1]), (*expected[0], *expected[1])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- tanh


@triton.jit
def _tanh_kernel(X, OUT, size, HARDWARE: tl.constexpr, POLYNOMIAL: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offsets, mask=offsets < size, other=0.0)
    if POLYNOMIAL:
        y = rational_tanh(x)
    else:
        y = sfu_tanh(x, HARDWARE)
    tl.store(OUT + offsets, y, mask=offsets < size)


def _tanh_error(polynomial: bool, hardware: bool = False) -> tuple[float, float]:
    """(max absolute error, max error relative to |tanh|) on a dense grid of [-12, 12],
    tiny magnitudes and the clamp points, against float64."""
    dense = torch.linspace(-12.0, 12.0, 2**21 + 1, dtype=torch.float64)
    tiny = torch.logspace(-30, 0, 4097, dtype=torch.float64)
    x = torch.cat([dense, tiny, -tiny, torch.tensor([0.0, 8.75, -8.75, 1e30, -1e30], dtype=torch.float64)])
    x32 = x.float().to(DEVICE)
    out = torch.empty_like(x32)
    block = 2**16
    _tanh_kernel[(triton.cdiv(x32.numel(), block),)](x32, out, x32.numel(), HARDWARE=hardware, POLYNOMIAL=polynomial, BLOCK=block)
    exact = torch.tanh(x32.double().cpu())
    error = (out.double().cpu() - exact).abs()
    return error.max().item(), (error / exact.abs().clamp_min(1e-30))[x != 0].max().item()


def test_rational_tanh_within_its_stated_bound_on_a_dense_grid():
    absolute, relative = _tanh_error(polynomial=True)
    assert absolute <= RATIONAL_TANH_MAX_ERROR, absolute
    assert relative <= 1e-6, relative  # no loss of relative accuracy near 0


@pytest.mark.parametrize("polynomial", [True, False], ids=["rational", "sfu"])
def test_tanh_passes_a_nan_through(polynomial):
    """tanh(NaN) is NaN, as torch's: rational_tanh's clamps, a plain min/max, took their
    other operand and gave -1, so a NaN feature on the FMA units vanished from the score."""
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.5], device=DEVICE)
    out = torch.empty_like(x)
    _tanh_kernel[(1,)](x, out, x.numel(), HARDWARE=False, POLYNOMIAL=polynomial, BLOCK=4)
    assert out[0].isnan() and out[1:].cpu().tolist() == pytest.approx([1.0, -1.0, math.tanh(0.5)], abs=1e-6)


def test_stable_tanh_is_as_accurate():
    absolute, _ = _tanh_error(polynomial=False)
    assert absolute <= RATIONAL_TANH_MAX_ERROR, absolute


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_hardware_tanh_error():
    absolute, _ = _tanh_error(polynomial=False, hardware=True)
    assert absolute <= 2**-10, absolute  # tanh.approx.f32: about 2^-11 relative


# The autotuned gpu test's scores, and its source lengths: one size bucket (T 64, S 256, D 32), tuned once.
AUTOTUNED_GPU_SCORES = ("additive", "scaled_dot")
AUTOTUNED_SOURCE_LENGTHS = (200, 180)


def autotuned_problem(score, source_length, device):
    """The autotuned gpu test's float32 inputs on ``device``: (query, keys, values, parameters, masking)."""

    def moved(tensor):
        return tensor.detach().to(device).requires_grad_() if tensor.is_floating_point() else tensor.to(device)

    query, keys, values, parameters, masking = problem(score, "lengths", queries=33, keys_length=source_length)
    parameters = {name: moved(value) for name, value in parameters.items()}
    return (*map(moved, (query, keys, values)), parameters, {name: moved(value) for name, value in masking.items()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("score", AUTOTUNED_GPU_SCORES)
def test_gpu_autotuned_launches_match_the_reference(score, monkeypatch):
    monkeypatch.setenv("FASTATTN_TRITON_AUTOTUNE", "1")  # gpu_check.sh turns tuning off elsewhere
    # float32: the additive tanh goes through stable_tanh and, in some configs, rational_tanh.
    additive = score == "additive"
    names = ("forward", "weights", "grad_query", "grad_key_value")
    for name in names:  # none tuned by an earlier test, no choice of one remembered
        monkeypatch.setattr(triton_attention.LAUNCHERS[name, additive], "tuners", {})
        monkeypatch.setattr(triton_attention.LAUNCHERS[name, additive], "tuned", {})
    for source_length in AUTOTUNED_SOURCE_LENGTHS:
        case = autotuned_problem(score, source_length, "cuda")
        assert_matches(run("triton", score, *case), run("reference", score, *case), {"rtol": 1e-4, "atol": 1e-4})
    for name in names:
        launcher = triton_attention.LAUNCHERS[name, additive]
        tuners = list(launcher.tuners.values())
        assert len(tuners) == 1 and next(iter(launcher.tuners))[:3] == (64, 256, 32), (name, list(launcher.tuners))
        assert tuners[0].best_config in launcher.configs.tuned, name


def test_a_tuned_launch_takes_the_tuners_choice_straight_to_the_kernel_once_it_has_one(monkeypatch):
    """The first launch of a bucket and dtypes runs its triton.autotune; the next ones launch
    the kernel with the config it chose (``best_config``) and the options it would pass."""
    monkeypatch.setenv("FASTATTN_TRITON_AUTOTUNE", "1")
    chosen = triton_configs.FORWARD_DOT.tuned[2]

    class Tuner:  # stands in for triton.autotune(kernel), which needs a GPU to time configs
        best_config = None

        def run(self):
            self.best_config = chosen

    tuners, launches = [], []

    def recording(kernel, grid, *arguments, **constexprs):
        if isinstance(kernel, Tuner):
            kernel.run()
        launches.append((kernel, grid, constexprs))

    def tuner_for(launcher, arguments, constexprs):
        tuners.append(Tuner())
        return tuners[-1]

    monkeypatch.setattr(triton_launch, "INTERPRETED", False)  # the GPU's launch path
    monkeypatch.setattr(triton_launch, "run_kernel", recording)
    monkeypatch.setattr(Launcher, "tuner_for", tuner_for)
    launcher = Launcher(attention_forward_kernel, triton_configs.FORWARD_DOT)
    arguments = {**dict.fromkeys(attention_forward_kernel.arg_names), "T": 1, "S": 300, "D": 64, "DV": 64,
                 "Q": torch.empty(1)}

    def launch(**changes):
        launcher(lambda meta: (meta["BLOCK_T"],), *{**arguments, **changes}.values(), SCORE=0)

    launch()
    launch(S=500)  # the same bucket (512)
    launch(Q=torch.empty(1, dtype=torch.float16))  # another dtype: Triton's tuner keys on it
    assert len(tuners) == 2 and [kernel for kernel, _, _ in launches] == [tuners[0], attention_forward_kernel, tuners[1]]
    _, grid, constexprs = launches[1]
    assert grid == (chosen.kwargs["BLOCK_T"],) and constexprs == {"SCORE": 0, **chosen.all_kwargs()}
