"""The C++ LSTM/GRU kernels (backend "cpu") against the reference and torch.nn:
cells and layers, lengths and reverse, gradients, opcheck on every op."""

import pytest
import torch

import fastattn
from fastattn import _extension, backends, reference
from tests.op_log import OpLog
from tests.problems import assert_sigmoid_accurate, leaves_in, sigmoid_arguments

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

STEPS, BATCH, INPUT, HIDDEN = 9, 4, 5, 7
BFLOAT16_GEMMS = "avx512_bf16" in (_extension.cpu_kernels() or ())
LENGTHS = torch.tensor([9, 0, 4, 4])  # unsorted, with a tie and an empty sequence


def leaves(*shapes, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def weights(gates, with_bias, dtype=torch.float64, hidden=HIDDEN):
    rows = gates * hidden
    w_ih, w_hh, b_ih, b_hh = leaves((rows, INPUT), (rows, hidden), (rows,), (rows,), dtype=dtype, seed=1)
    return (w_ih, w_hh, b_ih, b_hh) if with_bias else (w_ih, w_hh, None, None)


def compare(function_name, arguments, dtype):
    """Run the op on the kernel and on the reference; compare outputs and gradients."""
    tensors = [a for a in arguments if isinstance(a, torch.Tensor) and a.requires_grad]
    results = []
    for implementation in (getattr(reference, function_name), backends.implementation(function_name, "cpu", "cpu")):
        outputs = implementation(*arguments)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        generator = torch.Generator().manual_seed(3)
        projection = sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(dtype)).sum() for o in outputs)
        results.append((outputs, torch.autograd.grad(projection, tensors)))
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(results[1], results[0], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cells_match_the_reference(with_bias, dtype):
    x, h, c = leaves((BATCH, INPUT), (BATCH, HIDDEN), (BATCH, HIDDEN), dtype=dtype)
    compare("lstm_cell", (x, h, c, *weights(4, with_bias, dtype)), dtype)
    compare("gru_cell", (x, h, *weights(3, with_bias, dtype)), dtype)


def test_saturated_float32_gates_close_and_pass_no_gradient():
    """A forget gate of pre-activation -100 empties c (sigmoid 3.7e-44, subnormal: c' =
    3.7e-36 from c = 1e8, where torch.lstm_cell's gives 0) and saturated gates give no
    gradient to their weights, as torch.lstm_cell: the gate sigmoid had stayed 6e-8 from 0
    and 1 (c' was 5.96)."""
    x, h, c = torch.ones(1, 1), torch.zeros(1, 1), torch.full((1, 1), 1e8)
    w_ih = torch.tensor([[0.0], [-100.0], [0.0], [0.0]])
    with fastattn.backend("cpu"):
        got = fastattn.lstm_cell(x, (h, c), w_ih, torch.zeros(4, 1))[1]
    exact = 1e8 * torch.sigmoid(torch.tensor(-100.0, dtype=torch.float64)).item()
    assert exact / 2 <= got.item() <= 2 * exact
    generator = torch.Generator().manual_seed(0)
    x, h, c = torch.randn(3, 5, generator=generator) * 1e4, torch.randn(3, 4, generator=generator), torch.randn(3, 4)
    w_ih = torch.randn(16, 5, generator=generator).sign().requires_grad_()  # every gate |pre-activation| > 40
    want = torch.autograd.grad(torch.lstm_cell(x, (h, c), w_ih, torch.zeros(16, 4))[0].sum(), w_ih)[0]
    with fastattn.backend("cpu"):
        got = torch.autograd.grad(fastattn.lstm_cell(x, (h, c), w_ih, torch.zeros(16, 4))[0].sum(), w_ih)[0]
    assert want.abs().max() == 0 and torch.equal(got, want)


@pytest.mark.parametrize("path", ["cell", "layer"])
def test_float32_gate_sigmoid_is_accurate_relative_to_its_value(path):
    """The forget gate alone (input gate closed, c = 1) makes c' = sigmoid(its
    pre-activation), one hidden unit a batch row.  (1 + tanh(x / 2)) / 2 had lost every
    digit under 1's spacing: sigmoid(-10) relative error 4.6e-4, sigmoid(-18) = 0."""
    x = sigmoid_arguments()
    w_ih = torch.tensor([[0.0], [1.0], [0.0], [0.0]])  # the forget gate's pre-activation is x
    b_ih = torch.tensor([-200.0, 0.0, 0.0, 0.0])  # input gate 0, g = tanh(0) = 0
    h, c = torch.zeros(x.numel(), 1), torch.ones(x.numel(), 1)
    with fastattn.backend("cpu"):
        if path == "cell":
            c_next = fastattn.lstm_cell(x[:, None], (h, c), w_ih, torch.zeros(4, 1), b_ih)[1]
        else:
            layer = fastattn.nn.LSTM(1, 1)
            with torch.no_grad():
                layer.weight_ih_l0.copy_(w_ih), layer.weight_hh_l0.zero_(), layer.bias_ih_l0.copy_(b_ih)
                layer.bias_hh_l0.zero_()
                c_next = layer(x[None, :, None], (h[None], c[None]))[1][1][0]
    assert_sigmoid_accurate(x, c_next[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("module", ["LSTM", "GRU"])
def test_a_nan_input_makes_its_rows_states_nan_as_torchs(module, dtype):
    """A NaN in one row's input at step 3 makes that row's outputs NaN from step 3 on and
    its final states NaN, as torch.nn's do; the other rows keep their values.  The float32
    gate clamps had returned their bound for NaN (tanh -1, sigmoid 0): the LSTM's state
    became 0 and the GRU's -1, and the NaN vanished."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, module)(INPUT, HIDDEN, batch_first=True).to(dtype)
    ours = getattr(fastattn.nn, module)(INPUT, HIDDEN, batch_first=True).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(BATCH, STEPS, INPUT, dtype=dtype)
    x[1, 3, 2] = float("nan")
    with fastattn.backend("cpu"):
        actual = ours(x)
    expected = theirs(x)
    assert expected[0][1, 3:].isnan().all() and not expected[0][[0, 2, 3]].isnan().any()
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5, equal_nan=True)

    def states(value):  # (h, c) of an LSTM, h of a GRU
        return value if isinstance(value, tuple) else (value,)

    for got, want in zip(states(actual[1]), states(expected[1])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    cell = "lstm_cell" if module == "LSTM" else "gru_cell"
    zeros = torch.zeros(BATCH, HIDDEN, dtype=dtype)
    state = (zeros, zeros) if module == "LSTM" else zeros
    with fastattn.backend("cpu"):
        got = getattr(fastattn, cell)(x[:, 3], state, *theirs.parameters())
    want = getattr(torch, cell)(x[:, 3], state, *theirs.parameters())
    for got_state, want_state in zip(states(got), states(want)):
        torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert got_state[1].isnan().all()


@pytest.mark.parametrize("steps", [STEPS, 3], ids=["tiles", "few_steps"])  # a GEMM per step up to 4 steps
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layers_match_the_reference(with_bias, lengths, reverse, dtype, steps):
    lengths = None if lengths is None else lengths.clamp(max=steps)
    x, h0, c0 = leaves((steps, BATCH, INPUT), (BATCH, HIDDEN), (BATCH, HIDDEN), dtype=dtype)
    compare("lstm_layer", (x, h0, c0, *weights(4, with_bias, dtype), None, lengths, reverse), dtype)
    compare("gru_layer", (x, h0, *weights(3, with_bias, dtype), lengths, reverse), dtype)


def outputs_and_gradients(implementation, arguments, keep_dtype=False):
    """The outputs and the gradients of every tensor argument, in float64 unless ``keep_dtype``."""
    outputs = implementation(*arguments)
    generator = torch.Generator().manual_seed(3)
    projection = sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)
    tensors = [a for a in arguments if isinstance(a, torch.Tensor) and a.requires_grad]
    results = [t.detach() for t in (*outputs, *torch.autograd.grad(projection, tensors))]
    return results if keep_dtype else [t.double() for t in results]


def assert_float32_error_at_most_twice_the_references(function_name, arguments):
    """The kernel in float32 errs (against the float64 reference) at most twice as much
    as the reference run in float32, output by output and gradient by gradient."""
    exact = outputs_and_gradients(getattr(reference, function_name), arguments)
    reference_run = outputs_and_gradients(getattr(reference, function_name), leaves_in(arguments, torch.float32))
    kernel_run = outputs_and_gradients(backends.implementation(function_name, "cpu", "cpu"), leaves_in(arguments, torch.float32))
    for index, (truth, theirs, ours) in enumerate(zip(exact, reference_run, kernel_run)):
        allowed = 2 * (theirs - truth).abs().max().item() + 1e-6
        assert (ours - truth).abs().max().item() <= allowed, f"{function_name} result {index}"


def layer_arguments(batch, hidden, reverse):
    """LSTM and GRU layer arguments (float64 leaves, LENGTHS repeated over the batch), the
    weights at torch.nn's scale (1/sqrt(hidden)), so float32 errors are not amplified step
    after step by weights of norm ~sqrt(hidden)."""
    lengths = LENGTHS.repeat(batch // len(LENGTHS))
    x, h0, c0 = leaves((STEPS, batch, INPUT), (batch, hidden), (batch, hidden))
    lstm_weights, gru_weights = (
        [(w / hidden**0.5).detach().requires_grad_() for w in weights(gates, True, hidden=hidden)] for gates in (4, 3)
    )
    return {
        "lstm_layer": (x, h0, c0, *lstm_weights, None, lengths, reverse),
        "gru_layer": (x, h0, *gru_weights, lengths, reverse),
    }


@pytest.mark.parametrize("threads", [2, 3])
def test_layers_split_over_blocks_of_hidden_units_match_the_reference(threads):
    """A time step is split over the threads by blocks of 16 hidden units: 37 units are
    blocks of 16, 16 and 5, shared unevenly by 2 threads and one each by 3.  A batch of
    160 makes each block a task's worth of work (smaller steps run on one thread).  float64
    against the reference; float32 bit for bit against the same call on one thread: the
    outputs and the gradients of x and the initial states (the weights' gradients are one
    ATen GEMM after the time loop, whose summation order follows the thread count)."""
    previous_threads = torch.get_num_threads()
    try:
        for reverse in (False, True):
            for function_name, arguments in layer_arguments(160, 37, reverse).items():
                torch.set_num_threads(threads)
                compare(function_name, arguments, torch.float64)
                kernel = backends.implementation(function_name, "cpu", "cpu")
                split = outputs_and_gradients(kernel, leaves_in(arguments, torch.float32))
                torch.set_num_threads(1)
                one_thread = outputs_and_gradients(kernel, leaves_in(arguments, torch.float32))
                states = 2 if function_name == "lstm_layer" else 1
                outputs_and_state_gradients = (1 + states) + (1 + states)  # (output, states), grads of (x, states)
                for index in range(outputs_and_state_gradients):
                    torch.testing.assert_close(split[index], one_thread[index], rtol=0, atol=0,
                                               msg=f"{function_name} result {index}")
    finally:
        torch.set_num_threads(previous_threads)


@pytest.mark.parametrize("reverse", [False, True])
def test_layers_in_float32_err_at_most_twice_the_reference(reverse):
    for function_name, arguments in layer_arguments(len(LENGTHS), 37, reverse).items():
        assert_float32_error_at_most_twice_the_references(function_name, arguments)


@pytest.mark.parametrize("function_name, features, hidden",
                         [("lstm_layer", 1024, 256), ("gru_layer", 8, 1024), ("lstm_layer", 70, 75)])
def test_float32_layers_with_long_tiles_and_weight_rows_4_kib_apart_match_the_reference(function_name, features, hidden):
    """The float32 GEMM tiles (csrc/cpu/tile_gemm.h) take a weight whose rows would lie a
    multiple of 4 KiB apart as a copy with padded rows (as_tile_operand), and a K over 256
    in blocks added up in C.  An LSTM at I=1024, H=256 pads w_ih^T and w_hh^T in the
    forward and w_ih in the backward, and blocks K=1024 in the input projection and in
    grad_x; a GRU at H=1024 pads w_ih^T (3072 floats a row) and w_hh^T in the forward and
    w_hh in the backward, and blocks K=1024 in the forward's steps and K=3072 in the
    backward's.  The forward's w^T are transposed in 8 x 8 blocks over the threads: at
    I=70, H=75 each thread's rows start off the blocks (35, 38) and end in a partial one.
    Against the reference run in float32 (at these sizes the kernel's error against
    float64 is 1-3x the reference's, output by output, by the seed)."""
    gates = 4 if function_name == "lstm_layer" else 3
    x, h0, c0 = leaves((3, 2, features), (2, hidden), (2, hidden))
    w_ih, w_hh, b_ih, b_hh = (
        (w / hidden**0.5).detach().requires_grad_()
        for w in leaves((gates * hidden, features), (gates * hidden, hidden), (gates * hidden,), (gates * hidden,), seed=1)
    )
    lengths = torch.tensor([3, 2])
    arguments = ((x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lengths, False) if function_name == "lstm_layer"
                 else (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, False))
    compare(function_name, leaves_in(arguments, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_low_precision_layers_err_at_most_twice_the_reference_in_that_dtype(reverse, dtype):
    """The layers take float16 / bfloat16 themselves (state, buffers and gate maths in
    float32; where the CPU has AVX512-BF16 a bfloat16 forward's GEMMs in bfloat16, on x and
    the weights as given and on h rounded each step): outputs and gradients in the input
    dtype, each within twice the error of the reference run in that dtype (float64 oracle on
    the same rounded inputs).
    37 units are blocks of 16, 16 and 5 (the packed w_hh's panels, the last one short);
    batch 4 runs a step on one thread, batch 164 splits it over 2 threads by those blocks;
    4 and 164 rows end the GEMM's 6-row blocks with 4 and 2."""
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for batch in (len(LENGTHS), 164):
            for function_name, arguments in layer_arguments(batch, 37, reverse).items():
                low = leaves_in(arguments, dtype)
                exact = outputs_and_gradients(getattr(reference, function_name), leaves_in(low, torch.float64))
                reference_run = outputs_and_gradients(getattr(reference, function_name), low, keep_dtype=True)
                kernel_run = outputs_and_gradients(backends.implementation(function_name, "cpu", "cpu"), low,
                                                   keep_dtype=True)
                assert all(t.dtype == dtype for t in kernel_run), [t.dtype for t in kernel_run]
                for index, (truth, theirs, ours) in enumerate(zip(exact, reference_run, kernel_run)):
                    allowed = 2 * (theirs.double() - truth).abs().max() + torch.finfo(dtype).eps * truth.abs().max()
                    assert (ours.double() - truth).abs().max() <= allowed, (function_name, batch, index)
    finally:
        torch.set_num_threads(previous_threads)


def _weight_copies(function_name, dtype):
    """The shapes of the tensors a layer's forward and backward convert (aten::_to_copy) at
    dtype ``dtype``, and its weights' shapes."""
    arguments = [a.detach().to(dtype).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in layer_arguments(len(LENGTHS), 37, False)[function_name]]
    weight_shapes = {tuple(arguments[index].shape) for index in ((3, 4) if function_name == "lstm_layer" else (2, 3))}
    kernel = backends.implementation(function_name, "cpu", "cpu")
    with torch.profiler.profile(record_shapes=True) as profile:
        outputs_and_gradients(kernel, arguments, keep_dtype=True)
    converted = {tuple(event.input_shapes[0]) for event in profile.events() if event.name == "aten::_to_copy"}
    return converted, weight_shapes


@pytest.mark.skipif(not BFLOAT16_GEMMS, reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("function_name", ["lstm_layer", "gru_layer"])
def test_a_bfloat16_layer_multiplies_its_weights_as_given(function_name):
    """No float32 copy of w_ih or w_hh in a bfloat16 forward and backward (their GEMMs run
    in bfloat16); a float16 layer makes both (float16 GEMMs run on float32 copies), which
    shows the check sees such copies."""
    converted, weights = _weight_copies(function_name, torch.bfloat16)
    assert not converted & weights, converted
    converted, weights = _weight_copies(function_name, torch.float16)
    assert weights <= converted, converted


def test_lstm_projection_runs_the_reference_on_the_cpu_backend():
    """The kernels have no projection (w_hr): the cpu backend's layer runs the reference's
    (whose values test_recurrent_nn checks against torch.nn.LSTM(proj_size=...)), and no
    kernel op."""
    x, h0, c0 = leaves((STEPS, BATCH, INPUT), (BATCH, 3), (BATCH, HIDDEN))
    w_ih, w_hh = leaves((4 * HIDDEN, INPUT), (4 * HIDDEN, 3))
    (w_hr,) = leaves((3, HIDDEN))
    arguments = (x, h0, c0, w_ih, w_hh, None, None, w_hr, LENGTHS, True)
    with OpLog() as seen:
        backends.implementation("lstm_layer", "cpu", "cpu")(*arguments)
    assert not [name for name in seen.names if name.startswith("fastattn::")], seen.names
    compare("lstm_layer", arguments, torch.float64)


@pytest.mark.parametrize("module", ["LSTM", "GRU"])
def test_modules_on_the_cpu_backend_match_torch(module):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, module)(INPUT, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
    ours = getattr(fastattn.nn, module)(INPUT, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(BATCH, STEPS, INPUT)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, LENGTHS.clamp_min(1), batch_first=True, enforce_sorted=False)
    with fastattn.backend("cpu"):
        for inputs in (x, packed):
            expected, actual = theirs(inputs), ours(inputs)
            # .data: the values of a PackedSequence, or of a tensor
            torch.testing.assert_close(actual[0].data, expected[0].data, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-5)


def _cell_runs(cell, dtype, with_bias):
    """(the arguments of reference.<cell>_cell in ``dtype`` as float64 copies, in ``dtype``,
    and a function that returns a run's outputs and the gradients of its tensors) for one cell."""
    gates, state = (4, ((BATCH, HIDDEN), (BATCH, HIDDEN))) if cell == "lstm" else (3, ((BATCH, HIDDEN),))
    low = [None if t is None else t.detach().to(dtype).requires_grad_()
           for t in (*leaves((BATCH, INPUT), *state), *weights(gates, with_bias))]
    exact = leaves_in(low, torch.float64)

    def run(implementation, arguments):
        outputs = implementation(*arguments)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        generator = torch.Generator().manual_seed(3)
        upstream = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype) for o in outputs]
        tensors = [t for t in arguments if t is not None]
        return [o.detach() for o in outputs], torch.autograd.grad(outputs, tensors, upstream)

    return exact, low, run


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_low_precision_cells_err_at_most_twice_the_reference_in_that_dtype(cell, dtype):
    """The cells take float16 / bfloat16 themselves: GEMMs in that dtype, the gate maths in
    float32; outputs and every gradient within 2x the reference run's error in that dtype
    (float64 oracle on the same rounded inputs)."""
    for with_bias in (True, False):
        exact, low, run = _cell_runs(cell, dtype, with_bias)
        function = getattr(reference, f"{cell}_cell")
        truth, reference_run = run(function, exact), run(function, low)
        ours = run(backends.implementation(f"{cell}_cell", "cpu", "cpu"), low)
        assert all(t.dtype == dtype for t in (*ours[0], *ours[1]))
        for want, theirs, got in zip((*truth[0], *truth[1]), (*reference_run[0], *reference_run[1]),
                                     (*ours[0], *ours[1])):
            bound = 2 * (theirs.double() - want).abs().max() + torch.finfo(dtype).eps * want.abs().max()
            assert (got.double() - want).abs().max() <= bound, (with_bias, got.shape)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_bfloat16_cell_keeps_no_float32_copy_of_its_weights(cell):
    """A decoder steps its cell once a token: float32 copies of the weights, made at every
    step and saved for the backward, cost 2.8x torch's own time and twice the weights'
    bytes a step."""
    _, low, _ = _cell_runs(cell, torch.bfloat16, True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), fastattn.backend("cpu"):
        getattr(fastattn, f"{cell}_cell")(low[0], tuple(low[1:-4]) if cell == "lstm" else low[1], *low[-4:])
    assert saved and all(tensor.dtype == torch.bfloat16 for tensor in saved), [(t.dtype, t.shape) for t in saved]


def _recurrent_samples():
    x, h, c = leaves((BATCH, INPUT), (BATCH, HIDDEN), (BATCH, HIDDEN))
    sequence = leaves((STEPS, BATCH, INPUT))[0]
    lstm_weights, gru_weights = weights(4, True), weights(3, True)
    yield torch.ops.fastattn.lstm_cell_forward.default, (x, h, c, *lstm_weights)
    yield torch.ops.fastattn.gru_cell_forward.default, (x, h, *gru_weights)
    for lengths, reverse in ((None, False), (LENGTHS, True)):
        yield torch.ops.fastattn.lstm_layer_forward.default, (sequence, h, c, *lstm_weights, lengths, reverse)
        yield torch.ops.fastattn.gru_layer_forward.default, (sequence, h, *gru_weights, lengths, reverse)
    yield torch.ops.fastattn.lstm_layer_forward.default, (sequence, h, c, *weights(4, False), LENGTHS, False)
    # Transposed inputs: the kernels' outputs are contiguous, and so must the fake kernels' be.
    x_t, h_t, c_t = (t.detach().T.contiguous().T.requires_grad_() for t in (x, h, c))
    sequence_t = sequence.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    yield torch.ops.fastattn.lstm_cell_forward.default, (x_t, h_t, c_t, *lstm_weights)
    yield torch.ops.fastattn.gru_cell_forward.default, (x_t, h_t, *gru_weights)
    yield torch.ops.fastattn.lstm_layer_forward.default, (sequence_t, h_t, c_t, *lstm_weights, LENGTHS, False)
    yield torch.ops.fastattn.gru_layer_forward.default, (sequence_t, h_t, *gru_weights, None, True)
    for dtype in (torch.float16, torch.bfloat16):  # the cells and the layers take them natively
        low = [t.detach().to(dtype).requires_grad_() for t in (x, h, c, sequence, *lstm_weights)]
        low_gru_weights = [t.detach().to(dtype).requires_grad_() for t in gru_weights]
        yield torch.ops.fastattn.lstm_cell_forward.default, (*low[:3], *low[4:])
        yield torch.ops.fastattn.gru_cell_forward.default, (low[0], low[1], *low_gru_weights)
        yield torch.ops.fastattn.lstm_layer_forward.default, (low[3], *low[1:3], *low[4:], LENGTHS, False)
        yield torch.ops.fastattn.gru_layer_forward.default, (low[3], low[1], *low_gru_weights, None, True)


@pytest.mark.parametrize("op, arguments", list(_recurrent_samples()), ids=lambda value: getattr(value, "__name__", ""))
def test_opcheck_recurrent_ops(op, arguments):
    torch.library.opcheck(op, arguments)


@pytest.mark.parametrize("op, arguments", list(_recurrent_samples())[:4], ids=lambda value: getattr(value, "__name__", ""))
def test_a_meta_weight_next_to_cpu_tensors_is_refused_by_name(op, arguments):
    """The Meta key outranks CPU: such a call reached the fake kernel, which returned
    uninitialised CPU tensors."""
    weight_index = 3 if "lstm" in op.__name__ else 2  # w_ih, after (x, h, c) or (x, h)
    arguments = (*arguments[:weight_index], arguments[weight_index].detach().to("meta"), *arguments[weight_index + 1:])
    with pytest.raises(ValueError, match="every tensor must be on one device, got w_ih on meta next to tensors on cpu"):
        op(*arguments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("batch, hidden, features", [(0, HIDDEN, INPUT), (BATCH, 0, 0)], ids=["no_batch", "no_hidden"])
def test_a_layer_with_no_state_to_update_returns_at_once_whatever_its_length(cell, batch, hidden, features, dtype):
    """T = 2^40 steps of empty tensors (no memory): the forward and backward time loops
    walked every step (hours).  In bfloat16 on AVX512-BF16 an empty batch took the float32
    steps on the bfloat16 w_hh (a dtype error)."""
    steps, gates = 2**40, 4 if cell == "lstm" else 3
    x, state = torch.empty(steps, batch, features, dtype=dtype), torch.zeros(batch, hidden, dtype=dtype)
    states = (state, state) if cell == "lstm" else (state,)
    w_ih, w_hh = torch.zeros(gates * hidden, features, dtype=dtype), torch.zeros(gates * hidden, hidden, dtype=dtype)
    forward = getattr(torch.ops.fastattn, f"{cell}_layer_forward")
    output, *new_states, saved = forward(x, *states, w_ih, w_hh, None, None, None, False)
    assert output.shape == (steps, batch, hidden) and all(s.shape == (batch, hidden) for s in new_states)
    backward = getattr(torch.ops.fastattn, f"{cell}_layer_backward")
    grad_x, *others = backward(output, *new_states, x, *states, w_ih, w_hh, None, None, None, False, output, saved)
    assert grad_x.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_an_empty_batch_with_any_strides_gives_empty_outputs(cell, dtype):
    """An empty tensor counts as contiguous whatever its strides, and a view to its own shape
    keeps them: the bfloat16 GEMM refused one step of x with stride 2 along I."""
    gates, steps = (4 if cell == "lstm" else 3), 1
    x = torch.zeros(steps, 0, 2 * INPUT, dtype=dtype)[..., ::2]
    state = torch.zeros(0, HIDDEN, dtype=dtype)
    states = (state, state) if cell == "lstm" else (state,)
    w_ih, w_hh = torch.randn(gates * HIDDEN, INPUT, dtype=dtype), torch.randn(gates * HIDDEN, HIDDEN, dtype=dtype)
    output, *new_states, _ = getattr(torch.ops.fastattn, f"{cell}_layer_forward")(x, *states, w_ih, w_hh, None, None,
                                                                                  None, False)
    assert output.shape == (steps, 0, HIDDEN) and all(s.shape == (0, HIDDEN) for s in new_states)


@pytest.mark.parametrize("function_name", ["lstm_cell", "gru_cell", "lstm_layer", "gru_layer"])
def test_gradients_through_one_output_only_match_the_reference(function_name):
    """The forwards do not materialise zero gradients for unused outputs; the backward
    must fill them in itself."""
    x_step, x_sequence, h, c = leaves((BATCH, INPUT), (STEPS, BATCH, INPUT), (BATCH, HIDDEN), (BATCH, HIDDEN))
    gates = 4 if function_name.startswith("lstm") else 3
    state = (h, c) if function_name.startswith("lstm") else (h,)
    extra = (None, LENGTHS, True) if function_name == "lstm_layer" else (LENGTHS, True) if function_name == "gru_layer" else ()
    arguments = (x_sequence if "layer" in function_name else x_step, *state, *weights(gates, True), *extra)
    tensors = [a for a in arguments if isinstance(a, torch.Tensor) and a.requires_grad]
    kernel = backends.implementation(function_name, "cpu", "cpu")
    for output_index in range(len(getattr(reference, function_name)(*arguments))):
        expected = torch.autograd.grad(getattr(reference, function_name)(*arguments)[output_index].sum(), tensors, allow_unused=True)
        actual = torch.autograd.grad(kernel(*arguments)[output_index].sum(), tensors, allow_unused=True)
        for a, e in zip(actual, expected):
            if e is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch, hidden", [(1, 40), (3, 40), (4, 150), (1, 210), (3, 210)])
def test_cells_with_few_rows_split_over_the_weight_rows_match_the_reference(batch, hidden):
    """With a few rows (at most 4) the cells' projections are split over the rows of the
    weight, one GEMV per thread, in grad mode and without, where the weight has more than
    2^17 elements (hidden 210: w_hh 840 x 210 and 630 x 210, several tasks on 2 threads) or
    rows x elements exceed 2^18 (4 rows, hidden 150: 4 x 600 x 150); otherwise (hidden 40,
    and every w_ih here) they run one GEMV unsplit."""
    previous_threads = torch.get_num_threads()
    x, h, c = leaves((batch, INPUT), (batch, hidden), (batch, hidden))
    torch.set_num_threads(2)
    try:
        compare("lstm_cell", (x, h, c, *weights(4, True, hidden=hidden)), torch.float64)
        compare("gru_cell", (x, h, *weights(3, True, hidden=hidden)), torch.float64)
        with torch.no_grad():
            kernel = backends.implementation("lstm_cell", "cpu", "cpu")(x, h, c, *weights(4, True, hidden=hidden))
            torch.testing.assert_close(kernel, reference.lstm_cell(x, h, c, *weights(4, True, hidden=hidden)), rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(previous_threads)


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
@pytest.mark.parametrize("features, hidden", [(37, 19), (129, 40)])
def test_float32_cells_at_a_few_rows_match_the_reference(batch, features, hidden):
    """Up to 4 rows of float32 multiply by the weights in few_rows_matmul_into's AVX-512 or
    AVX2 kernel (csrc/cpu/tile_gemm.h; test_cpu_isa_tiers runs this under both), one
    instantiation per row count, over K = 37, 129, 19 and 40 (remainders past the 16 and
    the 8 lanes) and N = 4 x 19 and 4 x 40 (and their 3 / 4, GRU's: a remainder past the 4
    columns a block); a strided x (every other column) takes ATen's GEMM there instead.
    Outputs and gradients against the reference."""
    x, h, c = leaves((batch, features), (batch, hidden), (batch, hidden), dtype=torch.float32, seed=2)
    w_ih, w_hh, b_ih, b_hh = leaves((4 * hidden, features), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,),
                                    dtype=torch.float32, seed=3)
    compare("lstm_cell", (x, h, c, w_ih, w_hh, b_ih, b_hh), torch.float32)
    compare("gru_cell", (x, h, w_ih[: 3 * hidden], w_hh[: 3 * hidden], b_ih[: 3 * hidden], b_hh[: 3 * hidden]),
            torch.float32)
    wide = leaves((batch, 2 * features), dtype=torch.float32, seed=4)[0]
    compare("lstm_cell", (wide[:, ::2], h, c, w_ih, w_hh, b_ih, b_hh), torch.float32)
    kernel = backends.implementation("lstm_cell", "cpu", "cpu")
    vector_kernels = _extension.cpu_kernels()[0] in ("avx512", "avx2")  # the baseline runs both on ATen's
    assert _gemms_run(lambda: kernel(x, h, c, w_ih, w_hh, b_ih, b_hh)) == (0 if vector_kernels else 2)
    assert _gemms_run(lambda: kernel(wide[:, ::2], h, c, w_ih, w_hh, b_ih, b_hh)) == (1 if vector_kernels else 2)


def _gemms_run(call) -> int:
    """How many of ATen's GEMMs ``call()`` runs without gradients (the profiler's record)."""
    with torch.no_grad():
        return _aten_gemms(call)


def _aten_gemms(call) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    return sum(event.name in ("aten::mm", "aten::addmm") for event in profile.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, hidden", [(1, 19), (4, 40), (4, 150)])
def test_a_cells_backward_of_a_small_product_runs_no_aten_gemm(dtype, batch, hidden):
    """A cell's backward GEMMs (the input, state and weight gradients) of at most 2^18
    multiply-adds run small_matmul_into (csrc/cpu/tile_gemm.h) on every ISA, and larger
    ones ATen's: 4 x 600 x 150 = 360,000 is over (its values: the few-rows test above)."""
    x, h, c = leaves((batch, INPUT), (batch, hidden), (batch, hidden), dtype=dtype)
    for name, arguments in (("lstm_cell", (x, h, c, *weights(4, True, dtype, hidden))),
                            ("gru_cell", (x, h, *weights(3, True, dtype, hidden)))):
        outputs = backends.implementation(name, "cpu", "cpu")(*arguments)
        total = sum(output.sum() for output in (outputs if isinstance(outputs, tuple) else (outputs,)))
        tensors = [a for a in arguments if a.requires_grad]
        expected = 0 if batch * 4 * hidden * hidden <= 2**18 else 1
        assert (_aten_gemms(lambda: torch.autograd.grad(total, tensors)) > 0) == bool(expected), name


def _zero_states_made(call) -> int:
    """How many zero tensors ``call()`` makes with ``new_zeros``, as the functional layer makes
    a missing state (the profiler's record of aten's ops; the kernels' own scratch is not it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    return sum(event.name == "aten::new_zeros" for event in profile.events())


def test_a_cell_makes_a_zero_state_only_when_one_is_missing():
    x, h, c = (torch.randn(BATCH, size) for size in (INPUT, HIDDEN, HIDDEN))
    w_ih, w_hh = (w.detach() for w in weights(4, False, torch.float32)[:2])
    with fastattn.backend("cpu"):
        assert _zero_states_made(lambda: fastattn.lstm_cell(x, (h, c), w_ih, w_hh)) == 0
        assert _zero_states_made(lambda: fastattn.lstm_cell(x, None, w_ih, w_hh)) == 1
        assert torch.equal(fastattn.lstm_cell(x, None, w_ih, w_hh)[1],
                           fastattn.lstm_cell(x, (torch.zeros_like(h), torch.zeros_like(c)), w_ih, w_hh)[1])
