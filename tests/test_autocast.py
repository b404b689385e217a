"""fastattn inside torch.autocast, as torch's own layers run there: the modules and
functions take float16 / bfloat16 / float32 tensors mixed (a Linear's bfloat16 output
next to float32 parameters and encoder states) on every backend, their outputs within
twice the error of the reference run under the same autocast, and their gradients
reaching the float32 parameters.  The ops' autocast kernels (csrc/autocast.cpp) compute
in the autocast dtype on the CPU and on CUDA (seen on fake CUDA tensors here; the gpu
test runs them)."""

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import backends
from tests.problems import SCORES, key_dim_for

BACKENDS = [name for name in ("reference", "cpu", "triton") if backends.unavailable_reason(name) is None]
needs_extension = pytest.mark.skipif(backends.unavailable_reason("cpu") is not None, reason="needs the C++ extension")
LOW = torch.bfloat16
# Triton's interpreter multiplies bfloat16 tl.dot operands wrongly (test_triton_attention):
# there the Triton backend runs float16 autocast only; the gpu tests cover bfloat16.
INTERPRETED_TRITON = "triton" in BACKENDS and not torch.cuda.is_available()
BACKEND_DTYPES = [
    (name, dtype) for name in BACKENDS for dtype in (torch.float16, torch.bfloat16)
    if not (name == "triton" and INTERPRETED_TRITON and dtype == torch.bfloat16)
]


def _inputs(kind, score, low):
    """(module, inputs, run): ``run(module, *inputs)`` gives the outputs compared.  The
    first input is in ``low`` (what an autocast Linear hands on), the others float32."""
    generator = torch.Generator().manual_seed(3)

    def tensor(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    torch.manual_seed(4)
    if kind == "attention":
        module = fastattn.nn.Attention(8, key_dim_for(score, 8, 6), score=score, max_source_len=7)
        return module, (tensor(3, 4, 8, dtype=low), tensor(3, 5, key_dim_for(score, 8, 6))), lambda m, q, k: list(m(q, k))
    if kind == "hard_attention":  # a query projection (the parameters), argmax positions
        module = torch.nn.Linear(8, 8)

        def attend(m, q, k, values):
            context, _, log_prob, weights = fastattn.hard_attention(m(q), k, values, score="dot", sample=False)
            return [context, log_prob, weights]

        return module, (tensor(3, 4, 8, dtype=low), tensor(3, 5, 8), tensor(3, 5, 6)), attend
    if kind in ("lstm_cell", "gru_cell"):
        module = (fastattn.nn.LSTMCell if kind == "lstm_cell" else fastattn.nn.GRUCell)(8, 6)
        if kind == "lstm_cell":
            return module, (tensor(3, 8, dtype=low), tensor(3, 6), tensor(3, 6)), lambda m, x, h, c: list(m(x, (h, c)))
        return module, (tensor(3, 8, dtype=low), tensor(3, 6)), lambda m, x, h: [m(x, h)]
    if kind in ("lstm", "gru"):
        module = (fastattn.nn.LSTM if kind == "lstm" else fastattn.nn.GRU)(8, 6, num_layers=2, bidirectional=True)
        return module, (tensor(4, 3, 8, dtype=low),), lambda m, x: [m(x)[0]]
    cell = kind.split("_")[1]
    module = fastattn.nn.AttentionDecoderCell(8, 6, 5, score=score, cell=cell, max_source_len=7)

    def decode(m, y, keys):
        cache, state, outputs = m.precompute(keys), None, []
        for step in range(2):
            output, state, weights = m(y[step], state, cache)
            outputs += [output, weights]
        return outputs

    return module, (tensor(2, 3, 8, dtype=low), tensor(3, 5, 5)), decode


def _run(kind, score, backend_name, low, autocast, device="cpu"):
    """Outputs, and the gradients of the parameters and inputs, under autocast to ``low``
    (float64 copies of them without autocast when ``autocast`` is False: the exact run)."""
    module, inputs, run = _inputs(kind, score, low)
    module, inputs = module.to(device), [x.to(device) for x in inputs]
    if not autocast:
        module, inputs = copy.deepcopy(module).double(), [x.double() for x in inputs]
    inputs = [x.requires_grad_() for x in inputs]
    with fastattn.backend(backend_name), torch.autocast(device, dtype=low, enabled=autocast):
        outputs = run(module, *inputs)
    sum(output.double().sum() for output in outputs).backward()
    leaves = [*module.named_parameters(), *((f"input {index}", x) for index, x in enumerate(inputs))]
    return outputs, {name: (leaf.dtype, leaf.grad) for name, leaf in leaves}


CASES = [("attention", score) for score in SCORES] + [("hard_attention", None)] + [
    (kind, None) for kind in ("lstm_cell", "gru_cell", "lstm", "gru")
] + [("decoder_lstm", "additive"), ("decoder_gru", "general"), ("decoder_lstm", "location")]


def _check_against_the_reference(kind, score, backend_name, low, device="cpu"):
    """The outputs in the autocast dtype on every backend and within twice the error of the
    reference's run under the same autocast (each backend takes every input in that dtype,
    a float32 LSTM cell state included), and the gradients near the exact ones in their
    leaves' dtypes.  On the reference backend itself what can fail is the dtypes and the
    gradients (its outputs are the run they are compared with)."""
    exact, exact_grads = _run(kind, score, "reference", low, autocast=False, device=device)
    reference, _ = _run(kind, score, "reference", low, autocast=True, device=device)
    got, grads = _run(kind, score, backend_name, low, autocast=True, device=device)
    for index, (output, in_reference, want) in enumerate(zip(got, reference, exact)):
        output, in_reference, want = output.detach(), in_reference.detach(), want.detach()
        assert output.dtype == in_reference.dtype == low and output.shape == want.shape, (index, output.dtype)
        error = float((output.double() - want).abs().max())
        reference_error = float((in_reference.double() - want).abs().max())
        assert error <= 2 * reference_error, (index, error, reference_error)
    for name, (dtype, grad) in grads.items():  # in each leaf's dtype, near the exact ones
        want = exact_grads[name][1]
        assert grad is not None and grad.dtype == dtype, name
        assert (grad.double() - want).abs().max() <= 0.05 * want.abs().max() + 1e-3, name


@pytest.mark.parametrize("backend_name, low", BACKEND_DTYPES)
@pytest.mark.parametrize("kind, score", CASES)
def test_mixed_dtypes_under_autocast_within_twice_the_references_error(kind, score, backend_name, low):
    _check_against_the_reference(kind, score, backend_name, low)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or backends.unavailable_reason("cuda") is not None,
    reason="needs a CUDA device and fastattn built with CUDA kernels",
)
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind, score", [("attention", "general"), ("lstm", None), ("decoder_lstm", "additive")])
def test_gpu_cuda_kernels_under_autocast_run_in_its_dtype(kind, score, low):
    _check_against_the_reference(kind, score, "cuda", low, device="cuda")


@needs_extension
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_the_ops_compute_in_the_autocast_dtype_under_cpu_autocast(low):
    """The CPU autocast kernels, as torch's for SDPA and the RNNs: every floating input
    cast to the autocast dtype, so the outputs are those of the op on inputs in that dtype
    (the CPU kernels take it natively; it used to be float32); gradients flow back through
    the casts to the float32 parameter."""
    generator = torch.Generator().manual_seed(8)
    other = torch.float16 if low == torch.bfloat16 else torch.bfloat16
    query = torch.randn(2, 3, 6, generator=generator).to(other)
    keys = torch.randn(2, 5, 6, generator=generator, requires_grad=True)
    values = torch.randn(2, 5, 4, generator=generator)
    attention_arguments = ["dot", 0.5, torch.tensor([5, 2]), None, False, None, None, False, True]
    with torch.autocast("cpu", dtype=low):
        outputs = torch.ops.fastattn.attention_forward(query, keys, values, None, None, *attention_arguments)
    expected = torch.ops.fastattn.attention_forward(query.to(low), keys.to(low), values.to(low), None, None,
                                                    *attention_arguments)
    assert [output.dtype for output in outputs] == [low, low, torch.float32]  # logsumexp: the accumulation dtype
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    outputs[0].float().sum().backward()
    assert keys.grad.dtype == torch.float32 and keys.grad.abs().max() > 0

    x, h, c = (torch.randn(3, 6, generator=generator).to(other) for _ in range(3))
    w_ih, w_hh = torch.randn(24, 6, generator=generator), torch.randn(24, 6, generator=generator)
    sequence, h0 = torch.randn(4, 3, 6, generator=generator).to(other), torch.randn(3, 6, generator=generator)
    weights, index = torch.rand(2, 3, 5, generator=generator).to(other), torch.tensor([[0, 4, 2], [1, 1, 3]])
    calls = [
        (torch.ops.fastattn.hard_attention_outputs, (weights, index, values)),
        (torch.ops.fastattn.lstm_cell_forward, (x, h, c, w_ih, w_hh, None, None)),
        (torch.ops.fastattn.gru_cell_forward, (x, h, w_ih[:18], w_hh[:18], None, None)),
        (torch.ops.fastattn.lstm_layer_forward, (sequence, h0, h0, w_ih, w_hh, None, None, None, False)),
        (torch.ops.fastattn.gru_layer_forward, (sequence, h0, w_ih[:18], w_hh[:18], None, None, None, False)),
    ]
    for op, arguments in calls:
        with torch.autocast("cpu", dtype=low):
            outputs = op(*arguments)
        in_low = [a.to(low) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in arguments]
        for got, want in zip(outputs, op(*in_low)):
            assert got.dtype == low, op
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_ops_compute_in_the_autocast_dtype_under_cuda_autocast(dtype):
    """The CUDA autocast kernels, on fake CUDA tensors (no GPU needed): every floating
    input cast to the autocast dtype, so mixed dtypes reach the kernels as one."""
    mode = FakeTensorMode()

    def fake(*shape, dtype=torch.float32):
        return FakeTensor(mode, torch.empty(*shape, dtype=dtype, device="meta"), torch.device("cuda", 0))

    query, keys, values = fake(2, 3, 8), fake(2, 5, 8, dtype=torch.float16), fake(2, 5, 4, dtype=torch.bfloat16)
    x, h, c, w_ih, w_hh = fake(2, 8, dtype=torch.bfloat16), fake(2, 8), fake(2, 8), fake(32, 8), fake(32, 8)
    w_ih_gru, w_hh_gru, sequence = fake(24, 8), fake(24, 8), fake(4, 2, 8, dtype=torch.float16)
    enabled, autocast_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with mode:
            outputs = [
                *torch.ops.fastattn.attention_forward(query, keys, values, None, None, "dot", 1.0, None, None, False,
                                                      None, None, False, True)[:2],
                *torch.ops.fastattn.hard_attention_outputs(fake(2, 3, 5, dtype=torch.float16), fake(2, 3, dtype=torch.int64),
                                                           values),
                *torch.ops.fastattn.lstm_cell_forward(x, h, c, w_ih, w_hh, None, None),
                *torch.ops.fastattn.gru_cell_forward(x, h, w_ih_gru, w_hh_gru, None, None),
                *torch.ops.fastattn.lstm_layer_forward(sequence, h, c, w_ih, w_hh, None, None, None, False),
                *torch.ops.fastattn.gru_layer_forward(sequence, h, w_ih_gru, w_hh_gru, None, None, None, False),
            ]
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", autocast_dtype)
    assert [output.dtype for output in outputs] == [dtype] * len(outputs)


@needs_extension
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_compiles_with_fullgraph_under_autocast(backend_name):
    """An autocast Linear feeding attention and a cell, under torch.compile(fullgraph=True):
    what eager mode gives, and gradients (the reference's autocast casts trace too)."""
    torch.manual_seed(5)
    linear, attention, cell = torch.nn.Linear(8, 8), fastattn.nn.Attention(8, 8, score="additive"), fastattn.nn.LSTMCell(8, 8)

    def step(x, keys):
        context, _ = attention(linear(x), keys)
        return context, cell(context[:, 0])[0]

    x, keys = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    torch._dynamo.reset()
    with fastattn.backend(backend_name), torch.autocast("cpu", dtype=LOW):
        eager, compiled = step(x, keys), torch.compile(step, fullgraph=True)(x, keys)
    for got, want in zip(compiled, eager):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
    sum(output.float().sum() for output in compiled).backward()
    assert cell.weight_ih.grad.dtype == torch.float32 and cell.weight_ih.grad.abs().max() > 0


class _ParameterCasts(TorchDispatchMode):
    """Counts the casts (aten._to_copy) of the tensors whose storages are in ``pointers``."""

    def __init__(self, pointers):
        super().__init__()
        self.pointers, self.count = pointers, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
            self.count += 1
        return func(*args, **(kwargs or {}))


@needs_extension
def test_autocast_cast_goes_through_the_autocast_cache():
    """torch.ops.fastattn.autocast_cast: a float32 parameter cast once per autocast region
    (the same tensor again within it, a new cast in the next region), a tensor that is no
    leaf cast every time; the tensor itself outside autocast, already in the autocast
    dtype or in float64; gradients reach the parameter through the cast; opcheck."""
    parameter, activation = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3) * 2
    with torch.autocast("cpu", dtype=LOW):
        first, again = torch.ops.fastattn.autocast_cast(parameter), torch.ops.fastattn.autocast_cast(parameter)
        assert first.dtype == LOW and first is again
        assert torch.ops.fastattn.autocast_cast(activation) is not torch.ops.fastattn.autocast_cast(activation)
    with torch.autocast("cpu", dtype=LOW):
        assert torch.ops.fastattn.autocast_cast(parameter) is not first
        for kept in (first.detach(), parameter.detach().double()):
            assert torch.ops.fastattn.autocast_cast(kept) is kept
    assert torch.ops.fastattn.autocast_cast(parameter) is parameter
    torch.testing.assert_close(first, parameter.detach().to(LOW), rtol=0, atol=0)
    first.float().sum().backward()
    torch.testing.assert_close(parameter.grad, torch.ones(4, 3), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fastattn.autocast_cast.default, (activation,))
    with torch.autocast("cpu", dtype=LOW):
        torch.library.opcheck(torch.ops.fastattn.autocast_cast.default, (parameter,))


@needs_extension
@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")
def test_the_triton_backend_casts_each_parameter_once_per_autocast_region():
    """Under torch.autocast the Triton backend's functions cast a float32 parameter once
    per region (torch's autocast cache, as torch's own layers do), not at every decoder
    step: the second step casts none of the cell's and attention's parameters, a new
    region casts them again; the steps' outputs are those of casting every time."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low = torch.float16 if INTERPRETED_TRITON else LOW
    torch.manual_seed(6)
    decoder = fastattn.nn.AttentionDecoderCell(8, 6, 5, score="general", cell="lstm").to(device)
    keys, y = torch.randn(3, 7, 5, device=device), torch.randn(2, 3, 8, device=device)
    casts = _ParameterCasts({parameter.data_ptr() for parameter in decoder.parameters()})

    def decode(steps=2):
        cache, state, counts, outputs = decoder.precompute(keys), None, [], []
        for step in range(steps):
            before = casts.count
            with casts:
                output, state, _ = decoder(y[step], state, cache)
            counts.append(casts.count - before)
            outputs.append(output)
        return counts, outputs

    with fastattn.backend("triton"):
        with torch.autocast(device, dtype=low):
            counts, outputs = decode()
        with torch.autocast(device, dtype=low):
            next_region, _ = decode(steps=1)
        with torch.autocast(device, dtype=low, cache_enabled=False):
            uncached_counts, uncached = decode()
    assert counts[0] > 0 and counts[1] == 0 and next_region[0] == counts[0]
    assert uncached_counts[1] == uncached_counts[0] == counts[0]
    for got, want in zip(outputs, uncached):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _AttentionCenters(TorchDispatchMode):
    """Records the dtype of the center each attention_forward call receives."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fastattn.attention_forward.default:
            self.dtypes.append(args[11].dtype)
        return func(*args, **(kwargs or {}))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_p_centers_stay_float32_under_cuda_autocast(dtype):
    """A center is a position, not an activation: the CUDA autocast kernel cast it to the
    autocast dtype with the rest, where p_t past 256 (bfloat16) or 2048 (float16) is
    rounded; it now hands it on in float32, which a 16-bit query takes.  Fake CUDA tensors."""
    mode, centers = FakeTensorMode(), _AttentionCenters()

    def fake(*shape):
        return FakeTensor(mode, torch.empty(*shape, device="meta"), torch.device("cuda", 0))

    enabled, autocast_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with mode, centers:
            context, _, _ = torch.ops.fastattn.attention_forward(fake(2, 3, 8), fake(2, 5, 8), fake(2, 5, 4), None, None,
                                                                 "dot", 1.0, None, None, False, 2, fake(2, 3), True, False)
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", autocast_dtype)
    assert context.dtype == dtype and centers.dtypes == [torch.float32]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")
def test_the_triton_backend_keeps_local_p_centers_float32_under_autocast():
    """p_t = 2900.4 was cast to float16 with the rest (2900), and the window (D = 2) took
    key 2898; now it stays float32: keys 2899..2902."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low = torch.float16 if INTERPRETED_TRITON else LOW
    query, keys = torch.randn(1, 1, 4, device=device), torch.randn(1, 3000, 4, device=device)
    with fastattn.backend("triton"), torch.autocast(device, dtype=low):
        _, weights = fastattn.attention(query, keys, window=2, center=torch.tensor([[2900.4]], device=device),
                                        return_weights=True)
    assert weights.dtype == low and weights[0, 0].nonzero().flatten().tolist() == [2899, 2900, 2901, 2902]
