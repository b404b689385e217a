"""The Triton ops called past the dispatcher where it would add nothing.

Each Triton op is a ``torch.library.triton_op``, so that autograd, torch.compile, fake
tensors, dispatch modes and functorch transforms see it.  In a plain eager call (no
compile, no mode, no transform, no forward-mode dual level, plain tensors) the dispatcher
adds only the custom op's Python autograd wrapper, a redispatch and torch.compile's
disable frame around the same Python body, which it runs with ``wrap_triton`` off (as the
caller below does too): about 20 us of the 80 us that a bfloat16 decode step's Python
took before its launch (measured on the 2-core CI machine), while its kernel takes about
10 us on an H200; when autograd records, about 100 us more a forward (its schema's
argument handling above all).  The ops are declared with ``triton_op`` below, which
registers the op and returns its caller (``TritonOp``): the body itself in a plain call,
the op's own autograd formula around the body when autograd records (a
``torch.autograd.Function`` of the functions the op registers, ``TritonOp.register_autograd``),
and the op everywhere else; the Triton backend calls those callers.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad
from torch._library.triton import set_wrap_triton_enabled

PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(arguments, keywords) -> bool:
    """Whether nothing but autograd (if it records) needs the dispatcher for this call."""
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()  # FakeTensorMode, make_fx, user TorchDispatchModes
        or torch._C._are_functorch_transforms_active()  # vmap, grad, jacrev, ...
        or torch._C._is_torch_function_mode_enabled()
        or forward_ad._current_level >= 0  # dual tensors: the op refuses them, the body would drop the tangents
    ):
        return False
    for value in (*arguments, *keywords.values()):
        if isinstance(value, torch.Tensor) and type(value) not in PLAIN_TENSOR_TYPES:
            return False
    return True


def _records(arguments) -> bool:
    """Whether autograd records this call: grad mode on and a tensor that requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(value, torch.Tensor) and value.requires_grad for value in arguments
    )


class TritonOp:
    """A Triton op's caller (``triton_op``): in a plain eager call its body itself, with a
    recording autograd its ``torch.autograd.Function`` (``register_autograd``: the op's
    own backward and setup_context around the body, as the dispatcher's autograd kernel
    runs them, without the redispatch and the schema's argument handling: a recorded
    scaled_dot forward's Python from 138 to 65 us on the CI machine), ``torch.ops.<name>``
    everywhere else."""

    def __init__(self, name: str, body: Callable):
        functools.update_wrapper(self, body)
        self.body = body
        namespace, op_name = name.split("::")
        self.op = getattr(getattr(torch.ops, namespace), op_name).default
        self.name = name
        self.function = None  # the autograd.Function, once register_autograd has run

    def __call__(self, *arguments, **keywords):
        if not _plain_eager(arguments, keywords):
            return self.op(*arguments, **keywords)
        if _records((*arguments, *keywords.values())):
            if self.function is None or keywords:  # Function.apply takes positional arguments only
                return self.op(*arguments, **keywords)
            return self.function.apply(*arguments)
        # As the op's own eager kernel does: wrap_triton launches the kernel itself, not
        # through its higher-order op (made for tracing, ~150 us a launch in eager).
        with set_wrap_triton_enabled(False):
            return self.body(*arguments, **keywords)

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """``torch.library.register_autograd`` for the op, and the same functions around
        the body for the caller's recorded calls."""
        torch.library.register_autograd(self.name, backward, setup_context=setup_context)
        body = self.body

        # The old style, ctx first and setup_context called from forward: Function.apply binds a
        # new-style forward's arguments through inspect.signature at every call.
        def forward(ctx, *arguments):
            with set_wrap_triton_enabled(False):
                output = body(*arguments)
            setup_context(ctx, arguments, output)
            return output

        self.function = type(
            f"Direct{self.__name__}", (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )


def triton_op(name: str) -> Callable[[Callable], TritonOp]:
    """``torch.library.triton_op(name, mutates_args=())`` as a decorator that returns the
    op's caller (``TritonOp``)."""

    def register(body: Callable) -> TritonOp:
        torch.library.triton_op(name, mutates_args=())(body)
        return TritonOp(name, body)

    return register
