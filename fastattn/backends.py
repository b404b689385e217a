"""Backend selection: the one place that decides which implementation runs an op.

Every op (``attention``, ``lstm_cell``, ...) has a reference implementation in
``fastattn.reference``; the C++, Triton and CUDA backends register faster ones
with :func:`register`.  Callers ask :func:`implementation` for the function to
run given the op name and the device of its tensors, and never name a backend
themselves.

The backend in force is, in order of precedence: the calling thread's
innermost ``with fastattn.backend(name):`` block, the last ``fastattn.set_backend(name)``,
the ``FASTATTN_BACKEND`` environment variable, and ``"auto"``.  ``"auto"``
takes the first available backend in :data:`AUTO_ORDER` that implements the op
for the device; naming a backend explicitly raises :class:`BackendUnavailableError`
when it cannot run the op, instead of falling back.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.autograd.forward_ad as forward_ad

BACKENDS = ("reference", "cpu", "triton", "cuda")
CHOICES = BACKENDS + ("auto",)
OPS = (
    "attention",
    "additive_attention",
    "hard_attention",
    "scaled_dot_product_attention",
    "lstm_cell",
    "gru_cell",
    "lstm_layer",
    "gru_layer",
)
# Ops that fuse a sequence of the ops above.  A backend without a kernel for one runs
# the sequence instead (the caller composes it), so callers ask :func:`fused`, which
# answers None rather than raising.
FUSED_OPS = ("attention_decoder_step",)
# "auto" tries these in order for tensors on each device type.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
ENVIRONMENT_VARIABLE = "FASTATTN_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The backend that was asked for cannot run this op on these tensors."""


@dataclass(frozen=True)
class Implementation:
    function: Callable
    device_types: frozenset[str] | None  # None: any device (the reference)


_implementations: dict[str, dict[str, Implementation]] = {op: {} for op in OPS + FUSED_OPS}
# Why a backend cannot run here; a backend absent from this dict is available.
_unavailable_reasons: dict[str, str] = {
    "cpu": "fastattn was built without the C++ extension (fastattn._C is missing)",
    "triton": "fastattn has no Triton kernels registered",
    "cuda": "fastattn was built without CUDA kernels",
}
_session_backend: str | None = None


class _ThreadScopes(threading.local):
    """Thread-local, as torch.no_grad is; a threading.local (not a ContextVar) so that
    torch.compile can read it and guard on it in the thread calling the compiled code."""

    def __init__(self) -> None:
        # This thread's settings of the enclosing ``with backend(...)`` blocks, innermost
        # last, each in a one-item list of its own that the block removes by identity on
        # exit (a generator's block may end after its caller's).
        self.backends: list[list[str]] = []


_scopes = _ThreadScopes()


def check_name(name: object, argument: str = "name") -> str:
    """A backend name of CHOICES: TypeError for another type, ValueError else."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be one of {CHOICES}, got {name!r}")
    if name not in CHOICES:
        raise ValueError(f"{argument} must be one of {CHOICES}, got {name!r}")
    return name


def register(op: str, backend: str, device_types: tuple[str, ...] | None) -> Callable:
    """Decorator: ``fn`` runs ``op`` on ``backend`` for tensors on ``device_types``
    (``None``: on any device)."""
    if op not in _implementations:
        raise ValueError(f"op must be one of {OPS + FUSED_OPS}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def decorate(function: Callable) -> Callable:
        types = None if device_types is None else frozenset(device_types)
        _implementations[op][backend] = Implementation(function, types)
        return function

    return decorate


def in_autocast_dtype(function: Callable, float64_to: Callable | None = None) -> Callable:
    """``function`` as a backend function without autocast kernels of its own runs it (the
    reference's, the Triton backend's): inside ``torch.autocast`` on its floating tensors
    cast to the autocast dtype (float64 passes; local-p centers, positions, go to float32)
    and with autocast off, so that it returns the autocast dtype as the C++ and CUDA ops'
    autocast kernels (csrc/autocast.cpp) make theirs do.  The casts go through torch's
    autocast cache (``torch.ops.fastattn.autocast_cast``, with the C++ extension loaded):
    a float32 parameter is cast once per autocast region, not at every step of a decoder,
    as torch's own layers do; while ``torch.compile`` traces, and without the extension,
    they are plain ``.to`` casts.  ``float64_to``: where a call with a float64 tensor goes
    instead (the Triton backend's, whose kernels take none), found in the same pass over
    the arguments, which is all an eager call outside autocast pays."""

    tensor, float64 = torch.Tensor, torch.float64

    @functools.wraps(function)
    def run(*arguments, **keywords):
        device_type = None
        for value in (*arguments, *keywords.values()):
            if isinstance(value, tensor):
                if float64_to is not None and value.dtype == float64:
                    return float64_to(*arguments, **keywords)
                device_type = device_type or value.device.type
                if float64_to is None:
                    break
        # Meta tensors have no autocast (is_autocast_enabled raises for them; torch 2.11's
        # dynamo cannot trace torch.amp.is_autocast_available).
        if device_type in (None, "meta") or not torch.is_autocast_enabled(device_type):
            return function(*arguments, **keywords)
        dtype = torch.get_autocast_dtype(device_type)
        cached_cast = None if torch.compiler.is_compiling() else getattr(torch.ops.fastattn, "autocast_cast", None)

        def cast(value):
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()) or value.dtype == torch.float64:
                return value
            return value.to(dtype) if cached_cast is None else cached_cast(value)

        arguments = [cast(a) for a in arguments]
        keywords = {
            name: value.float() if name == "center" and value is not None and value.dtype != torch.float64
            else cast(value)
            for name, value in keywords.items()
        }
        with torch.autocast(device_type, enabled=False):  # cast above, inside autocast: cached
            return function(*arguments, **keywords)

    return run


def mark_available(backend: str) -> None:
    """Called by a backend's loader once its kernels are importable and usable."""
    _unavailable_reasons.pop(backend, None)


def mark_unavailable(backend: str, reason: str) -> None:
    _unavailable_reasons[backend] = reason


def unavailable_reason(backend: str) -> str | None:
    """``None`` when ``backend`` can run here, else why it cannot."""
    return None if backend == "reference" else _unavailable_reasons.get(backend)


def set_backend(name: str) -> None:
    """Use ``name`` for every following call, over ``FASTATTN_BACKEND`` (``"auto"``: the
    fastest available backend per op, whatever the environment variable says)."""
    global _session_backend
    _session_backend = check_name(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with fastattn.backend("reference"): ...`` runs the block on that backend.  The
    setting applies to the calling thread only, as torch.no_grad's does."""
    scope = [check_name(name)]
    scopes = _scopes.backends
    scopes.append(scope)
    try:
        yield
    finally:
        del scopes[next(i for i, entry in enumerate(scopes) if entry is scope)]


def current_backend() -> str:
    """The backend setting in force here (possibly ``"auto"``)."""
    if _scopes.backends:
        return _scopes.backends[-1][0]
    if _session_backend is not None:
        return _session_backend
    from_environment = os.environ.get(ENVIRONMENT_VARIABLE)
    if from_environment:
        return check_name(from_environment, ENVIRONMENT_VARIABLE)
    return "auto"


def _runs_on(found: Implementation, device_type: str) -> bool:
    return found.device_types is None or device_type in found.device_types


def _runs(op: str, backend_name: str, device_type: str) -> bool:
    found = _implementations[op].get(backend_name)
    return (
        found is not None
        and _runs_on(found, device_type)
        and unavailable_reason(backend_name) is None
    )


def auto_choice(op: str, device_type: str) -> str:
    """The backend ``"auto"`` picks for ``op`` on tensors of ``device_type``."""
    for candidate in AUTO_ORDER.get(device_type, ("reference",)):
        if _runs(op, candidate, device_type):
            return candidate
    return "reference"


def kernels_cannot_differentiate(tensors: Iterable[object]) -> bool:
    """Whether one of ``tensors`` (other objects are skipped) is under an autograd the
    kernel ops' C++ autograd cannot run, the reference's PyTorch can: a torch.func
    transform wraps it (grad, vjp, jvp, jacrev, hessian, vmap, ...; torch refuses C++
    autograd Functions there) or it carries a forward-mode tangent
    (torch.autograd.forward_ad; C++ autograd Functions have no jvp).  With neither in
    force (one look at functorch's interpreter stack and at the dual level) the tensors
    are not read.  While torch.compile traces, the tensors are not read either (dynamo
    cannot trace functorch's tensor queries): a transform traced with the function
    (``torch.compile(torch.func.grad(f))``) runs the reference for every op inside it, and
    the graphs hold the kernel ops elsewhere.  (Dynamo answers _are_functorch_transforms_active
    as eager does; peek_interpreter_stack is never None while it traces.)"""
    if torch.compiler.is_compiling():
        return torch._C._are_functorch_transforms_active()
    functorch = torch._C._functorch.peek_interpreter_stack() is not None
    dual = forward_ad._current_level >= 0
    if not (functorch or dual):
        return False
    return any(
        isinstance(t, torch.Tensor)
        and ((functorch and torch._C._functorch.is_functorch_wrapped_tensor(t))
             or (dual and forward_ad.unpack_dual(t).tangent is not None))
        for t in tensors
    )


def implementation(op: str, device_type: str, name: str | None = None, inputs: Iterable[object] = ()) -> Callable:
    """The function that runs ``op`` for tensors on ``device_type``.

    ``name`` overrides the backend setting in force (used by ``optimize``).  When the
    kernels cannot differentiate one of ``inputs`` (the op's tensors: under a torch.func
    transform or with a forward-mode tangent), the reference runs.
    """
    if kernels_cannot_differentiate(inputs):
        name = "reference"
    chosen = check_name(name, "backend") if name is not None else current_backend()
    if chosen == "auto":
        chosen = auto_choice(op, device_type)
    found = _implementations[op].get(chosen)
    reason = unavailable_reason(chosen)
    if found is not None and reason is None and _runs_on(found, device_type):  # the common case first
        return found.function
    if reason is not None:
        problem = f"backend {chosen!r} is not available: {reason}"
    elif found is None:
        problem = f"backend {chosen!r} has no kernel for op {op!r}"
    else:
        problem = f"backend {chosen!r} runs {op!r} on {sorted(found.device_types)} tensors, got {device_type} tensors"
    runnable = [name for name in _implementations[op] if _runs(op, name, device_type)]
    raise BackendUnavailableError(f"{problem} ({op!r} on {device_type} tensors runs here on: {', '.join(runnable)})")


def fused(op: str, device_type: str, inputs: Iterable[object] = ()) -> Callable | None:
    """The fused kernel for ``op`` (one of :data:`FUSED_OPS`) of the backend in force,
    or None when that backend has none for ``device_type`` or the kernels cannot
    differentiate one of ``inputs`` (the caller then composes)."""
    if kernels_cannot_differentiate(inputs):
        return None
    chosen = current_backend()
    if chosen == "auto":
        chosen = auto_choice(op, device_type)
    return _implementations[op][chosen].function if _runs(op, chosen, device_type) else None
