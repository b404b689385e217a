"""Builds csrc/cuda's kernels for the CPU emulation (emulate.h) and calls them through
ctypes, for tests/test_cuda_kernels.py on machines without a GPU.

build(directory) rewrites each ../*.cu for the host compiler (kernel launches become
fastattn_emulate_launch calls, the dynamic shared array a pointer into the emulated
shared memory), compiles them with runtime.cpp (g++, C++20 for std::barrier) and loads
the library.  The ctypes structures mirror csrc/cuda/launch.h field for field;
attention_forward / attention_backward allocate outputs and scratch as
csrc/cuda/binding.cpp does and launch the kernels on CPU tensors.
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CUDA_DIRECTORY = HERE.parent
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SCORES = {"dot": 0, "cosine": 1, "additive": 2}
MULTIPROCESSORS = 132  # an H200's, for the choice of key splits


def toolkit_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h), or None."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    for root in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (root / "include" / "cuda_runtime.h").exists():
            return root / "include"
    return None


def host_source(cuda_source: str) -> str:
    """A .cu file's text for the host compiler under emulate.h."""
    launches = re.compile(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
    text = launches.sub(lambda match: f"fastattn_emulate_launch({match[1]}, {match[2]}, ", cuda_source)
    return text.replace("extern __shared__ __align__(16) unsigned char shared_bytes[];",
                        "unsigned char* shared_bytes = emu_shared_bytes;")


def build(directory: Path) -> ctypes.CDLL:
    include = toolkit_include()
    if include is None or shutil.which("g++") is None:
        raise RuntimeError("the emulation needs g++ and the CUDA toolkit's headers")
    directory.mkdir(parents=True, exist_ok=True)
    sources = [HERE / "runtime.cpp"]
    for cuda_source in sorted(CUDA_DIRECTORY.glob("*.cu")):
        rewritten = directory / f"{cuda_source.stem}.cpp"
        rewritten.write_text(host_source(cuda_source.read_text()))
        sources.append(rewritten)
    flags = ["-std=c++20", "-O1", "-pthread", "-fPIC", "-w", f"-I{include}", f"-I{CUDA_DIRECTORY}",
             f"-I{CUDA_DIRECTORY.parent}", "-include", str(HERE / "emulate.h")]

    def compile_one(source: Path) -> Path:
        target = directory / f"{source.stem}.o"
        subprocess.run(["nice", "-n", "10", "g++", *flags, "-c", str(source), "-o", str(target)], check=True,
                       capture_output=True, text=True)
        return target

    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(compile_one, sources))
    library = directory / "libfastattn_emulated.so"
    subprocess.run(["g++", "-shared", "-pthread", *map(str, objects), "-o", str(library)], check=True)
    return _declare(ctypes.CDLL(str(library)))


class AttentionProblem(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("score", ctypes.c_int), ("batch", ctypes.c_int64),
                ("query_length", ctypes.c_int64), ("source_length", ctypes.c_int64), ("score_dim", ctypes.c_int64),
                ("value_dim", ctypes.c_int64), ("query", ctypes.c_void_p), ("keys", ctypes.c_void_p),
                ("keys_batch_stride", ctypes.c_int64), ("values", ctypes.c_void_p),
                ("values_batch_stride", ctypes.c_int64), ("v", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("scale", ctypes.c_double), ("lengths", ctypes.c_void_p), ("key_padding_mask", ctypes.c_void_p),
                ("causal", ctypes.c_bool), ("window", ctypes.c_int64), ("center", ctypes.c_void_p),
                ("gaussian", ctypes.c_bool)]


class AttentionForwardBuffers(ctypes.Structure):
    _fields_ = [("context", ctypes.c_void_p), ("logsumexp", ctypes.c_void_p), ("scores", ctypes.c_void_p),
                ("weights", ctypes.c_void_p), ("splits", ctypes.c_int64), ("partial_context", ctypes.c_void_p),
                ("partial_max", ctypes.c_void_p), ("partial_sum", ctypes.c_void_p)]


class AttentionBackwardBuffers(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "grad_context", "grad_weights", "logsumexp", "grad_query", "grad_keys", "grad_values", "grad_center",
        "grad_v_rows", "row_dot")]


class RecurrentStep(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("batch", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("lengths", ctypes.c_void_p), ("time", ctypes.c_int64)]


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "emu_attention_forward_splits": [pointer, ctypes.c_int],
        "emu_attention_forward": [pointer, pointer],
        "emu_attention_backward": [pointer, pointer],
        "emu_sample_positions": [ctypes.c_int, pointer, size, size, pointer, pointer],
        "emu_fast_tanh": [pointer, pointer, size],
        "emu_lstm_step_forward": [pointer, pointer, size, pointer, pointer, pointer, pointer, pointer, pointer, pointer],
        "emu_lstm_step_backward": [pointer, pointer, pointer, pointer, pointer, size, pointer, size, pointer, size,
                                   pointer],
        "emu_gru_step_forward": [pointer, pointer, pointer, pointer, pointer, pointer, pointer],
        "emu_gru_step_backward": [pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer],
        "emu_take_recurrent_gradient": [pointer, pointer, pointer, pointer],
    }
    for name, arguments in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, ctypes.c_int
    return library


def address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_problem(keep: list, query, keys, values, v, bias, score, scale, lengths, key_padding_mask, causal,
                      window, center, gaussian) -> AttentionProblem:
    """The launch.h problem of the op's arguments (CPU tensors); `keep` holds the
    tensors the pointers point into."""
    keys = keys if keys.shape[0] > 1 and keys.stride(0) == 0 else keys.contiguous()
    tensors = [query.contiguous(), keys, values.contiguous(), v, bias,
               None if lengths is None else lengths.to(torch.int64).contiguous(),
               None if key_padding_mask is None else key_padding_mask.contiguous(),
               None if center is None else center.to(accumulation_dtype(query.dtype)).contiguous()]
    keep.extend(tensors)
    query, keys, values, v, bias, lengths, key_padding_mask, center = tensors
    return AttentionProblem(
        DTYPES[query.dtype], SCORES[score], query.shape[0], query.shape[1], keys.shape[1], query.shape[2],
        values.shape[2], address(query), address(keys), keys.stride(0), address(values), values.stride(0),
        address(v), address(bias), scale, address(lengths), address(key_padding_mask), causal,
        -1 if window is None else window, address(center), gaussian)


def attention_forward(library, arguments, return_weights):
    """(context, weights or None, logsumexp, splits), allocated as binding.cpp does."""
    keep: list = []
    problem = attention_problem(keep, *arguments)
    dtype = arguments[0].dtype
    accumulate = accumulation_dtype(dtype)
    rows, source_length, value_dim = problem.batch * problem.query_length, problem.source_length, problem.value_dim
    context = torch.empty(problem.batch, problem.query_length, value_dim, dtype=dtype)
    logsumexp = torch.empty(problem.batch, problem.query_length, dtype=accumulate)
    buffers = AttentionForwardBuffers(address(context), address(logsumexp), None, None, 1, None, None, None)
    weights = None
    if return_weights:
        weights = torch.empty(problem.batch, problem.query_length, source_length, dtype=dtype)
        scores = torch.full((problem.batch, problem.query_length, source_length), -math.inf, dtype=accumulate)
        keep.append(scores)
        buffers.weights, buffers.scores = address(weights), address(scores)
    buffers.splits = library.emu_attention_forward_splits(ctypes.byref(problem), MULTIPROCESSORS)
    if buffers.splits > 1:
        partial_context = torch.empty(rows, buffers.splits, value_dim, dtype=accumulate)
        partial_max = torch.empty(rows, buffers.splits, dtype=accumulate)
        partial_sum = torch.empty(rows, buffers.splits, dtype=accumulate)
        keep.extend([partial_context, partial_max, partial_sum])
        buffers.partial_context = address(partial_context)
        buffers.partial_max, buffers.partial_sum = address(partial_max), address(partial_sum)
    status = library.emu_attention_forward(ctypes.byref(problem), ctypes.byref(buffers))
    if status != 0:
        raise RuntimeError(f"launch_attention_forward returned {status}")
    return context, weights, logsumexp, buffers.splits


def attention_backward(library, grad_context, grad_weights, arguments, logsumexp):
    """The six gradients of attention_backward (None where the op returns an empty one)."""
    keep: list = []
    problem = attention_problem(keep, *arguments)
    query, score, center, gaussian = arguments[0], arguments[5], arguments[11], arguments[12]
    dtype, accumulate = query.dtype, accumulation_dtype(query.dtype)
    batch, steps = problem.batch, problem.query_length
    additive, wants_center = score == "additive", gaussian and center is not None
    grad_query = torch.empty(batch, steps, problem.score_dim, dtype=dtype)
    grad_keys = torch.empty(batch, problem.source_length, problem.score_dim, dtype=dtype)
    grad_values = torch.empty(batch, problem.source_length, problem.value_dim, dtype=dtype)
    grad_center = torch.empty(batch, steps, dtype=accumulate) if wants_center else None
    grad_v_rows = torch.empty(batch, steps, problem.score_dim, dtype=accumulate) if additive else None
    row_dot = torch.empty(batch, steps, dtype=accumulate)
    grad_context = grad_context.contiguous()
    grad_weights = None if grad_weights is None else grad_weights.contiguous()
    keep.extend([grad_context, grad_weights, logsumexp])
    buffers = AttentionBackwardBuffers(
        address(grad_context), address(grad_weights), address(logsumexp), address(grad_query), address(grad_keys),
        address(grad_values), address(grad_center), address(grad_v_rows), address(row_dot))
    status = library.emu_attention_backward(ctypes.byref(problem), ctypes.byref(buffers))
    if status != 0:
        raise RuntimeError(f"launch_attention_backward returned {status}")
    grad_v = grad_v_rows.sum((0, 1)).to(dtype) if additive else None
    grad_bias = grad_query.to(accumulate).sum((0, 1)).to(dtype) if additive and arguments[4] is not None else None
    return grad_query, grad_keys, grad_values, grad_v, grad_bias, None if grad_center is None else grad_center.to(dtype)


def recurrent_step(dtype, batch, hidden, lengths, time) -> RecurrentStep:
    return RecurrentStep(1 if dtype == torch.float64 else 0, batch, hidden, address(lengths), time)
