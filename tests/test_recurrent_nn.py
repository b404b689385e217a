"""fastattn.nn.LSTMCell/GRUCell/LSTM/GRU and fastattn.lstm_cell/gru_cell against torch.nn.

Outputs and gradients (input, states and every parameter) for each input form
torch accepts, packed sequences, dropout, state_dict round trips, the
``backend`` attribute, and the checks of bad inputs.
"""

import re

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastattn
from fastattn import nn as fastattn_nn

INPUT, HIDDEN, STEPS, BATCH = 5, 7, 9, 3
PROJECTION = 4
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-8)}
DTYPES = list(TOLERANCES)
TORCH_TWIN = {
    fastattn_nn.LSTM: torch.nn.LSTM,
    fastattn_nn.GRU: torch.nn.GRU,
    fastattn_nn.LSTMCell: torch.nn.LSTMCell,
    fastattn_nn.GRUCell: torch.nn.GRUCell,
}

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def twins(fastattn_class, *args, dtype=torch.float64, **kwargs):
    """A torch module and the fastattn module loaded from its state_dict."""
    torch.manual_seed(0)
    original = TORCH_TWIN[fastattn_class](*args, dtype=dtype, **kwargs)
    ours = fastattn_class(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(original.state_dict())
    return original, ours


def flatten(value):
    """The tensors in a module's arguments or outputs, in order (PackedSequence: its data)."""
    if value is None:
        return []
    if isinstance(value, torch.nn.utils.rnn.PackedSequence):
        return [value.data]
    if isinstance(value, (tuple, list)):
        return [tensor for part in value for tensor in flatten(part)]
    return [value]


def gradients(module, outputs, inputs):
    """Gradients of <outputs, fixed random tensors> wrt ``inputs`` and every parameter."""
    generator = torch.Generator().manual_seed(1)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum() for out in outputs)
    return torch.autograd.grad(loss, [*inputs, *module.parameters()])


def assert_same_as_torch(original, ours, *arguments, dtype=torch.float64):
    """Same outputs and gradients from ``original(*arguments)`` and ``ours(*arguments)``."""
    inputs = [tensor for tensor in flatten(arguments) if tensor.requires_grad]
    expected, actual = flatten(original(*arguments)), flatten(ours(*arguments))
    tolerance = TOLERANCES[dtype]
    for want, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got, want, **tolerance)
    expected_gradients = gradients(original, expected, inputs)
    actual_gradients = gradients(ours, actual, inputs)
    for want, got in zip(expected_gradients, actual_gradients, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


def random(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def initial_states(module, batch_shape, dtype):
    """Random hx for an LSTM or GRU module; ``batch_shape`` is (B,) or () when unbatched."""
    layers = module.num_layers * (2 if module.bidirectional else 1)
    h = random(layers, *batch_shape, getattr(module, "proj_size", 0) or module.hidden_size, dtype=dtype)
    if isinstance(module, torch.nn.LSTM):
        return h, random(layers, *batch_shape, module.hidden_size, dtype=dtype)
    return h


CONFIGURATIONS = [
    dict(),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(bias=False, batch_first=True),
    dict(num_layers=2, dropout=0.5),  # dropout is off in eval mode
]
LSTM_CONFIGURATIONS = CONFIGURATIONS + [
    dict(proj_size=PROJECTION),
    dict(proj_size=PROJECTION, num_layers=2, bidirectional=True),
]


def sequence(module, dtype):
    shape = (BATCH, STEPS, INPUT) if module.batch_first else (STEPS, BATCH, INPUT)
    return random(*shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_hx", [False, True])
@pytest.mark.parametrize("configuration", LSTM_CONFIGURATIONS, ids=str)
def test_lstm_matches_torch(configuration, given_hx, dtype):
    original, ours = twins(fastattn_nn.LSTM, INPUT, HIDDEN, dtype=dtype, **configuration)
    original.eval(), ours.eval()
    hx = initial_states(original, (BATCH,), dtype) if given_hx else None
    assert_same_as_torch(original, ours, sequence(original, dtype), hx, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_hx", [False, True])
@pytest.mark.parametrize("configuration", CONFIGURATIONS, ids=str)
def test_gru_matches_torch(configuration, given_hx, dtype):
    original, ours = twins(fastattn_nn.GRU, INPUT, HIDDEN, dtype=dtype, **configuration)
    original.eval(), ours.eval()
    hx = initial_states(original, (BATCH,), dtype) if given_hx else None
    assert_same_as_torch(original, ours, sequence(original, dtype), hx, dtype=dtype)


@pytest.mark.parametrize("given_hx", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("module_class", [fastattn_nn.LSTM, fastattn_nn.GRU])
def test_unbatched_input_matches_torch(module_class, batch_first, given_hx):
    original, ours = twins(module_class, INPUT, HIDDEN, num_layers=2, bidirectional=True, batch_first=batch_first)
    hx = initial_states(original, (), torch.float64) if given_hx else None
    assert_same_as_torch(original, ours, random(STEPS, INPUT), hx)


PACKINGS = [
    pytest.param([4, 9, 4, 1, 9], False, id="unsorted-with-ties"),
    pytest.param([9, 6, 6, 2, 1], True, id="sorted"),
]


@pytest.mark.parametrize("given_hx", [False, True])
@pytest.mark.parametrize("lengths, enforce_sorted", PACKINGS)
@pytest.mark.parametrize(
    "module_class, configuration",
    [
        (fastattn_nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
        (fastattn_nn.LSTM, dict(proj_size=PROJECTION, bidirectional=True)),
        (fastattn_nn.GRU, dict(num_layers=2, bidirectional=True)),
    ],
    ids=["lstm", "lstm-projection", "gru"],
)
def test_packed_sequence_matches_torch(module_class, configuration, lengths, enforce_sorted, given_hx):
    original, ours = twins(module_class, INPUT, HIDDEN, **configuration)
    padded = random(len(lengths), STEPS, INPUT) if original.batch_first else random(STEPS, len(lengths), INPUT)
    packed = pack_padded_sequence(padded, lengths, batch_first=original.batch_first, enforce_sorted=enforce_sorted)
    hx = initial_states(original, (len(lengths),), torch.float64) if given_hx else None
    assert_same_as_torch(original, ours, packed, hx)
    output, _ = ours(packed, hx)
    assert output.batch_sizes is packed.batch_sizes
    assert output.sorted_indices is packed.sorted_indices
    assert output.unsorted_indices is packed.unsorted_indices


@pytest.mark.parametrize("module_class", [fastattn_nn.LSTM, fastattn_nn.GRU])
def test_packed_sequence_on_meta_has_torchs_shapes(module_class):
    """A model on the meta device (shape propagation, deferred initialisation) runs packed
    input as torch.nn does: the packed rows come from batch_sizes, not from a boolean mask
    of device tensors (no meta kernel for nonzero)."""
    original, ours = (module.to("meta") for module in twins(module_class, INPUT, HIDDEN, num_layers=2, bidirectional=True))
    packed = pack_padded_sequence(torch.empty(STEPS, BATCH, INPUT, dtype=torch.float64, device="meta"), torch.tensor([STEPS, 5, 2]))
    expected, actual = original(packed), ours(packed)
    assert actual[0].data.shape == expected[0].data.shape and actual[0].data.is_meta
    assert [t.shape for t in flatten(actual[1:])] == [t.shape for t in flatten(expected[1:])]


@pytest.mark.parametrize("module_class", [fastattn_nn.LSTM, fastattn_nn.GRU])
def test_training_dropout_draws_like_torch(module_class):
    original, ours = twins(module_class, INPUT, HIDDEN, num_layers=3, dropout=0.5, bidirectional=True)
    x = random(STEPS, BATCH, INPUT)
    torch.manual_seed(2)
    expected = flatten(original(x))
    torch.manual_seed(2)
    actual = flatten(ours(x))
    for want, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    ours.eval()
    assert not torch.allclose(ours(x)[0], actual[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_hx", [False, True])
@pytest.mark.parametrize("batch_shape", [(BATCH,), ()], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("module_class", [fastattn_nn.LSTMCell, fastattn_nn.GRUCell])
def test_cell_matches_torch(module_class, bias, batch_shape, given_hx, dtype):
    original, ours = twins(module_class, INPUT, HIDDEN, bias=bias, dtype=dtype)
    hx = None
    if given_hx:
        hx = random(*batch_shape, HIDDEN, dtype=dtype)
        if module_class is fastattn_nn.LSTMCell:
            hx = (hx, random(*batch_shape, HIDDEN, dtype=dtype))
    assert_same_as_torch(original, ours, random(*batch_shape, INPUT, dtype=dtype), hx, dtype=dtype)


@pytest.mark.parametrize("batch_shape", [(BATCH,), ()], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False])
def test_functional_cells_match_torch(bias, batch_shape):
    lstm, _ = twins(fastattn_nn.LSTMCell, INPUT, HIDDEN, bias=bias)
    gru, _ = twins(fastattn_nn.GRUCell, INPUT, HIDDEN, bias=bias)
    x, h, c = random(*batch_shape, INPUT), random(*batch_shape, HIDDEN), random(*batch_shape, HIDDEN)
    h_next, c_next = fastattn.lstm_cell(x, (h, c), lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh)
    expected_h, expected_c = lstm(x, (h, c))
    torch.testing.assert_close(h_next, expected_h)
    torch.testing.assert_close(c_next, expected_c)
    h_next = fastattn.gru_cell(x, h, gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh)
    torch.testing.assert_close(h_next, gru(x, h))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "module_class, configuration, modified",
    [
        (fastattn_nn.LSTM, dict(), 0),
        (fastattn_nn.LSTM, dict(num_layers=2, batch_first=True), 0),
        (fastattn_nn.GRU, dict(), 0),
        (fastattn_nn.GRU, dict(num_layers=2), 0),
        (fastattn_nn.LSTMCell, dict(), 0),
        (fastattn_nn.LSTMCell, dict(), 1),
        (fastattn_nn.GRUCell, dict(), 0),
    ],
    ids=["lstm", "lstm-2-layers", "gru", "gru-2-layers", "lstm-cell-h", "lstm-cell-c", "gru-cell"],
)
def test_outputs_can_be_modified_in_place_before_backward(backend, module_class, configuration, modified):
    """As with torch.nn's modules, an output may be changed in place (nn.ReLU(inplace=True),
    ``out += residual``, clipping the cell state) before the backward: the kernels save their
    output (the layer's, the LSTM cell's c') for the backward, and the backward refused with
    "modified by an inplace operation"."""
    original, ours = twins(module_class, INPUT, HIDDEN, **configuration)
    ours.backend = backend
    is_cell = isinstance(ours, torch.nn.RNNCellBase)
    shape = (BATCH, INPUT) if is_cell else (BATCH, STEPS, INPUT) if ours.batch_first else (STEPS, BATCH, INPUT)
    x = torch.randn(*shape, dtype=torch.float64)
    gradients = []
    for module in (original, ours):
        inputs = x.clone().requires_grad_()
        outputs = flatten(module(inputs))
        outputs[modified].clamp_(-0.1, 0.1)
        sum((output * output).sum() for output in outputs).backward()
        gradients.append([inputs.grad, *(parameter.grad for parameter in module.parameters())])
    for want, got in zip(*gradients, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize(
    "module_class, configuration",
    [
        (fastattn_nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=PROJECTION)),
        (fastattn_nn.GRU, dict(num_layers=2, bias=False)),
        (fastattn_nn.LSTMCell, dict()),
        (fastattn_nn.GRUCell, dict()),
    ],
    ids=["lstm", "gru", "lstm-cell", "gru-cell"],
)
def test_state_dict_round_trips_both_ways(module_class, configuration):
    torch.manual_seed(0)
    ours = module_class(INPUT, HIDDEN, **configuration)
    torch_module = TORCH_TWIN[module_class](INPUT, HIDDEN, **configuration)
    torch_module.load_state_dict(ours.state_dict())
    back = module_class(INPUT, HIDDEN, **configuration)
    back.load_state_dict(torch_module.state_dict())
    assert list(ours.state_dict()) == list(torch_module.state_dict()) == list(back.state_dict())
    is_cell = isinstance(ours, torch.nn.RNNCellBase)
    x = torch.randn(BATCH, INPUT) if is_cell else torch.randn(STEPS, BATCH, INPUT)
    expected = flatten(ours(x))
    for module in (torch_module, back):
        for want, got in zip(expected, flatten(module(x)), strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("module_class", [fastattn_nn.LSTM, fastattn_nn.GRU])
def test_hidden_state_helpers_are_torchs(module_class):
    """permute_hidden, check_forward_args and get_expected_cell_size take the LSTM's
    (h, c) pair as torch.nn.LSTM's do (RNNBase's, which the LSTM had inherited, take one
    tensor and raised AttributeError)."""
    torch_module, ours = twins(module_class, INPUT, HIDDEN, num_layers=2)
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    hx = torch.randn(2, BATCH, HIDDEN, dtype=torch.float64)
    if module_class is fastattn_nn.LSTM:
        hx = (hx, torch.randn(2, BATCH, HIDDEN, dtype=torch.float64))
        assert ours.get_expected_cell_size(x, None) == torch_module.get_expected_cell_size(x, None)
    permutation = torch.arange(BATCH).flip(0)
    for want, got in zip(flatten(torch_module.permute_hidden(hx, permutation)), flatten(ours.permute_hidden(hx, permutation)), strict=True):
        assert torch.equal(got, want)
    assert ours.check_forward_args(x, hx, None) is None
    wrong = tuple(state[:, :1] for state in hx) if isinstance(hx, tuple) else hx[:, :1]
    for module in (torch_module, ours):
        with pytest.raises(RuntimeError, match="Expected hidden"):
            module.check_forward_args(x, wrong, None)


def test_backend_attribute_overrides_the_setting_in_force():
    _, lstm = twins(fastattn_nn.LSTM, INPUT, HIDDEN)
    _, cell = twins(fastattn_nn.GRUCell, INPUT, HIDDEN)
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    assert lstm.backend is None and cell.backend is None
    with fastattn.backend("cuda"):  # never runs CPU tensors
        with pytest.raises(fastattn.BackendUnavailableError):
            lstm(x)
        with pytest.raises(fastattn.BackendUnavailableError):
            cell(x[0])
        lstm.backend = cell.backend = "reference"
        lstm(x), cell(x[0])
    lstm.backend = "no-such-backend"
    with pytest.raises(ValueError, match="backend"):
        lstm(x)


# Bad inputs: (call, error type, the argument its message must start with).
W_IH, W_HH, B_4H = torch.randn(4 * HIDDEN, INPUT), torch.randn(4 * HIDDEN, HIDDEN), torch.randn(4 * HIDDEN)
G_IH, G_HH, B_3H = torch.randn(3 * HIDDEN, INPUT), torch.randn(3 * HIDDEN, HIDDEN), torch.randn(3 * HIDDEN)
X, H, X_SEQUENCE = torch.randn(BATCH, INPUT), torch.randn(BATCH, HIDDEN), torch.randn(STEPS, BATCH, INPUT)
LSTM_MODULE = fastattn_nn.LSTM(INPUT, HIDDEN, num_layers=2, proj_size=PROJECTION)
GRU_MODULE = fastattn_nn.GRU(INPUT, HIDDEN, batch_first=True)
LSTM_CELL, GRU_CELL = fastattn_nn.LSTMCell(INPUT, HIDDEN), fastattn_nn.GRUCell(INPUT, HIDDEN)
LSTM_H0, LSTM_C0 = torch.randn(2, BATCH, PROJECTION), torch.randn(2, BATCH, HIDDEN)


def lstm_cell_with(**changes):
    arguments = dict(x=X, hx=(H, H), w_ih=W_IH, w_hh=W_HH, b_ih=B_4H, b_hh=B_4H) | changes
    return lambda: fastattn.lstm_cell(**arguments)


def gru_cell_with(**changes):
    arguments = dict(x=X, h=H, w_ih=G_IH, w_hh=G_HH, b_ih=B_3H, b_hh=B_3H) | changes
    return lambda: fastattn.gru_cell(**arguments)


def packed_by_hand(rows, batch_sizes, sorted_indices=None, unsorted_indices=None):
    """A PackedSequence of ``rows`` rows of input with the given (possibly inconsistent) layout."""
    as_tensor = lambda value: value if value is None or isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.int64)
    return PackedSequence(
        X_SEQUENCE.reshape(-1, INPUT)[:rows], as_tensor(batch_sizes), as_tensor(sorted_indices), as_tensor(unsorted_indices)
    )


BAD_INPUTS = {
    "lstm_cell x not a tensor": (lstm_cell_with(x=X.tolist()), TypeError, "x"),
    "lstm_cell x integer": (lstm_cell_with(x=X.long()), TypeError, "x"),
    "lstm_cell x float64": (lstm_cell_with(x=X.double()), TypeError, "x"),
    "lstm_cell x 3-D": (lstm_cell_with(x=X_SEQUENCE), ValueError, "x"),
    "lstm_cell x wrong input size": (lstm_cell_with(x=X[:, :-1]), ValueError, "x"),
    "lstm_cell hx a tensor": (lstm_cell_with(hx=H), TypeError, "hx"),
    "lstm_cell hx three tensors": (lstm_cell_with(hx=(H, H, H)), TypeError, "hx"),
    "lstm_cell hx[1] None": (lstm_cell_with(hx=(H, None)), TypeError, "hx[1]"),
    "lstm_cell hx[0] wrong batch": (lstm_cell_with(hx=(H[:-1], H)), ValueError, "hx[0]"),
    "lstm_cell hx[1] wrong size": (lstm_cell_with(hx=(H, H[:, :-1])), ValueError, "hx[1]"),
    "lstm_cell hx batched, x unbatched": (lstm_cell_with(x=X[0]), ValueError, "hx[0]"),
    "lstm_cell hx[0] on another device": (lstm_cell_with(hx=(H.to("meta"), H)), ValueError, "hx[0]"),
    "lstm_cell w_ih rows not 4H": (lstm_cell_with(w_ih=W_IH[:-1]), ValueError, "w_ih"),
    "lstm_cell w_ih 1-D": (lstm_cell_with(w_ih=B_4H), ValueError, "w_ih"),
    "lstm_cell w_hh wrong shape": (lstm_cell_with(w_hh=W_HH[:, :-1]), ValueError, "w_hh"),
    "lstm_cell w_hh on another device": (lstm_cell_with(w_hh=W_HH.to("meta")), ValueError, "w_hh"),
    "lstm_cell b_ih wrong shape": (lstm_cell_with(b_ih=B_3H), ValueError, "b_ih"),
    "lstm_cell b_hh float64": (lstm_cell_with(b_hh=B_4H.double()), TypeError, "b_hh"),
    "gru_cell h wrong size": (gru_cell_with(h=H[:, :-1]), ValueError, "h"),
    "gru_cell h integer": (gru_cell_with(h=H.long()), TypeError, "h"),
    "gru_cell w_ih of an LSTM": (gru_cell_with(w_ih=W_IH), ValueError, "w_ih"),
    "gru_cell b_ih not a tensor": (gru_cell_with(b_ih=1.0), TypeError, "b_ih"),
    "LSTMCell input 3-D": (lambda: LSTM_CELL(X_SEQUENCE), ValueError, "input"),
    "LSTMCell input float64": (lambda: LSTM_CELL(X.double()), TypeError, "input"),
    "LSTMCell hx[1] wrong batch": (lambda: LSTM_CELL(X, (H, H[:-1])), ValueError, "hx[1]"),
    "GRUCell hx wrong size": (lambda: GRU_CELL(X, H[:, :-1]), ValueError, "hx"),
    "LSTM input not a tensor": (lambda: LSTM_MODULE(X_SEQUENCE.numpy()), TypeError, "input"),
    "LSTM input 4-D": (lambda: LSTM_MODULE(X_SEQUENCE[None]), ValueError, "input"),
    "LSTM input 1-D": (lambda: LSTM_MODULE(X[0]), ValueError, "input"),
    "LSTM input wrong input size": (lambda: LSTM_MODULE(X_SEQUENCE[..., :-1]), ValueError, "input"),
    "LSTM input float64": (lambda: LSTM_MODULE(X_SEQUENCE.double()), TypeError, "input"),
    "LSTM input no time steps": (lambda: LSTM_MODULE(X_SEQUENCE[:0]), ValueError, "input"),
    "LSTM hx a tensor": (lambda: LSTM_MODULE(X_SEQUENCE, LSTM_H0), TypeError, "hx"),
    "LSTM hx[0] hidden size, not proj_size": (lambda: LSTM_MODULE(X_SEQUENCE, (LSTM_C0, LSTM_C0)), ValueError, "hx[0]"),
    "LSTM hx[1] one layer": (lambda: LSTM_MODULE(X_SEQUENCE, (LSTM_H0, LSTM_C0[:1])), ValueError, "hx[1]"),
    "LSTM hx[1] integer": (lambda: LSTM_MODULE(X_SEQUENCE, (LSTM_H0, LSTM_C0.long())), TypeError, "hx[1]"),
    "LSTM hx batched, input unbatched": (lambda: LSTM_MODULE(X_SEQUENCE[:, 0], (LSTM_H0, LSTM_C0)), ValueError, "hx[0]"),
    "LSTM packed data wrong size": (
        lambda: LSTM_MODULE(pack_padded_sequence(X_SEQUENCE[..., :-1], [9, 9, 9])), ValueError, "input.data",
    ),
    "LSTM packed batch_sizes not adding up to the rows": (
        lambda: LSTM_MODULE(packed_by_hand(5, [2, 1])), ValueError, "input.batch_sizes",
    ),
    "LSTM packed batch_sizes increasing": (lambda: LSTM_MODULE(packed_by_hand(3, [1, 2])), ValueError, "input.batch_sizes"),
    "LSTM packed batch_sizes empty": (lambda: LSTM_MODULE(packed_by_hand(0, [])), ValueError, "input.batch_sizes"),
    "LSTM packed batch_sizes float": (
        lambda: LSTM_MODULE(packed_by_hand(3, torch.tensor([2.0, 1.0]))), TypeError, "input.batch_sizes",
    ),
    "GRU packed sorted_indices out of range": (
        lambda: GRU_MODULE(packed_by_hand(3, [2, 1], [0, 5], [0, 1])), ValueError, "input.sorted_indices",
    ),
    "GRU packed unsorted_indices not the inverse": (
        lambda: GRU_MODULE(packed_by_hand(6, [3, 3], [1, 2, 0], [1, 2, 0])), ValueError, "input.unsorted_indices",
    ),
    "GRU input no time steps": (lambda: GRU_MODULE(X_SEQUENCE[:, :0]), ValueError, "input"),
    "GRU hx a tuple": (lambda: GRU_MODULE(X_SEQUENCE, (H[None], H[None])), TypeError, "hx"),
    "GRU hx wrong batch": (lambda: GRU_MODULE(X_SEQUENCE.transpose(0, 1), H[None, :-1]), ValueError, "hx"),
}


@pytest.mark.parametrize("call, error, argument", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_naming_the_argument(call, error, argument):
    with pytest.raises(error, match=rf"^{re.escape(argument)} "):
        call()
