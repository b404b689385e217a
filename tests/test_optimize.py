"""fastattn.optimize: torch.nn recurrent modules swapped in place for fastattn's,
holding the very same parameters, with unchanged outputs."""

import pytest
import torch

import fastattn
from fastattn import nn as fastattn_nn

RECURRENT_CLASSES = (fastattn_nn.LSTM, fastattn_nn.GRU, fastattn_nn.LSTMCell, fastattn_nn.GRUCell)

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True, proj_size=3)
        self.gru = torch.nn.GRU(6, 7)
        self.head = torch.nn.Linear(7, 2)

    def forward(self, x):
        features, _ = self.lstm(x)
        output, _ = self.gru(features.transpose(0, 1))
        return self.head(output)


class Model(torch.nn.Module):
    """Recurrent modules at several depths, one of them reachable under two names."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.cells = torch.nn.ModuleDict({"gru": torch.nn.GRUCell(5, 4), "lstm": torch.nn.LSTMCell(4, 4)})
        self.same_lstm_cell = self.cells["lstm"]

    def forward(self, x):
        h = self.cells["gru"](x[:, 0])
        h, c = self.cells["lstm"](h)
        h, c = self.same_lstm_cell(h, (h, c))
        return self.encoder(x), h, c


def outputs(model, x):
    with torch.no_grad():
        result = model(x)
    return result if isinstance(result, tuple) else (result,)


def parameter_identities(model):
    return [(name, id(parameter), parameter.data_ptr()) for name, parameter in model.named_parameters()]


def test_swaps_nested_modules_in_place_sharing_parameters():
    torch.manual_seed(0)
    model = Model()
    model.cells.eval()
    x = torch.randn(3, 9, 5)
    before = outputs(model, x)
    identities, state_keys = parameter_identities(model), list(model.state_dict())
    modes = {name: module.training for name, module in model.named_modules()}

    assert fastattn.optimize(model) is model

    assert type(model.encoder.lstm) is fastattn_nn.LSTM
    assert type(model.encoder.gru) is fastattn_nn.GRU
    assert type(model.cells["gru"]) is fastattn_nn.GRUCell
    assert type(model.cells["lstm"]) is fastattn_nn.LSTMCell
    assert model.same_lstm_cell is model.cells["lstm"]
    assert parameter_identities(model) == identities
    assert list(model.state_dict()) == state_keys
    assert {name: module.training for name, module in model.named_modules()} == modes
    for want, got in zip(before, outputs(model, x), strict=True):
        torch.testing.assert_close(got, want)


def test_model_that_is_itself_an_lstm_is_replaced():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, dropout=0.3).eval()
    x = torch.randn(9, 3, 5)
    before = outputs(lstm, x)

    optimized = fastattn.optimize(lstm)

    assert type(optimized) is fastattn_nn.LSTM
    assert not optimized.training
    assert optimized.dropout == lstm.dropout and optimized.bidirectional and optimized.num_layers == 2
    assert parameter_identities(optimized) == parameter_identities(lstm)
    for want, got in zip(before, outputs(optimized, x), strict=True):
        torch.testing.assert_close(got, want)


def test_an_optimizer_made_before_still_trains_the_optimized_model():
    torch.manual_seed(0)
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fastattn.optimize(model)
    sum(output.sum() for output in model(torch.randn(3, 9, 5))).backward()
    assert all(parameter.grad is not None for group in optimizer.param_groups for parameter in group["params"])


def test_backend_is_set_and_already_optimized_modules_are_kept():
    model = fastattn.optimize(Model(), backend="reference")
    modules = [module for module in model.modules() if isinstance(module, RECURRENT_CLASSES)]
    assert len(modules) == 4
    assert all(module.backend == "reference" for module in modules)

    assert fastattn.optimize(model) is model
    again = [module for module in model.modules() if isinstance(module, RECURRENT_CLASSES)]
    assert all(new is old for new, old in zip(again, modules, strict=True))
    assert all(module.backend is None for module in again)


def test_subclasses_of_torch_modules_are_left_alone():
    class CustomGRU(torch.nn.GRU):
        pass

    model = torch.nn.Sequential(CustomGRU(3, 4))
    fastattn.optimize(model)
    assert type(model[0]) is CustomGRU


@pytest.mark.parametrize("backend, error", [("fast", ValueError), (None, TypeError), ("CUDA", ValueError)])
def test_unknown_backend_is_rejected(backend, error):
    with pytest.raises(error, match="^backend "):
        fastattn.optimize(Model(), backend=backend)


def test_a_model_that_is_not_a_module_is_refused_by_name():
    with pytest.raises(TypeError, match="^model must be a torch.nn.Module, got str"):
        fastattn.optimize("x")


def test_a_module_under_two_names_of_one_parent_becomes_one_fastattn_module():
    gru = torch.nn.GRU(3, 4)
    for model, names in ((torch.nn.Sequential(gru, gru), (0, 1)), (torch.nn.ModuleDict({"a": gru, "b": gru}), ("a", "b"))):
        fastattn.optimize(model)
        first, second = (model[name] for name in names)
        assert type(first) is fastattn_nn.GRU and second is first


def test_hooks_buffers_and_attributes_carry_over_to_the_replacement():
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(3, 4)
    calls = []
    cell.register_forward_pre_hook(lambda module, inputs: calls.append(("pre", type(module))))
    handle = cell.register_forward_hook(lambda module, inputs, output: calls.append(("post", type(module))))
    cell.register_buffer("steps", torch.tensor(7))
    cell.note = "kept"
    model = torch.nn.Sequential(cell)

    fastattn.optimize(model)
    swapped = model[0]
    swapped(torch.randn(2, 3))

    assert calls == [("pre", fastattn_nn.LSTMCell), ("post", fastattn_nn.LSTMCell)]
    assert swapped.note == "kept" and swapped.steps is cell.steps and "0.steps" in model.state_dict()
    handle.remove()  # the torch module's handle removes the hook from its replacement
    swapped(torch.randn(2, 3))
    assert [kind for kind, _ in calls] == ["pre", "post", "pre"]
    # The torch module itself is unchanged, apart from the removed hook it shares.
    assert type(cell) is torch.nn.LSTMCell and cell.weight_ih is swapped.weight_ih
    swapped.weight_hh = torch.nn.Parameter(torch.zeros(16, 4))
    assert cell.weight_hh is not swapped.weight_hh
