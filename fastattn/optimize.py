"""``fastattn.optimize(model)``: swap a model's torch.nn recurrent modules for fastattn's.

Every ``torch.nn.LSTM``, ``LSTMCell``, ``GRU`` and ``GRUCell`` in the model (the
model itself included) is replaced by its ``fastattn.nn`` namesake: a shallow copy of
it as an instance of the fastattn class, so it holds the very same ``Parameter`` and
buffer objects and every attribute (optimizers, tied weights and the ``state_dict`` are
unaffected and outputs do not change), and the same hook dictionaries (hooks
registered on the torch module run on its replacement, and their handles remove them
there).  A module reachable under several names is replaced by one module under all of
them.  Subclasses of those torch classes are left alone (their ``forward`` may
differ); fastattn modules already present only get the new backend.
"""

from __future__ import annotations

import copy

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
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backends.check_name(backend, "backend")
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
        # _modules, not named_children(): that skips a module's second name under a parent.
        for name, child in list(parent._modules.items()):
            if child is not None:
                setattr(parent, name, swapped(child))
    return swapped(model)


def _fastattn_twin(module: torch.nn.Module, backend: str | None) -> torch.nn.Module:
    """``module`` as an instance of its fastattn namesake: the same attributes, with its
    own containers (parameter, buffer and submodule dictionaries, RNNBase's weight lists)
    but the torch module's hook dictionaries."""
    twin = _FASTATTN_CLASS[type(module)].__new__(_FASTATTN_CLASS[type(module)])
    for name, value in vars(module).items():
        own_container = isinstance(value, (dict, list, set)) and "hook" not in name
        vars(twin)[name] = copy.copy(value) if own_container else value
    twin.backend = backend
    if getattr(module, "_compiled_call_impl", None) is not None:
        twin.compile()  # module.compile()'s compiled call is bound to the torch module
    return twin
