"""The Triton LSTM/GRU kernels (backend "triton") against the reference: cell outputs
and gradients on both LSTM paths (the small-batch step with the recurrent GEMM in the
kernel, and cuBLAS GEMMs + the fused pointwise kernel), GRU cells, layers with lengths
and both directions, and opcheck on every op.  Under Triton's interpreter on CPU
tensors without a GPU; the ``gpu`` test runs realistic sizes in float16/bfloat16."""

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.functional.recurrent import run_layers
from fastattn.ops import triton_recurrent

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
    generator = torch.Generator().manual_seed(1)
    projection = sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o)).sum() for o in outputs)
    leaves = (x, h, c, *weights) if kind == "lstm" else (x, h, *weights)
    return outputs, torch.autograd.grad(projection, leaves)


@pytest.mark.parametrize(
    "kind,batch",
    [("lstm", 3), ("lstm", triton_recurrent.FUSED_STEP_MAX_BATCH + 3), ("gru", 3), ("gru", triton_recurrent.FUSED_STEP_MAX_BATCH + 3)],
    ids=["lstm-fused-step", "lstm-pointwise", "gru-fused-step", "gru-pointwise"],
)
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


@pytest.mark.parametrize("layer_op", ["lstm_layer", "gru_layer"])
def test_bidirectional_layers_with_lengths(layer_op):
    gates = 4 if layer_op == "lstm_layer" else 3
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, INPUT, generator=generator, requires_grad=True)
    states = [torch.randn(2, 3, HIDDEN, generator=generator) for _ in range(2 if gates == 4 else 1)]
    weights = []
    for _ in range(2):
        direction = [torch.randn(gates * HIDDEN, size, generator=generator) * 0.3 for size in (INPUT, HIDDEN)]
        direction += [torch.randn(gates * HIDDEN, generator=generator) * 0.3 for _ in range(2)]
        weights.append(tuple(direction) + ((None,) if gates == 4 else ()))
    lengths = torch.tensor([5, 2, 4])
    results = {}
    for name in ("triton", "reference"):
        output, finals = run_layers(layer_op, x, states, [weights], lengths=lengths, backend=name)
        results[name] = (output, *finals, torch.autograd.grad(output.square().sum(), x)[0])
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, **FLOAT32)


def test_opcheck_every_recurrent_op():
    x, h, c, (w_ih, w_hh, b_ih, b_hh) = cell_problem(4, 3)
    gates_x = (x @ w_ih.T + b_ih).detach().requires_grad_()
    gates_h = (h @ w_hh.T + b_hh).detach().requires_grad_()
    h, c, w_hh = (t.detach().requires_grad_() for t in (h, c, w_hh))
    h_next, c_next, saved = torch.ops.fastattn.triton_lstm_pointwise(gates_x, gates_h, c)
    samples = [
        (torch.ops.fastattn.triton_lstm_pointwise.default, (gates_x, gates_h, c)),
        (torch.ops.fastattn.triton_lstm_step.default, (gates_x, h, c, w_hh)),
        (
            torch.ops.fastattn.triton_lstm_pointwise_backward.default,
            (torch.randn_like(h), torch.randn_like(c), c.detach(), c_next.detach(), saved.detach()),
        ),
    ]
    x, h, _, (w_ih, w_hh, b_ih, b_hh) = cell_problem(3, 3)
    gru_x = (x @ w_ih.T + b_ih).detach().requires_grad_()
    gru_h = (h @ w_hh.T + b_hh).detach().requires_grad_()
    h = h.detach().requires_grad_()
    _, gru_saved = torch.ops.fastattn.triton_gru_pointwise(gru_x, gru_h, h)
    gru_w_hh, gru_b_hh = (t.detach().requires_grad_() for t in (w_hh, b_hh))
    samples += [
        (torch.ops.fastattn.triton_gru_pointwise.default, (gru_x, gru_h, h)),
        (torch.ops.fastattn.triton_gru_step.default, (gru_x, h, gru_w_hh, gru_b_hh)),
        (torch.ops.fastattn.triton_gru_step.default, (gru_x, h, gru_w_hh, None)),
        (torch.ops.fastattn.triton_gru_pointwise_backward.default, (torch.randn_like(h), h.detach(), gru_saved.detach())),
    ]
    from tests.test_triton_attention import opcheck

    for op, arguments in samples:
        opcheck(op, arguments)


# (kind, batch) of the float16/bfloat16 gpu test, at H=1024 and 512 inputs: the fused step
# (batch 64) and the GEMMs with the pointwise kernels (batch 256).
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
    for want, got, reference_result in zip((*exact[0], *exact[1]), (*ours[0], *ours[1]), (*theirs[0], *theirs[1])):
        our_error = (got.double() - want).abs().max().item()
        reference_error = (reference_result.double() - want).abs().max().item()
        assert our_error <= 2 * reference_error + 1e-5, (our_error, reference_error)


def test_float64_runs_the_reference_and_says_so():
    x, h, c, weights = cell_problem(4, 3, dtype=torch.float64)
    actual, expected = run_cell("triton", "lstm", x, h, c, weights), run_cell("reference", "lstm", x, h, c, weights)
    for got, want in zip((*actual[0], *actual[1]), (*expected[0], *expected[1])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "float64" in fastattn.info()["backends"]["triton"]["note"]
