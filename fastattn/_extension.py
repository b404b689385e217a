"""Loads fastattn._C, the compiled kernels, and plugs them into the backends.

Without it (``FASTATTN_SKIP_EXTENSION=1`` at install or at run time, or a failed
build), the ``"cpu"`` backend stays unavailable with the reason recorded, and
``"auto"`` runs the reference.  The ``"cuda"`` backend is plugged in when the extension
was compiled with the CUDA kernels (``build_info()["backends"]`` lists ``"cuda"``).
"""

from __future__ import annotations

import importlib
import os

import torch

from fastattn import backends

SKIP_VARIABLE = "FASTATTN_SKIP_EXTENSION"


def _load():
    if os.environ.get(SKIP_VARIABLE) == "1":
        backends.mark_unavailable("cpu", f"fastattn's C++ extension is disabled by {SKIP_VARIABLE}=1")
        return None
    try:
        module = importlib.import_module("fastattn._C")
    except ImportError as error:
        backends.mark_unavailable(
            "cpu",
            f"fastattn was built without the C++ extension ({error}); reinstall with "
            f"`pip install --no-build-isolation -e .` and without {SKIP_VARIABLE}",
        )
        return None
    from fastattn import ops

    ops.register_backend("cpu", ("cpu",))
    _register_cuda(module, ops)
    return module


def _register_cuda(module, ops) -> None:
    """The "cuda" backend, when fastattn._C was compiled with the CUDA kernels (csrc/cuda)."""
    if "cuda" in module.build_info()["backends"]:  # every CUDA op takes float16 / bfloat16 itself
        ops.register_backend("cuda", ("cuda",))
        if not torch.cuda.is_available():  # a CUDA build of torch on a machine without a GPU
            backends.mark_unavailable("cuda", "fastattn has CUDA kernels, but torch sees no CUDA device")
    else:
        backends.mark_unavailable(
            "cuda",
            "fastattn was built without CUDA kernels (they build when the installed torch has CUDA "
            "and nvcc is found; reinstall there with `pip install --no-build-isolation -e .`)",
        )


_C = _load()


def build_info() -> dict | None:
    """How fastattn._C was built, or None when it is not loaded."""
    return None if _C is None else dict(_C.build_info())


def cpu_kernels() -> tuple[str, ...] | None:
    """The instruction sets fastattn._C's CPU kernels run with on this machine ("avx512", "avx2"
    or "baseline", and "avx512_bf16" where the bfloat16 GEMMs run) and the engine of the LSTM/GRU
    layers' float32 GEMMs ("layer_gemm_blas" or "layer_gemm_brgemm" as FASTATTN_CPU_LAYER_GEMM
    sets it, else "layer_gemm_blas_for_large_steps" on Intel CPUs and "layer_gemm_brgemm"
    elsewhere), or None when it is not loaded."""
    return None if _C is None else tuple(_C.cpu_kernels())
