"""Who runs a case: fastattn's backends, the torch.compile'd reference and the peers.

:func:`implementations` lists them for one case; :func:`prepare` turns one into a
zero-argument call returning a flat list of result tensors: the outputs, then for a
forward+backward case the gradients of every leaf, taken with fixed random output
gradients (the same values for every implementation and dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastattn import backends
from fastattn.bench.cases import COMPILED_REFERENCE, REFERENCE, Case, Workload

COTANGENT_SEED = 1


@dataclass(frozen=True)
class Implementation:
    name: str  # a backend name, "reference-compiled", or a peer's label
    kind: str  # "backend" (fastattn's dispatch), "peer", or "baseline" (timed, computes something else)


def _runs(case: Case, backend_name: str, device_type: str) -> bool:
    try:
        for op in case.ops:
            backends.implementation(op, device_type, backend_name)
    except backends.BackendUnavailableError:
        return False
    return True


def runnable_backends(case: Case, device_type: str) -> list[str]:
    """The backends that are available here and implement every op of ``case`` on ``device_type``."""
    return [name for name in backends.BACKENDS if _runs(case, name, device_type)]


def implementations(case: Case, workload: Workload, device_type: str, compile_reference: bool) -> list[Implementation]:
    backend_rows = [Implementation(name, "backend") for name in runnable_backends(case, device_type)]
    compiled = [Implementation(COMPILED_REFERENCE, "peer")] if compile_reference and case.compilable else []
    peers = [Implementation(name, "peer") for name in workload.peers]
    return backend_rows + compiled + peers + [Implementation(name, "baseline") for name in workload.baselines]


def flatten(outputs: object) -> list[torch.Tensor]:
    """The tensors of nested tuples/lists of outputs, in order (``None`` entries dropped)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)):
        return [tensor for item in outputs for tensor in flatten(item)]
    return []


def cotangents(outputs: list[torch.Tensor], rounded_to: torch.dtype) -> list[torch.Tensor]:
    """Reproducible output gradients: the same values for the same shapes, whatever the dtype."""
    generator = torch.Generator().manual_seed(COTANGENT_SEED)
    return [
        torch.randn(output.shape, generator=generator).to(rounded_to).to(output.device, output.dtype)
        for output in outputs
    ]


def _with_backward(call: Callable[[], object], leaves: list[torch.Tensor], rounded_to: torch.dtype) -> Callable[[], list[torch.Tensor]]:
    """Forward, then the gradients of ``leaves`` (zeros for a leaf the outputs do not use)."""
    output_gradients: list[torch.Tensor] = []

    def forward_backward() -> list[torch.Tensor]:
        outputs = [tensor for tensor in flatten(call()) if tensor.requires_grad]
        if not output_gradients:
            output_gradients.extend(cotangents(outputs, rounded_to))
        gradients = torch.autograd.grad(outputs, leaves, output_gradients, allow_unused=True)
        return outputs + [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, gradients)]

    return forward_backward


def _on_backend(name: str, function: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with backends.backend(name):
            return function()

    return call


def prepare(case: Case, workload: Workload, implementation: Implementation, rounded_to: torch.dtype) -> Callable[[], list[torch.Tensor]]:
    """The call to time for ``implementation``; ``rounded_to`` is the dtype of the run (for the
    output gradients).  Compiling happens at the first call."""
    if implementation.kind == "backend":
        call = _on_backend(implementation.name, workload.run)
    elif implementation.name == COMPILED_REFERENCE:
        torch.compiler.reset()  # a fresh cache per case, so no case meets the recompile limit
        call = _on_backend(REFERENCE, torch.compile(workload.run))
    else:
        call = {**workload.peers, **workload.baselines}[implementation.name]
    if case.backward:
        return _with_backward(call, workload.leaves, rounded_to)
    return lambda: flatten(call())
