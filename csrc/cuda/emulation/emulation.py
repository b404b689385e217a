"""Builds csrc/cuda's kernels for the CPU emulation (emulate.h) and calls them through
ctypes, for tests/test_cuda_kernels.py on machines without a GPU.

build(directory) rewrites each ../*.cu for the host compiler (kernel launches become
fastattn_emulate_launch calls, the dynamic shared array a pointer into the emulated
shared memory), compiles them with runtime.cpp (g++, C++20 for std::barrier) and loads
the library.  The ctypes structures mirror csrc/cuda/launch.h field for field;
attention_forward / attention_backward, hard_attention_outputs / _backward,
persistent_layer_forward / _backward and decoder_step allocate outputs and scratch as
csrc/cuda/binding.cpp does and launch the kernels on CPU tensors.
"""

from __future__ import annotations

import ctypes
import math
import os
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
    text = text.replace("cudaLaunchCooperativeKernel(", "fastattn_emulate_cooperative_launch(")
    return text.replace("extern __shared__ __align__(16) unsigned char shared_bytes[];",
                        "unsigned char* shared_bytes = emu::state.shared_memory;")


def build(directory: Path) -> ctypes.CDLL:
    include = toolkit_include()
    if include is None or shutil.which("g++") is None:
        raise RuntimeError("the emulation needs g++ and the CUDA toolkit's headers")
    directory.mkdir(parents=True, exist_ok=True)
    sources = [HERE / "runtime.cpp", HERE / "decoder_step_entry.cpp"]
    for cuda_source in sorted(CUDA_DIRECTORY.glob("*.cu")):
        rewritten = directory / f"{cuda_source.stem}.cpp"
        rewritten.write_text(host_source(cuda_source.read_text()))
        sources.append(rewritten)
    flags = ["-std=c++20", "-O1", "-pthread", "-fPIC", "-w", f"-I{include}", f"-I{CUDA_DIRECTORY}",
             f"-I{CUDA_DIRECTORY.parent}", "-include", str(HERE / "emulate.h")]
    # csrc/sanitize_check.sh: the kernels under AddressSanitizer and UBSan (their runtimes preloaded)
    sanitize = ["-fsanitize=address,undefined"] if os.environ.get("FASTATTN_SANITIZE") == "1" else []
    if sanitize:
        flags += ["-g", "-fno-omit-frame-pointer", *sanitize]

    def compile_one(source: Path) -> Path:
        target = directory / f"{source.stem}.o"
        subprocess.run(["nice", "-n", "10", "g++", *flags, "-c", str(source), "-o", str(target)], check=True,
                       capture_output=True, text=True)
        return target

    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(compile_one, sources))
    library = directory / "libfastattn_emulated.so"
    # -Bsymbolic: the library's calls reach its own cuda* stand-ins even in a process where
    # torch has loaded the real CUDA runtime (a CUDA build of torch on a machine without a GPU).
    subprocess.run(["g++", "-shared", "-pthread", *sanitize, "-Wl,-Bsymbolic", *map(str, objects), "-o", str(library)],
                   check=True)
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
    _fields_ = [*[(name, ctypes.c_void_p) for name in (
        "grad_context", "grad_weights", "logsumexp", "grad_query", "grad_keys", "grad_values", "grad_center",
        "grad_v_rows", "row_dot", "row_terms")], ("splits", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in ("partial_row_terms", "partial_grad_query", "partial_grad_v")],
        ("values_are_keys", ctypes.c_bool)]


class RecurrentStep(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("batch", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("lengths", ctypes.c_void_p), ("time", ctypes.c_int64), ("storage", ctypes.c_int)]


class PersistentPlan(ctypes.Structure):
    _fields_ = [("blocks", ctypes.c_int), ("threads", ctypes.c_int), ("units_per_block", ctypes.c_int64),
                ("shared_bytes", ctypes.c_int64)]


class PersistentLayer(ctypes.Structure):
    _fields_ = [("steps", ctypes.c_int64), ("batch", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("lengths", ctypes.c_void_p), ("reverse", ctypes.c_bool), ("operand", ctypes.c_int),
                ("w_hh", ctypes.c_void_p), ("barrier", ctypes.c_void_p)]


class PersistentForwardBuffers(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "b_ih", "b_hh", "saved", "output", "h_state", "c_state", "h_scratch", "h_operand")]


class PersistentBackwardBuffers(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "grad_output", "saved", "c0", "previous_h", "grad_h", "grad_c", "grad_gates", "grad_input_gates", "direct",
        "gate_operand")]


CELLS = {"lstm": 0, "gru": 1}
SHARED_BYTES_PER_BLOCK = 227 * 1024  # an H200's opt-in limit


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "emu_opt_in_shared_bytes": [size, size],
        "emu_attention_forward_splits": [pointer, ctypes.c_int],
        "emu_attention_forward": [pointer, pointer],
        "emu_row_terms_elements": [ctypes.c_int],
        "emu_attention_backward": [pointer, pointer],
        "emu_attention_tensor_core_supported": [pointer],
        "emu_attention_forward_tensor_core": [pointer, pointer],
        "emu_attention_backward_tensor_core": [pointer, pointer, pointer],
        "emu_sample_positions": [ctypes.c_int, pointer, size, size, pointer, pointer],
        "emu_hard_attention_outputs": [pointer, pointer, pointer, pointer, pointer, pointer, pointer],
        "emu_hard_attention_outputs_backward": [pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                                                pointer],
        "emu_fast_tanh": [pointer, pointer, size],
        "emu_lstm_step_forward": [pointer, pointer, size, pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                                  pointer, pointer],
        "emu_lstm_step_backward": [pointer, pointer, pointer, pointer, pointer, size, pointer, size, pointer, size,
                                   pointer],
        "emu_gru_step_forward": [pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer],
        "emu_gru_step_backward": [pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer],
        "emu_take_recurrent_gradient": [pointer, pointer, pointer, pointer],
        "emu_persistent_recurrent_plan": [ctypes.c_int, ctypes.c_bool, ctypes.c_int, size, size, ctypes.c_int, size,
                                          pointer],
        "emu_persistent_recurrent_plan_on_device": [ctypes.c_int, ctypes.c_bool, ctypes.c_int, size, size, pointer],
        **{f"emu_persistent_{cell}_{direction}": [pointer, pointer, pointer]
           for cell in CELLS for direction in ("forward", "backward")},
        "emu_decoder_step_plan": [pointer, ctypes.c_int, size, pointer],
        "emu_decoder_step_plan_on_device": [pointer, pointer],
        "emu_decoder_step": [pointer, pointer, pointer],
    }
    for name, arguments in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, ctypes.c_int
    return library


def address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def with_contiguous_rows(tensor: torch.Tensor) -> torch.Tensor:
    """binding.cpp's with_contiguous_rows: an (N, S, D) tensor as it is when its rows are
    contiguous (any batch stride, 0 included), else a copy with contiguous rows."""
    batch, rows, dim = tensor.shape
    if (dim <= 1 or tensor.stride(2) == 1) and (rows <= 1 or tensor.stride(1) == dim):
        return tensor
    if batch > 1 and tensor.stride(0) == 0:
        return tensor[0].contiguous().unsqueeze(0).expand(tensor.shape)
    return tensor.contiguous()


def attention_problem(keep: list, query, keys, values, v, bias, score, scale, lengths, key_padding_mask, causal,
                      window, center, gaussian) -> AttentionProblem:
    """The launch.h problem of the op's arguments (CPU tensors), laid out as binding.cpp
    lays them out; `keep` holds the tensors the pointers point into."""
    keys = with_contiguous_rows(keys.expand(query.shape[0], *keys.shape[1:]))
    tensors = [query.contiguous(), keys, with_contiguous_rows(values), None if v is None else v.contiguous(),
               None if bias is None else bias.contiguous(),
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


def attention_forward_tensor_core(library, arguments):
    """(context, logsumexp) of the tensor-core forward (attention_tensor_core.cu), or
    None when attention_tensor_core_supported refuses the problem."""
    keep: list = []
    problem = attention_problem(keep, *arguments)
    if not library.emu_attention_tensor_core_supported(ctypes.byref(problem)):
        return None
    context = torch.full((problem.batch, problem.query_length, problem.value_dim), math.nan, dtype=arguments[0].dtype)
    logsumexp = torch.full((problem.batch, problem.query_length), math.nan)  # NaN: entries the kernel must write
    buffers = AttentionForwardBuffers(address(context), address(logsumexp), None, None, 1, None, None, None)
    status = library.emu_attention_forward_tensor_core(ctypes.byref(problem), ctypes.byref(buffers))
    if status != 0:
        raise RuntimeError(f"launch_attention_forward_tensor_core returned {status}")
    return context, logsumexp


def attention_backward_tensor_core(library, grad_context, arguments, logsumexp, values_are_keys=False):
    """The six gradients of attention_backward (None where the op returns an empty one;
    grad_center always: the tile backward refuses the Gaussian factor, a RuntimeError here)
    from the tensor-core backward, allocated as binding.cpp does (the float grad_query
    accumulator; additive: grad_v as one float vector, grad_bias the sum of grad_query; no
    grad_values, left NaN, with values_are_keys); row_dot from the forward run again."""
    keep: list = []
    problem = attention_problem(keep, *arguments)
    dtype = arguments[0].dtype
    score, bias = arguments[5], arguments[4]
    additive = score == "additive"
    batch, steps = problem.batch, problem.query_length
    grad_query = torch.full((batch, steps, problem.score_dim), math.nan, dtype=dtype)
    grad_keys = torch.full((batch, problem.source_length, problem.score_dim), math.nan, dtype=dtype)
    grad_values = torch.full((batch, problem.source_length, problem.value_dim), math.nan, dtype=dtype)
    grad_v = torch.full((problem.score_dim,), math.nan) if additive else None  # NaN: the launch must zero it
    accumulator = torch.full((batch, steps, problem.score_dim), math.nan)
    row_dot = torch.full((batch, steps), math.nan)
    grad_context, logsumexp = grad_context.contiguous(), logsumexp.contiguous()
    keep.extend([grad_context, logsumexp])
    buffers = AttentionBackwardBuffers(address(grad_context), None, address(logsumexp), address(grad_query),
                                       address(grad_keys), address(grad_values), None,
                                       address(grad_v), address(row_dot), values_are_keys=values_are_keys)
    status = library.emu_attention_backward_tensor_core(ctypes.byref(problem), ctypes.byref(buffers),
                                                        address(accumulator))
    if status != 0:
        raise RuntimeError(f"launch_attention_backward_tensor_core returned {status}")
    grad_bias = grad_query.float().sum((0, 1)).to(dtype) if additive and bias is not None else None
    return grad_query, grad_keys, grad_values, None if grad_v is None else grad_v.to(dtype), grad_bias, None


def attention_backward(library, grad_context, grad_weights, arguments, logsumexp, values_are_keys=False):
    """The six gradients of attention_backward (None where the op returns an empty one;
    grad_values left NaN with values_are_keys) and the key splits of its rows kernel
    (attention_forward_splits, as binding.cpp chooses them)."""
    keep: list = []
    problem = attention_problem(keep, *arguments)
    query, score, center, gaussian = arguments[0], arguments[5], arguments[11], arguments[12]
    dtype, accumulate = query.dtype, accumulation_dtype(query.dtype)
    batch, steps = problem.batch, problem.query_length
    additive, wants_center = score == "additive", gaussian and center is not None
    def unwritten(*size, dtype=dtype):  # NaN: entries the kernels must write
        return torch.full(size, math.nan, dtype=dtype)

    grad_query = unwritten(batch, steps, problem.score_dim)
    grad_keys = unwritten(batch, problem.source_length, problem.score_dim)
    grad_values = unwritten(batch, problem.source_length, problem.value_dim)
    grad_center = unwritten(batch, steps, dtype=accumulate) if wants_center else None
    grad_v_rows = unwritten(batch, steps, problem.score_dim, dtype=accumulate) if additive else None
    row_terms = unwritten(batch * steps, library.emu_row_terms_elements(0), dtype=accumulate)
    grad_context = grad_context.contiguous()
    grad_weights = None if grad_weights is None else grad_weights.contiguous()
    keep.extend([grad_context, grad_weights, logsumexp])
    splits = library.emu_attention_forward_splits(ctypes.byref(problem), MULTIPROCESSORS)
    partial_row_terms = unwritten(batch * steps, splits, library.emu_row_terms_elements(1), dtype=accumulate)
    partial_grad_query = unwritten(batch * steps, splits, problem.score_dim, dtype=accumulate)
    partial_grad_v = torch.full_like(partial_grad_query, math.nan) if additive else None
    keep.extend([partial_row_terms, partial_grad_query, partial_grad_v])
    split_scratch = (address(partial_row_terms), address(partial_grad_query), address(partial_grad_v)) \
        if splits > 1 else (None, None, None)
    buffers = AttentionBackwardBuffers(
        address(grad_context), address(grad_weights), address(logsumexp), address(grad_query), address(grad_keys),
        address(grad_values), address(grad_center), address(grad_v_rows), None, address(row_terms), splits,
        *split_scratch, values_are_keys)
    status = library.emu_attention_backward(ctypes.byref(problem), ctypes.byref(buffers))
    if status != 0:
        raise RuntimeError(f"launch_attention_backward returned {status}")
    grad_v = grad_v_rows.sum((0, 1)).to(dtype) if additive else None
    grad_bias = grad_query.to(accumulate).sum((0, 1)).to(dtype) if additive and arguments[4] is not None else None
    grads = grad_query, grad_keys, grad_values, grad_v, grad_bias, None if grad_center is None else grad_center.to(center.dtype)
    return (*grads, splits)


class HardAttentionOutputsProblem(ctypes.Structure):
    _fields_ = [("weights_dtype", ctypes.c_int), ("values_dtype", ctypes.c_int),
                *((name, ctypes.c_int64) for name in ("batch", "queries", "source_length", "value_dim"))]


def _hard_attention_outputs_problem(weights, values_dtype, value_dim) -> HardAttentionOutputsProblem:
    return HardAttentionOutputsProblem(DTYPES[weights.dtype], DTYPES[values_dtype], *weights.shape, value_dim)


def hard_attention_outputs(library, weights, index, values):
    """(context, log_prob, outside) as binding.cpp's hard_attention_outputs_cuda launches them;
    outside: whether the kernel saw a position outside [0, S) (the binding asserts it did not)."""
    weights, index, values = weights.contiguous(), index.contiguous(), values.contiguous()
    context = values.new_empty(*index.shape, values.shape[2])
    log_prob = weights.new_empty(index.shape)
    outside = torch.zeros((), dtype=torch.int32)
    problem = _hard_attention_outputs_problem(weights, values.dtype, values.shape[2])
    status = library.emu_hard_attention_outputs(ctypes.byref(problem), weights.data_ptr(), index.data_ptr(),
                                                values.data_ptr(), context.data_ptr(), log_prob.data_ptr(),
                                                outside.data_ptr())
    assert status == 0, status
    return context, log_prob, bool(outside)


def hard_attention_outputs_backward(library, grad_context, grad_log_prob, weights, index):
    """(grad_weights, grad_values, outside) as binding.cpp's hard_attention_outputs_backward_cuda
    launches them (the values' gradient summed in the accumulation dtype, then converted)."""
    weights, index = weights.contiguous(), index.contiguous()
    batch, queries, source_length = weights.shape
    value_dtype = grad_context.dtype if grad_context is not None else weights.dtype
    value_dim = grad_context.shape[2] if grad_context is not None else 0
    grad_weights = torch.empty_like(weights) if grad_log_prob is not None else weights.new_empty(0)
    sums = torch.zeros(batch, source_length, value_dim, dtype=accumulation_dtype(value_dtype))
    factor = torch.empty(batch * queries if grad_context is not None else 0)
    outside = torch.zeros((), dtype=torch.int32)
    problem = _hard_attention_outputs_problem(weights, value_dtype, value_dim)
    status = library.emu_hard_attention_outputs_backward(
        ctypes.byref(problem), address(None if grad_context is None else grad_context.contiguous()),
        address(grad_log_prob), weights.data_ptr(), index.data_ptr(),
        grad_weights.data_ptr() if grad_log_prob is not None else None, sums.data_ptr(),
        factor.data_ptr() if grad_context is not None else None, outside.data_ptr())
    assert status == 0, status
    return grad_weights, sums.to(value_dtype) if grad_context is not None else None, bool(outside)


def recurrent_step(dtype, batch, hidden, lengths, time, storage=None) -> RecurrentStep:
    """A step computed in float64 for float64, else float32; its forward's biases, states and
    outputs in `storage` (default: the compute dtype)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return RecurrentStep(DTYPES[compute], batch, hidden, address(lengths), time, DTYPES[storage or compute])


def persistent_plan(library, cell, backward, batch, hidden, multiprocessors=None,
                    operand=torch.float32) -> PersistentPlan:
    """The plan for a GPU with `multiprocessors` SMs, or for the emulated H200 (the
    device query path) when None, with the recurrent GEMM's operands in `operand`."""
    plan = PersistentPlan()
    if multiprocessors is None:
        status = library.emu_persistent_recurrent_plan_on_device(CELLS[cell], backward, DTYPES[operand], batch, hidden,
                                                                 ctypes.byref(plan))
    else:
        status = library.emu_persistent_recurrent_plan(CELLS[cell], backward, DTYPES[operand], batch, hidden,
                                                       multiprocessors, SHARED_BYTES_PER_BLOCK, ctypes.byref(plan))
    if status != 0:
        raise RuntimeError(f"persistent_recurrent_plan returned {status}")
    return plan


def _persistent_layer(keep, steps, batch, hidden, lengths, reverse, w_hh, operand) -> PersistentLayer:
    barrier = torch.zeros(1, dtype=torch.int64)
    lengths = None if lengths is None else lengths.to(torch.int64).contiguous()
    w_hh = w_hh.to(operand).contiguous()
    keep.extend([barrier, lengths, w_hh])
    return PersistentLayer(steps, batch, hidden, address(lengths), reverse, DTYPES[operand], address(w_hh),
                           address(barrier))


def _operand_buffer(operand, batch, width):
    """The tensor cores' (2, B, width) ping-pong operand buffer (None for float32),
    NaN where the kernel must write before it reads."""
    return None if operand == torch.float32 else torch.full((2, batch, width), math.nan, dtype=operand)


def _launch_persistent(library, cell, direction, layer, plan, buffers):
    status = getattr(library, f"emu_persistent_{cell}_{direction}")(ctypes.byref(layer), ctypes.byref(plan),
                                                                     ctypes.byref(buffers))
    if status != 0:
        raise RuntimeError(f"launch_persistent_{cell}_{direction} returned {status}")


def persistent_layer_forward(library, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, multiprocessors,
                             operand=torch.float32):
    """(output, h_n, c_n (None for the GRU), saved) of the layer op, float32 on the CPU,
    the recurrent loop in the persistent kernel on `multiprocessors` blocks' worth of SMs
    with the GEMM's operands (W_hh, h) in `operand`, as binding.cpp runs float16 /
    bfloat16 layers."""
    steps, batch, inputs = x.shape
    hidden = w_hh.shape[1]
    gates = w_hh.shape[0] // hidden
    width = 5 * hidden if cell == "lstm" else 4 * hidden
    plan = persistent_plan(library, cell, False, batch, hidden, multiprocessors, operand)
    keep: list = [b_ih, b_hh]
    layer = _persistent_layer(keep, steps, batch, hidden, lengths, reverse, w_hh, operand)
    saved = torch.full((steps, batch, width), math.nan)  # NaN: entries the kernel must write
    saved[..., : gates * hidden] = (x.reshape(steps * batch, inputs) @ w_ih.t()).view(steps, batch, gates * hidden)
    output, h_state, h_scratch = torch.empty(steps, batch, hidden), h0.clone(), torch.empty(batch, hidden)
    c_state = c0.clone() if cell == "lstm" else None
    h_operand = _operand_buffer(operand, batch, hidden)
    if h_operand is not None:
        h_operand[0] = h0
    keep.append(h_operand)
    buffers = PersistentForwardBuffers(address(b_ih), address(b_hh), address(saved), address(output),
                                       address(h_state), address(c_state), address(h_scratch), address(h_operand))
    _launch_persistent(library, cell, "forward", layer, plan, buffers)
    return output, h_state, c_state, saved


def previous_hidden(output, h0, lengths, reverse):
    """The state each step started from (T, B, H), as binding.cpp's previous_hidden."""
    if not reverse:
        return torch.cat([h0[None], output[:-1]])
    shifted = torch.cat([output[1:], h0[None]])
    if lengths is None:
        return shifted
    next_active = torch.arange(1, output.shape[0] + 1)[:, None] < lengths[None]
    return torch.where(next_active[..., None], shifted, h0)


def persistent_layer_backward(library, cell, grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, lengths,
                              reverse, output, saved, multiprocessors, operand=torch.float32):
    """(grad_x, grad_h0, grad_c0 (None for the GRU), grad_b_ih, grad_b_hh): the recurrent
    loop in the persistent kernel (GEMM operands in `operand`), the rest as binding.cpp
    computes it."""
    steps, batch, inputs = x.shape
    hidden = w_hh.shape[1]
    gates = w_hh.shape[0] // hidden
    plan = persistent_plan(library, cell, True, batch, hidden, multiprocessors, operand)
    keep: list = []
    layer = _persistent_layer(keep, steps, batch, hidden, lengths, reverse, w_hh, operand)
    grad_h = grad_h_n.clone()
    grad_c = grad_c_n.clone() if cell == "lstm" else None
    grad_gates = torch.empty(steps, batch, gates * hidden)
    grad_input_gates = torch.empty(steps, batch, gates * hidden) if cell == "gru" else None
    previous = previous_hidden(output, h0, lengths, reverse).contiguous() if cell == "gru" else None
    direct = torch.empty(batch, hidden) if cell == "gru" else None
    grad_output = grad_output.contiguous()
    gate_operand = _operand_buffer(operand, batch, gates * hidden)
    keep.extend([grad_output, saved, c0, previous, gate_operand])
    buffers = PersistentBackwardBuffers(address(grad_output), address(saved), address(c0), address(previous),
                                        address(grad_h), address(grad_c), address(grad_gates),
                                        address(grad_input_gates), address(direct), address(gate_operand))
    _launch_persistent(library, cell, "backward", layer, plan, buffers)
    input_side = grad_gates if cell == "lstm" else grad_input_gates
    grad_x = (input_side.view(steps * batch, -1) @ w_ih).view(steps, batch, inputs)
    return grad_x, grad_h, grad_c, input_side.sum((0, 1)), grad_gates.sum((0, 1))


class DecoderStepProblem(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("cell", ctypes.c_int), ("score", ctypes.c_int),
                ("input_feeding", ctypes.c_bool),
                *[(name, ctypes.c_int64) for name in (
                    "batch", "input_size", "hidden", "source_length", "score_dim", "value_dim")],
                ("scale", ctypes.c_float), ("y", ctypes.c_void_p), ("h", ctypes.c_void_p), ("c", ctypes.c_void_p),
                ("attentional", ctypes.c_void_p), ("keys", ctypes.c_void_p), ("keys_batch_stride", ctypes.c_int64),
                ("values", ctypes.c_void_p), ("values_batch_stride", ctypes.c_int64),
                *[(name, ctypes.c_void_p) for name in (
                    "query_weight", "v", "bias", "lengths", "key_padding_mask", "w_ih", "w_hh", "b_ih", "b_hh",
                    "w_combine")],
                ("window", ctypes.c_int64), ("position_dim", ctypes.c_int64), ("position_weight", ctypes.c_void_p),
                ("position_v", ctypes.c_void_p)]


class DecoderStepPlan(ctypes.Structure):
    _fields_ = [("blocks", ctypes.c_int), ("threads", ctypes.c_int),
                *[(name, ctypes.c_int64) for name in ("batch_tile", "splits", "keys_per_split", "shared_bytes")]]


class DecoderStepBuffers(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "output", "h_next", "c_next", "weights", "scores", "query", "partial_context", "partial_max", "partial_sum",
        "barrier", "position", "centers")]


def decoder_step_problem(keep, y, h, c, attentional, keys, values, query_weight, v, bias, score, scale, lengths,
                         key_padding_mask, w_ih, w_hh, b_ih, b_hh, w_combine, input_feeding, window=None,
                         position_weight=None, position_v=None) -> DecoderStepProblem:
    """The launch.h problem of attention_decoder_step's arguments (CPU tensors of y's
    dtype; v, bias, b_ih, b_hh and position_v taken in float32 as the binding does);
    `keep` holds the tensors the pointers point into."""
    keys = with_contiguous_rows(keys.expand(y.shape[0], *keys.shape[1:]))  # (1, S, Dk): stride 0, as binding.cpp
    values = with_contiguous_rows(values)
    v, bias, b_ih, b_hh, position_v = (t if t is None else t.float().contiguous()
                                       for t in (v, bias, b_ih, b_hh, position_v))
    position_rows = None if position_weight is None else position_weight.t().contiguous()
    keep.extend([position_rows, position_v])
    tensors = [t if t is None else t.contiguous() for t in (y, h, c, attentional, v, bias, key_padding_mask,
                                                           w_ih, w_hh, b_ih, b_hh, w_combine)]
    query_rows = None if query_weight is None else query_weight.t().contiguous()
    lengths = None if lengths is None else lengths.to(torch.int64).contiguous()
    keep.extend([keys, values, query_rows, lengths, *tensors])
    y, h, c, attentional, v, bias, key_padding_mask, w_ih, w_hh, b_ih, b_hh, w_combine = tensors
    batch, source_length, score_dim = keys.shape
    return DecoderStepProblem(
        DTYPES[y.dtype], CELLS["lstm" if c is not None else "gru"], SCORES[score], input_feeding, batch, y.shape[1], h.shape[1], source_length,
        score_dim, values.shape[2], scale, address(y), address(h), address(c), address(attentional), address(keys),
        keys.stride(0), address(values), values.stride(0), address(query_rows), address(v), address(bias),
        address(lengths), address(key_padding_mask), address(w_ih), address(w_hh), address(b_ih), address(b_hh),
        address(w_combine), window or 0, 0 if position_rows is None else position_rows.shape[0], address(position_rows),
        address(position_v))


def decoder_step_plan(library, problem, multiprocessors=None) -> DecoderStepPlan:
    """The plan for a GPU with `multiprocessors` SMs, or for the emulated H200 (the
    device query path) when None."""
    plan = DecoderStepPlan()
    if multiprocessors is None:
        status = library.emu_decoder_step_plan_on_device(ctypes.byref(problem), ctypes.byref(plan))
    else:
        status = library.emu_decoder_step_plan(ctypes.byref(problem), multiprocessors, SHARED_BYTES_PER_BLOCK,
                                               ctypes.byref(plan))
    if status != 0:
        raise RuntimeError(f"decoder_step_plan returned {status}")
    return plan


def decoder_step(library, arguments, multiprocessors, threads):
    """(output, h_next, c_next (None for a GRU), weights) of attention_decoder_step
    (`arguments`: the op's; float32, float16 or bfloat16) on the CPU, on `multiprocessors`
    blocks of `threads` threads."""
    keep: list = []
    problem = decoder_step_problem(keep, *arguments)
    plan = decoder_step_plan(library, problem, multiprocessors)
    if plan.blocks == 0:
        raise RuntimeError("decoder_step_plan: the step is not covered")
    plan.threads = threads
    batch, hidden, source_length = problem.batch, problem.hidden, problem.source_length
    nan = math.nan  # outputs and scratch the kernel must write
    dtype = arguments[0].dtype
    output, h_next = torch.full((batch, hidden), nan, dtype=dtype), torch.full((batch, hidden), nan, dtype=dtype)
    c_next = torch.full((batch, hidden), nan, dtype=dtype) if problem.c else None
    weights, scores = torch.full((batch, source_length), nan, dtype=dtype), torch.full((batch, source_length), nan)
    query = torch.full((batch, problem.score_dim), nan) if problem.query_weight else None
    partial_context = torch.full((batch, plan.splits, problem.value_dim), nan)
    partial_max, partial_sum = torch.full((batch, plan.splits), nan), torch.full((batch, plan.splits), nan)
    barrier = torch.zeros(1, dtype=torch.int64)
    position = torch.full((batch, problem.position_dim), nan) if problem.window else None
    centers = torch.full((batch,), nan) if problem.window else None
    keep.extend([scores, query, partial_context, partial_max, partial_sum, barrier, position, centers])
    buffers = DecoderStepBuffers(address(output), address(h_next), address(c_next), address(weights), address(scores),
                                 address(query), address(partial_context), address(partial_max), address(partial_sum),
                                 address(barrier), address(position), address(centers))
    status = library.emu_decoder_step(ctypes.byref(problem), ctypes.byref(plan), ctypes.byref(buffers))
    if status != 0:
        raise RuntimeError(f"launch_decoder_step returned {status}")
    return output, h_next, c_next, weights
