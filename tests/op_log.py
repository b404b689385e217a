"""A dispatch mode that records the ops a block of code sends to torch."""

from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """The names of the ops that reach the dispatcher's Python modes (``aten::view``,
    ``fastattn::attention_forward``, ...), in order."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))
