"""The Triton ops called past the dispatcher where it would add nothing.

Each Triton op is a ``torch.library.triton_op``, so that autograd, torch.compile, fake
tensors, dispatch modes and functorch transforms see it.  In a plain eager call (no
graph to record, no compile, no mode, no transform, no forward-mode dual level, plain
tensors) the dispatcher adds only the custom op's Python autograd wrapper, a redispatch
and torch.compile's disable frame around the same Python body, which it runs with
``wrap_triton`` off (as the caller below does too): about 20 us of the 80 us that a
bfloat16 decode step's Python took before its launch (measured on the 2-core CI machine),
while its kernel takes about 10 us on an H200.  The ops are declared with
``triton_op`` below, which registers the op and returns a function that runs the body
directly there, and the op everywhere else; the Triton backend calls those functions.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad
from torch._library.triton import set_wrap_triton_enabled

PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(arguments, keywords) -> bool:
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()  # FakeTensorMode, make_fx, user TorchDispatchModes
        or torch._C._are_functorch_transforms_active()  # vmap, grad, jacrev, ...
        or torch._C._is_torch_function_mode_enabled()
        or forward_ad._current_level >= 0  # dual tensors: the op refuses them, the body would drop the tangents
    ):
        return False
    recording = torch.is_grad_enabled()
    for value in (*arguments, *keywords.values()):
        if isinstance(value, torch.Tensor) and (
            type(value) not in PLAIN_TENSOR_TYPES or (recording and value.requires_grad)
        ):
            return False
    return True


def triton_op(name: str) -> Callable[[Callable], Callable]:
    """``torch.library.triton_op(name, mutates_args=())`` as a decorator that returns the
    op's caller: the body itself in a plain eager call, ``torch.ops.<name>`` otherwise."""

    def register(body: Callable) -> Callable:
        torch.library.triton_op(name, mutates_args=())(body)
        namespace, op_name = name.split("::")
        op = getattr(getattr(torch.ops, namespace), op_name).default

        @functools.wraps(body)
        def caller(*arguments, **keywords):
            if not _plain_eager(arguments, keywords):
                return op(*arguments, **keywords)
            # As the op's own eager kernel does: wrap_triton launches the kernel itself, not
            # through its higher-order op (made for tracing, ~150 us a launch in eager).
            with set_wrap_triton_enabled(False):
                return body(*arguments, **keywords)

        return caller

    return register
