"""``fastattn.optimize(model)``: swap a model's torch.nn recurrent modules for fastattn's.

Every ``torch.nn.LSTM``, ``LSTMCell``, ``GRU`` and ``GRUCell`` in the model (the
model itself included) is replaced by its ``fastattn.nn`` namesake, built with the
same configuration and holding the very same ``Parameter`` objects, so optimizers,
tied weights and the ``state_dict`` are unaffected and outputs do not change.
Subclasses of those torch classes are left alone (their ``forward`` may differ);
fastattn modules already present only get the new backend.
"""

from __future__ import annotations

import warnings

import torch

from fastattn import backends
from fastattn.nn import recurrent

_FASTATTN_CLASS = {
    torch.nn.LSTM: recurrent.LSTM,
    torch.nn.GRU: recurrent.GRU,
    torch.nn.LSTMCell: recurrent.LSTMCell,
    torch.nn.GRUCell: recurrent.GRUCell,
}
_FASTATTN_CLASSES = tuple(_FASTATTN_CLASS.values())


def optimize(model: torch.nn.Module, *, backend: str = "auto") -> torch.nn.Module:
    """Swap ``model``'s torch.nn LSTM/LSTMCell/GRU/GRUCell modules in place for
    fastattn's, sharing their parameters, and return the model.

    ``backend="auto"`` lets each module follow the setting in force
    (``fastattn.set_backend`` and friends); a backend name pins it.  When ``model``
    is itself one of those modules, the returned module is its replacement.
    """
    if backend not in backends.CHOICES:
        raise ValueError(f"backend must be one of {backends.CHOICES}, got {backend!r}")
    module_backend = None if backend == "auto" else backend
    replacements: dict[int, torch.nn.Module] = {}  # id(original) -> its swap, for shared modules

    def swapped(module: torch.nn.Module) -> torch.nn.Module:
        if isinstance(module, _FASTATTN_CLASSES):
            module.backend = module_backend
            return module
        if type(module) not in _FASTATTN_CLASS:
            return module
        if id(module) not in replacements:
            replacements[id(module)] = _fastattn_twin(module, module_backend)
        return replacements[id(module)]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            setattr(parent, name, swapped(child))
    return swapped(model)


def _fastattn_twin(module: torch.nn.Module, backend: str | None) -> torch.nn.Module:
    """The fastattn module of ``module``'s class and configuration, holding its parameters."""
    with warnings.catch_warnings():  # torch already warned about this configuration
        warnings.simplefilter("ignore")
        twin = _FASTATTN_CLASS[type(module)](**_configuration(module), device="meta")
    for name, parameter in module.named_parameters(recurse=False):
        setattr(twin, name, parameter)  # RNNBase also updates its flat weight list
    twin.train(module.training)
    twin.backend = backend
    return twin


def _configuration(module: torch.nn.Module) -> dict:
    """The constructor arguments ``module`` was built with."""
    if isinstance(module, torch.nn.RNNCellBase):
        return {"input_size": module.input_size, "hidden_size": module.hidden_size, "bias": module.bias}
    configuration = {
        "input_size": module.input_size,
        "hidden_size": module.hidden_size,
        "num_layers": module.num_layers,
        "bias": module.bias,
        "batch_first": module.batch_first,
        "dropout": module.dropout,
        "bidirectional": module.bidirectional,
    }
    if isinstance(module, torch.nn.LSTM):
        configuration["proj_size"] = module.proj_size
    return configuration
