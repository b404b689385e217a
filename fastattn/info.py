"""``fastattn.info()``: what this installation can run, for bug reports and ``fastattn info``.

The dict holds the versions of fastattn, Python, PyTorch and Triton, which backends
are available (and why not, when they are not), the CUDA architectures the
extension was compiled for, the instruction sets its CPU kernels run with here, the
device, the backend setting in force, and the backend ``"auto"`` picks for each op on
each device type.
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from fastattn import _extension, backends

UNKNOWN_VERSION = "0.1.0+unknown"


def _installed_version(distribution: str) -> str | None:
    """The version of an installed distribution, read without importing it."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version() -> str:
    """fastattn's installed version."""
    return _installed_version("fastattn") or UNKNOWN_VERSION


# What an available backend hands elsewhere (for example a dtype it sends to the
# reference), set by the backend's loader; shown as that backend's "note".
BACKEND_NOTES: dict[str, str] = {}


def _backend_availability() -> dict[str, dict[str, object]]:
    availability = {}
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name)
        availability[name] = {"available": reason is None, "reason": reason}
        if reason is None and name in BACKEND_NOTES:
            availability[name]["note"] = BACKEND_NOTES[name]
    return availability


def _cuda_arch_list() -> list[str] | None:
    """The CUDA architectures the compiled extension was built for, if it has CUDA kernels."""
    build = _extension.build_info()
    architectures = None if build is None else build.get("cuda_arch_list")
    return architectures.replace(";", " ").split() if architectures else None


def _device_types() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def _backend_setting() -> str:
    """The setting in force; an invalid ``FASTATTN_BACKEND`` is reported, not raised."""
    try:
        return backends.current_backend()
    except ValueError as error:
        return f"invalid ({error})"


def _auto_choices() -> dict[str, dict[str, str]]:
    return {
        device_type: {op: backends.auto_choice(op, device_type) for op in backends.OPS}
        for device_type in _device_types()
    }


def info() -> dict:
    """A description of this installation (see the module docstring for the keys)."""
    return {
        "version": version(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "triton": _installed_version("triton"),
        "backends": _backend_availability(),
        "cuda_arch_list": _cuda_arch_list(),
        "extension": _extension.build_info(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernels": _extension.cpu_kernels(),
        "device": _device(),
        "backend_setting": _backend_setting(),
        "auto": _auto_choices(),
    }
