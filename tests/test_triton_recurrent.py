"""The Triton LSTM/GRU kernels (backend "triton") against the reference: cell outputs
and gradients (a step is one launch, both GEMMs in the kernel) in one batch block and
across several, with either bias or none, layers (their input projection in one launch,
then one launch a step; backward: a launch and a GEMM a step) with lengths and both
directions, and opcheck on every op.  Under Triton's interpreter on CPU
tensors without a GPU; the ``gpu`` test runs realistic sizes in float16/bfloat16."""

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import backends
from fastattn.functional.recurrent import run_layers
from fastattn.ops import triton_launch, triton_recurrent

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=str(backends.unavailable_reason("triton"))
)
INPUT, HIDDEN = 7, 19  # two 16-wide hidden blocks
FLOAT32 = {"rtol": 1e-5, "atol": 1e-5}


def cell_problem(gates, batch, dtype=torch.float32, device="cpu", hidden=HIDDEN, inputs=INPUT, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        tensor = torch.randn(*shape, generator=generator, dtype=torch.float64) / shape[-1] ** 0.25
        return tensor.to(device=device, dtype=dtype).requires_grad_()

    x, h, c = leaf(batch, inputs), leaf(batch, hidden), leaf(batch, hidden)
    weights = (leaf(gates * hidden, inputs), leaf(gates * hidden, hidden), leaf(gates * hidden), leaf(gates * hidden))
    return x, h, c, weights


def run_cell(backend_name, kind, x, h, c, weights):
    with fastattn.backend(backend_name):
        if kind == "lstm":
            outputs = fastattn.lstm_cell(x, (h, c), *weights)
        else:
            outputs = (fastattn.gru_cell(x, h, *weights),)
    leaves = [t for t in ((x, h, c, *weights) if kind == "lstm" else (x, h, *weights)) if t is not None]
    return outputs, torch.autograd.grad(random_projection(outputs), leaves)


def random_projection(outputs):
    """A random linear function of ``outputs``, the same for every dtype and device."""
    generator = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o)).sum() for o in outputs)


# 3 rows: one batch block; 37: three of the interpreter's 16-row blocks, the last partial.
BATCHES = [3, 37]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch", BATCHES)
def test_cells_match_the_reference(kind, batch):
    x, h, c, weights = cell_problem(4 if kind == "lstm" else 3, batch)
    actual, expected = run_cell("triton", kind, x, h, c, weights), run_cell("reference", kind, x, h, c, weights)
    for got, want in zip((*actual[0], *actual[1]), (*expected[0], *expected[1])):
        torch.testing.assert_close(got, want, **FLOAT32)


def test_lstm_cell_without_biases_and_unbatched():
    x, h, c, weights = cell_problem(4, 1)
    results = {}
    for name in ("triton", "reference"):
        with fastattn.backend(name):
            results[name] = fastattn.lstm_cell(x[0], (h[0], c[0]), weights[0], weights[1])
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, **FLOAT32)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("biases", ["input", "hidden", "none"])
def test_fused_steps_with_either_bias_or_none_match_the_reference(kind, biases):
    x, h, c, (w_ih, w_hh, b_ih, b_hh) = cell_problem(4 if kind == "lstm" else 3, 5)
    weights = (w_ih, w_hh, b_ih if biases == "input" else None, b_hh if biases == "hidden" else None)
    actual, expected = run_cell("triton", kind, x, h, c, weights), run_cell("reference", kind, x, h, c, weights)
    for got, want in zip((*actual[0], *actual[1]), (*expected[0], *expected[1])):
        torch.testing.assert_close(got, want, **FLOAT32)


class AtenOps(TorchDispatchMode):
    """The names of the aten ops run inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


TORCH_GEMM_OPS = {"mm", "addmm", "linear", "matmul", "add", "bmm", "baddbmm"}


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton LSTM/GRU kernels launched, in order (each launch, also those
    of a layer's loop that skip the launcher's checks, calls what ``_traceable`` returns)."""
    names = []
    traceable = triton_launch._traceable

    def counted(kernel):
        class Counted:
            def __getitem__(self, grid):
                run = traceable(kernel)[grid]
                return lambda *a, **k: (names.append(triton_launch._kernel_name(kernel)), run(*a, **k))

        return Counted()

    monkeypatch.setattr(triton_launch, "_traceable", counted)
    return names


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch", BATCHES)
def test_a_step_is_one_launch_and_no_torch_gemm(kind, batch, launches):
    x, h, c, weights = cell_problem(4 if kind == "lstm" else 3, batch)
    with AtenOps() as ops, fastattn.backend("triton"), torch.no_grad():
        fastattn.lstm_cell(x, (h, c), *weights) if kind == "lstm" else fastattn.gru_cell(x, h, *weights)
    assert launches == [f"{kind}_step_kernel"]
    assert not TORCH_GEMM_OPS & set(ops.names), ops.names


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_layer_projects_its_inputs_once_then_launches_once_a_step(kind, launches):
    steps, gates = 4, 4 if kind == "lstm" else 3
    x, h, c, weights = cell_problem(gates, 3)
    sequence = x.detach().unsqueeze(0).expand(steps, -1, -1).contiguous()
    layer = triton_recurrent.lstm_layer if kind == "lstm" else triton_recurrent.gru_layer
    states = (h, c) if kind == "lstm" else (h,)
    with AtenOps() as ops, torch.no_grad():
        layer(sequence, *states, *weights)
    assert launches == ["input_projection_kernel"] + [f"{kind}_step_kernel"] * steps
    assert not TORCH_GEMM_OPS & set(ops.names), ops.names


def test_a_layers_steps_after_the_first_skip_the_launchers_checks(launches, monkeypatch):
    """RepeatedLaunch: the first step through run_kernel (offset checks, config), the rest
    straight to the kernel, with the same outputs as the reference (the layer tests)."""
    checked = []
    run_kernel = triton_launch.run_kernel
    monkeypatch.setattr(triton_launch, "run_kernel",
                        lambda kernel, *a, **k: (checked.append(triton_launch._kernel_name(kernel)), run_kernel(kernel, *a, **k)))
    x, h, c, weights = cell_problem(4, 3)
    with torch.no_grad():
        triton_recurrent.lstm_layer(x.detach().unsqueeze(0).expand(5, -1, -1).contiguous(), h, c, *weights)
    assert launches == ["input_projection_kernel"] + ["lstm_step_kernel"] * 5
    assert checked == ["input_projection_kernel", "lstm_step_kernel"]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_layer_backward_launches_once_and_multiplies_once_a_step(kind, launches):
    """Each step: the pointwise kernel and h's GEMM through W_hh; then W_hh's gradient and
    the input projection's (x's and W_ih's) in one GEMM each over all steps."""
    steps, gates = 4, 4 if kind == "lstm" else 3
    x, h, c, weights = cell_problem(gates, 3)
    sequence = x.detach().unsqueeze(0).expand(steps, -1, -1).contiguous().requires_grad_()
    layer = triton_recurrent.lstm_layer if kind == "lstm" else triton_recurrent.gru_layer
    states = (h, c) if kind == "lstm" else (h,)
    output = layer(sequence, *states, *weights)[0]
    launches.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        torch.autograd.grad(output.sum(), [sequence, *states, *weights])
    assert launches == [f"{kind}_pointwise_backward_kernel"] * steps
    gemms = sorted(event.name for event in profile.events() if event.name in ("aten::mm", "aten::addmm", "aten::bmm"))
    assert gemms == ["aten::addmm"] * steps + ["aten::mm"] * 3, gemms


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_float16_step_keeps_its_pre_activations_in_float32(kind):
    """x W_ih^T and h W_hh^T of about 40 that cancel: rounded to float16 (0.016 apart there)
    they would move h' by more than its own rounding; summed in float32 they do not, in a
    cell step or in a layer's (its input projection kept in float32)."""
    gates = 4 if kind == "lstm" else 3
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, HIDDEN, generator=generator, dtype=torch.float64).half()
    w_ih = (torch.randn(gates * HIDDEN, HIDDEN, generator=generator, dtype=torch.float64) * 10).half()
    b_ih, b_hh = (torch.randn(gates * HIDDEN, generator=generator, dtype=torch.float64).half() for _ in range(2))
    c = torch.randn(5, HIDDEN, generator=generator, dtype=torch.float64).half()
    assert (x.double() @ w_ih.double().T).abs().max() > 40
    inputs = (x, x, c, w_ih, -w_ih, b_ih, b_hh) if kind == "lstm" else (x, x, w_ih, -w_ih, b_ih, b_hh)
    cell = triton_recurrent.lstm_cell if kind == "lstm" else triton_recurrent.gru_cell
    exact = fastattn.reference.lstm_cell if kind == "lstm" else fastattn.reference.gru_cell
    layer = triton_recurrent.lstm_layer if kind == "lstm" else triton_recurrent.gru_layer
    ours, want = cell(*inputs), exact(*(t.double() for t in inputs))
    ours, want = (ours, want) if kind == "lstm" else ((ours,), (want,))
    ours_in_a_layer = layer(x.unsqueeze(0), *inputs[1:])[0][0]  # the same step through the layer's projection
    for got, expected in zip((*ours, ours_in_a_layer), (*want, want[0])):
        assert (got.double() - expected).abs().max() <= torch.finfo(torch.float16).eps * expected.abs().max().clamp_min(1)


@pytest.mark.parametrize("layer_op", ["lstm_layer", "gru_layer"])
def test_bidirectional_layers_with_lengths(layer_op):
    gates = 4 if layer_op == "lstm_layer" else 3
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, INPUT, generator=generator, requires_grad=True)
    states = [torch.randn(2, 3, HIDDEN, generator=generator) for _ in range(2 if gates == 4 else 1)]
    weights, leaves = [], [x]
    for _ in range(2):
        direction = [torch.randn(gates * HIDDEN, size, generator=generator) * 0.3 for size in (INPUT, HIDDEN)]
        direction += [torch.randn(gates * HIDDEN, generator=generator) * 0.3 for _ in range(2)]
        leaves += [weight.requires_grad_() for weight in direction]
        weights.append(tuple(direction) + ((None,) if gates == 4 else ()))
    lengths = torch.tensor([5, 2, 4])
    results = {}
    for name in ("triton", "reference"):
        output, finals = run_layers(layer_op, x, states, [weights], lengths=lengths, backend=name)
        results[name] = (output, *finals, *torch.autograd.grad(output.square().sum(), leaves))
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, **FLOAT32)


@pytest.mark.parametrize("layer_op", ["lstm_layer", "gru_layer"])
def test_an_empty_batch_gives_empty_outputs_and_gradients(layer_op):
    """Batch 0 (torch's modules take it): the projection (0 rows) and the steps launch no
    work; outputs and gradients come back empty, of their shapes."""
    gates = 4 if layer_op == "lstm_layer" else 3
    x = torch.randn(3, 0, INPUT, requires_grad=True)
    states = [torch.randn(1, 0, HIDDEN) for _ in range(2 if gates == 4 else 1)]
    weights = [torch.randn(gates * HIDDEN, size, requires_grad=True) for size in (INPUT, HIDDEN)]
    output, finals = run_layers(layer_op, x, states, [[(*weights, None, None) + ((None,) if gates == 4 else ())]],
                                backend="triton")
    assert output.shape == (3, 0, HIDDEN) and all(final.shape == (1, 0, HIDDEN) for final in finals)
    gradients = torch.autograd.grad(output.sum(), [x, *weights])
    assert [tuple(g.shape) for g in gradients] == [tuple(t.shape) for t in (x, *weights)]
    assert all(torch.count_nonzero(g) == 0 for g in gradients)


def layer_problem(gates, steps=4, batch=3):
    """The arguments of a layer op: projected (T, B, gates*H) float32, h0, c0, w_hh, b_hh, lengths."""
    generator = torch.Generator().manual_seed(4)

    def leaf(*shape):
        return (torch.randn(*shape, generator=generator) / shape[-1] ** 0.25).requires_grad_()

    lengths = torch.tensor([steps, 1, steps - 1][:batch])
    return leaf(steps, batch, gates * HIDDEN), leaf(batch, HIDDEN), leaf(batch, HIDDEN), \
        leaf(gates * HIDDEN, HIDDEN), leaf(gates * HIDDEN), lengths


def _layer_backward_arguments(kind, lengths, reverse):
    """The arguments of triton_<kind>_layer_backward after a forward (gradients random)."""
    projected, h0, c0, w_hh, b_hh, _ = (t.detach() for t in layer_problem(4 if kind == "lstm" else 3))
    if kind == "lstm":
        h_states, c_states, saved = torch.ops.fastattn.triton_lstm_layer(
            projected, h0, c0, w_hh, b_hh, lengths, reverse
        )
        return torch.randn_like(h_states), torch.randn_like(c_states), c_states, saved, w_hh, lengths, reverse
    h_states, saved = torch.ops.fastattn.triton_gru_layer(projected, h0, w_hh, b_hh, lengths, reverse)
    return torch.randn_like(h_states), h_states, saved, w_hh, lengths, reverse


def test_opcheck_every_recurrent_op():
    x, h, c, (w_ih, w_hh, b_ih, b_hh) = cell_problem(4, 3)
    _, c_next, saved = torch.ops.fastattn.triton_lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    projected, h0, c0, layer_w_hh, layer_b_hh, lengths = layer_problem(4)
    samples = [
        (torch.ops.fastattn.triton_input_projection.default, (x, w_ih, b_ih)),
        (torch.ops.fastattn.triton_input_projection.default, (x, w_ih, None)),
        (torch.ops.fastattn.triton_lstm_step.default, (x, h, c, w_ih, w_hh, b_ih, b_hh)),
        (torch.ops.fastattn.triton_lstm_step.default, (x, h, c, w_ih, w_hh, None, b_hh)),
        (
            torch.ops.fastattn.triton_lstm_pointwise_backward.default,
            (torch.randn_like(h), torch.randn_like(c), c.detach(), c_next.detach(), saved.detach()),
        ),
        (torch.ops.fastattn.triton_lstm_layer.default, (projected, h0, c0, layer_w_hh, layer_b_hh, None, False)),
        (torch.ops.fastattn.triton_lstm_layer.default, (projected, h0, c0, layer_w_hh, None, lengths, True)),
        (torch.ops.fastattn.triton_lstm_layer_backward.default, _layer_backward_arguments("lstm", lengths, False)),
        (torch.ops.fastattn.triton_lstm_layer_backward.default, _layer_backward_arguments("lstm", None, True)),
    ]
    x, h, _, (w_ih, w_hh, b_ih, b_hh) = cell_problem(3, 3)
    _, gru_saved = torch.ops.fastattn.triton_gru_step(x, h, w_ih, w_hh, b_ih, b_hh)
    projected, h0, _, layer_w_hh, layer_b_hh, lengths = layer_problem(3)
    samples += [
        (torch.ops.fastattn.triton_gru_step.default, (x, h, w_ih, w_hh, b_ih, b_hh)),
        (torch.ops.fastattn.triton_gru_step.default, (x, h, w_ih, w_hh, b_ih, None)),
        (torch.ops.fastattn.triton_gru_pointwise_backward.default, (torch.randn_like(h), h.detach(), gru_saved.detach())),
        (torch.ops.fastattn.triton_gru_layer.default, (projected, h0, layer_w_hh, layer_b_hh, lengths, False)),
        (torch.ops.fastattn.triton_gru_layer.default, (projected, h0, layer_w_hh, None, None, True)),
        (torch.ops.fastattn.triton_gru_layer_backward.default, _layer_backward_arguments("gru", lengths, True)),
        (torch.ops.fastattn.triton_gru_layer_backward.default, _layer_backward_arguments("gru", None, False)),
    ]
    from tests.test_triton_attention import opcheck

    for op, arguments in samples:
        opcheck(op, arguments)


def _step_arguments(kind):
    x, h, c, (w_ih, w_hh, b_ih, b_hh) = cell_problem(4 if kind == "lstm" else 3, 3)
    arguments = dict(x=x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    if kind == "gru":
        del arguments["c"]
    return {name: tensor.detach() for name, tensor in arguments.items()}


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("name, change, error", [
    ("x", lambda t: t[:2], ValueError), ("h", lambda t: t[:, :-1], ValueError),
    ("w_ih", lambda t: t[:, :-1], ValueError), ("w_hh", lambda t: t[1:], ValueError),
    ("b_ih", lambda t: t[1:], ValueError), ("b_hh", lambda t: t.double(), TypeError),
    ("w_hh", lambda t: t.double(), TypeError),
])
def test_the_triton_cell_ops_refuse_what_their_kernels_would_misread(kind, name, change, error):
    """Called directly (fastattn.lstm_cell / gru_cell check their arguments before), the
    step ops refuse a shape or dtype the kernel would misread, naming the argument."""
    arguments = _step_arguments(kind)
    arguments[name] = change(arguments[name])
    op = torch.ops.fastattn.triton_lstm_step if kind == "lstm" else torch.ops.fastattn.triton_gru_step
    with pytest.raises(error, match=f"{name} must have"):
        op(*arguments.values())


def test_the_triton_backward_and_projection_ops_refuse_what_their_kernels_would_misread():
    x, h, c, (w_ih, w_hh, b_ih, b_hh) = (t.detach() if isinstance(t, torch.Tensor) else t
                                         for t in cell_problem(4, 3))
    _, _, saved = torch.ops.fastattn.triton_lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(TypeError, match="saved must have torch.float32"):
        torch.ops.fastattn.triton_lstm_pointwise_backward(h, c, c, c, saved.double())
    with pytest.raises(ValueError, match="grad_h_next must have shape"):
        torch.ops.fastattn.triton_gru_pointwise_backward(h[1:], h, saved)
    with pytest.raises(ValueError, match=r"w must have shape \(\*, 7\)"):
        torch.ops.fastattn.triton_input_projection(x, w_hh, b_ih)
    with pytest.raises(ValueError, match="b must have shape"):
        torch.ops.fastattn.triton_input_projection(x, w_ih, b_ih[1:])


def test_the_triton_layer_ops_refuse_what_their_kernels_would_misread():
    projected, h0, c0, w_hh, b_hh, lengths = (t.detach() for t in layer_problem(4))
    layer = torch.ops.fastattn.triton_lstm_layer
    with pytest.raises(TypeError, match="projected must have torch.float32"):
        layer(projected.half(), h0, c0, w_hh, b_hh, lengths, False)
    with pytest.raises(ValueError, match=r"projected must have shape \(4, 3, 76\)"):
        layer(projected[..., 1:], h0, c0, w_hh, b_hh, lengths, False)
    with pytest.raises(ValueError, match="projected must have 3 dimensions"):
        layer(projected[0], h0, c0, w_hh, b_hh, lengths, False)
    with pytest.raises(ValueError, match=r"c0 must have shape \(3, 19\)"):
        layer(projected, h0, c0[1:], w_hh, b_hh, lengths, False)
    with pytest.raises(TypeError, match="lengths must have an integer dtype"):
        layer(projected, h0, c0, w_hh, b_hh, lengths.float(), False)
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        layer(projected, h0, c0, w_hh, b_hh, lengths[1:], False)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(76, 19\)"):
        layer(projected, h0, c0, w_hh[1:], b_hh, lengths, False)
    arguments = list(_layer_backward_arguments("lstm", lengths, False))
    with pytest.raises(ValueError, match=r"grad_h_states must have shape \(5, 3, 19\)"):
        torch.ops.fastattn.triton_lstm_layer_backward(arguments[0][1:], *arguments[1:])
    with pytest.raises(ValueError, match="saved must have 3 dimensions"):
        torch.ops.fastattn.triton_lstm_layer_backward(*arguments[:3], arguments[3][0], *arguments[4:])
    arguments = list(_layer_backward_arguments("gru", lengths, False))
    with pytest.raises(TypeError, match="h_states must have torch.float32"):
        torch.ops.fastattn.triton_gru_layer_backward(arguments[0], arguments[1].double(), *arguments[2:])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_the_triton_step_ops_read_strided_arguments(kind):
    """Transposed weights and states, every other bias element: the results of contiguous copies."""
    arguments = _step_arguments(kind)
    strided = {name: tensor.T.contiguous().T if tensor.dim() == 2 else tensor.repeat_interleave(2)[::2]
               for name, tensor in arguments.items()}
    assert all(not tensor.is_contiguous() for tensor in strided.values())
    op = torch.ops.fastattn.triton_lstm_step if kind == "lstm" else torch.ops.fastattn.triton_gru_step
    for got, want in zip(op(*strided.values()), op(*arguments.values())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# (kind, batch) of the float16/bfloat16 gpu test, at H=1024 and 512 inputs: the step at the
# GPU target's batch (64) and at a larger one (256).
GPU_CELL_CASES = [("lstm", 64), ("lstm", 256), ("gru", 64), ("gru", 256)]


def gpu_cell_problem(kind, batch, dtype, device):
    return cell_problem(4 if kind == "lstm" else 3, batch, dtype, device, 1024, 512)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,batch", GPU_CELL_CASES)
def test_gpu_low_precision_within_twice_the_reference_error(dtype, kind, batch):
    exact = run_cell("reference", kind, *gpu_cell_problem(kind, batch, torch.float64, "cuda"))
    ours = run_cell("triton", kind, *gpu_cell_problem(kind, batch, dtype, "cuda"))
    theirs = run_cell("reference", kind, *gpu_cell_problem(kind, batch, dtype, "cuda"))
    assert_within_twice_the_reference_error(exact, ours, theirs)


def assert_within_twice_the_reference_error(exact, ours, theirs):
    """Each of our (outputs, gradients) off the float64 ones by at most twice the reference's
    run in the same dtype, plus one rounding of the largest entry and 1e-5 (a reference run
    may round an output almost exactly where ours takes its one rounding)."""
    for want, got, reference_result in zip((*exact[0], *exact[1]), (*ours[0], *ours[1]), (*theirs[0], *theirs[1])):
        our_error = (got.double() - want).abs().max().item()
        reference_error = (reference_result.double() - want).abs().max().item()
        rounding = torch.finfo(got.dtype).eps * want.abs().max().item()
        assert our_error <= 2 * reference_error + rounding + 1e-5, (our_error, reference_error)


GPU_LAYER_STEPS = 16  # the float16/bfloat16 gpu layer test: T=16, B=64, I=512, H=1024, with lengths


def gpu_layer_problem(kind, dtype, device, steps=GPU_LAYER_STEPS, batch=64, inputs=512, hidden=1024):
    """x (T, B, I), the initial states (1, B, H), the weights and lengths in 1..T."""
    generator = torch.Generator().manual_seed(5)
    gates = 4 if kind == "lstm" else 3

    def leaf(*shape):
        tensor = torch.randn(*shape, generator=generator, dtype=torch.float64) / shape[-1] ** 0.25
        return tensor.to(device=device, dtype=dtype).requires_grad_()

    x = leaf(steps, batch, inputs)
    states = [leaf(1, batch, hidden) for _ in range(2 if kind == "lstm" else 1)]
    weights = [leaf(gates * hidden, inputs), leaf(gates * hidden, hidden), leaf(gates * hidden), leaf(gates * hidden)]
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator).to(device)
    return kind, x, states, weights, lengths


def run_layer(backend_name, kind, x, states, weights, lengths):
    """A layer's outputs (output, final states) and the gradients of a random function of them."""
    layer_weights = (*weights, None) if kind == "lstm" else tuple(weights)
    output, finals = run_layers(f"{kind}_layer", x, states, [[layer_weights]], lengths=lengths, backend=backend_name)
    outputs = (output, *finals)
    return outputs, torch.autograd.grad(random_projection(outputs), [x, *states, *weights])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gpu_layers_low_precision_within_twice_the_reference_error(dtype, kind):
    exact = run_layer("reference", *gpu_layer_problem(kind, torch.float64, "cuda"))
    ours = run_layer("triton", *gpu_layer_problem(kind, dtype, "cuda"))
    theirs = run_layer("reference", *gpu_layer_problem(kind, dtype, "cuda"))
    assert_within_twice_the_reference_error(exact, ours, theirs)


def test_float64_runs_the_reference_and_says_so():
    x, h, c, weights = cell_problem(4, 3, dtype=torch.float64)
    actual, expected = run_cell("triton", "lstm", x, h, c, weights), run_cell("reference", "lstm", x, h, c, weights)
    for got, want in zip((*actual[0], *actual[1]), (*expected[0], *expected[1])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "float64" in fastattn.info()["backends"]["triton"]["note"]
