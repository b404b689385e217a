"""The problems whose Triton launches ``triton_compile_check`` compiles: the public Triton
ops called on CPU tensors at the shapes a GPU run launches them with (the "gpu" and "full"
bench presets' attention, hard-attention and LSTM/GRU cell shapes, every mask and score
kind, odd sizes), forward and backward; and what benchmarks/gpu_check.sh launches, in the
order it runs them: the Triton gpu tests' launches, through the tests' own helpers (all
but the torch.compile'd graphs, which Inductor compiles itself, the 2^31-element batch
test's two compiles, and the tanh test's own kernel), then every case of its two benches as
``fastattn bench`` builds it on the triton backend (the full preset in float32, the gpu
preset in bfloat16).  The inputs are never read: the launches are recorded, not run.

A ``Problem`` is (name, function of the dtype, the compile check's dtype names it runs in:
None for every one asked for).  ``QUICK_PROBLEMS`` reach every ``Launcher`` of the ops once
(the CI test's share); ``GPU_CHECK_PROBLEMS`` are gpu_check.sh's (its Triton warm-up).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple
from unittest import mock

import torch

import fastattn
from fastattn.bench.cases import PRESETS, cases
from fastattn.ops import triton_attention, triton_backend, triton_hard, triton_recurrent
from tests.test_triton_attention import (
    FULLGRAPH_GPU_SCORES, GPU_FLOAT32_CASE, GPU_LOW_PRECISION_CASES, fullgraph_gradients, fullgraph_problem,
    gpu_outputs, gpu_problem, run,
)
from tests.test_higher_order_gradients import GPU_ATTENTION_CASES, attention_outputs, attention_problem
from tests.test_triton_hard_attention import chosen_outputs_and_gradients
from tests.test_triton_hard_attention import gpu_problem as hard_attention_gpu_problem
from tests.test_triton_recurrent import GPU_CELL_CASES, gpu_cell_problem, gpu_layer_problem, run_cell, run_layer
from tests.test_triton_tuning import AUTOTUNED_GPU_SCORES, AUTOTUNED_SOURCE_LENGTHS, autotuned_problem


class Problem(NamedTuple):
    name: str
    run: Callable[[torch.dtype], None]
    dtypes: tuple[str, ...] | None = None  # the compile check's dtype names; None: every one asked for


def attention(dtype, batch, queries, keys, features, score="dot", scale=None, weights=False, backward=False,
              lengths=False, padding=False, causal=False, window=None, local_p=False, bias=False):
    """One forward (and backward) through the attention ops; ``local_p``: window around given centers, Gaussian."""
    query = torch.zeros(batch, queries, features, dtype=dtype)
    key = torch.zeros(batch, keys, features, dtype=dtype)
    value = torch.zeros(batch, keys, features, dtype=dtype)
    additive = score == "additive"
    if scale is None:
        scale = 1.0 if additive else 0.125  # v . tanh(q + k + bias) takes no scale
    v = torch.ones(features, dtype=dtype) if additive else None
    bias_vector = torch.zeros(features, dtype=dtype) if bias else None
    length_tensor = torch.full((batch,), keys, dtype=torch.int64) if lengths else None
    padding_mask = torch.zeros(batch, keys, dtype=torch.bool) if padding else None
    center = torch.zeros(batch, queries, dtype=dtype) if local_p else None
    if local_p and window is None:
        window = 8
    forward = (query, key, value, v, bias_vector, score, scale, length_tensor, padding_mask, causal, window, center,
               local_p)
    context, weight, row_stats = torch.ops.fastattn.triton_attention_forward(*forward, weights)
    if backward:
        torch.ops.fastattn.triton_attention_backward(
            torch.zeros_like(context), torch.zeros_like(weight) if weights else None, *forward, row_stats,
        )


def hard_attention(dtype, rows, keys, sample, features=256):
    """Hard attention's choice and outputs, forward and backward, for ``rows`` queries of one sequence."""
    weights = torch.zeros(1, rows, keys, dtype=dtype, requires_grad=True)
    values = torch.zeros(1, keys, features, dtype=dtype, requires_grad=True)
    context, _, log_prob = triton_hard.triton_hard_attention(weights, values, sample, 1)
    torch.autograd.grad((context, log_prob), (weights, values), (torch.zeros_like(context), torch.zeros_like(log_prob)))


def cell(dtype, kind, batch, hidden):
    """One LSTM or GRU cell step, forward and backward."""
    gates = 4 if kind == "lstm" else 3
    x, h = (torch.zeros(batch, hidden, dtype=dtype, requires_grad=True) for _ in range(2))
    w_ih, w_hh = (torch.zeros(gates * hidden, hidden, dtype=dtype, requires_grad=True) for _ in range(2))
    b_ih, b_hh = (torch.zeros(gates * hidden, dtype=dtype, requires_grad=True) for _ in range(2))
    if kind == "lstm":
        c = torch.zeros(batch, hidden, dtype=dtype, requires_grad=True)
        outputs = triton_recurrent.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
    else:
        outputs = (triton_recurrent.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh),)
    torch.autograd.backward(outputs, [torch.zeros_like(output) for output in outputs])


def layer(dtype, kind, steps, batch, hidden, lengths=False):
    """One LSTM or GRU layer, forward and backward: its input projection, then a step kernel
    that reads it (with lengths: that keeps the state of a finished sequence)."""
    gates = 4 if kind == "lstm" else 3
    x = torch.zeros(steps, batch, hidden, dtype=dtype, requires_grad=True)
    states = [torch.zeros(batch, hidden, dtype=dtype) for _ in range(2 if kind == "lstm" else 1)]
    w_ih, w_hh = (torch.zeros(gates * hidden, hidden, dtype=dtype, requires_grad=True) for _ in range(2))
    b_ih, b_hh = (torch.zeros(gates * hidden, dtype=dtype, requires_grad=True) for _ in range(2))
    run_layer = triton_recurrent.lstm_layer if kind == "lstm" else triton_recurrent.gru_layer
    lengths = torch.full((batch,), steps) if lengths else None
    output = run_layer(x, *states, w_ih, w_hh, b_ih, b_hh, lengths=lengths)[0]
    output.backward(torch.zeros_like(output))


@functools.cache
def _triton_on_cpu_tensors() -> None:
    """Route the Triton backend's ops to the Triton ops for CPU tensors too (once; the
    launches are recorded, never run)."""
    triton_backend.register(("cpu",))


def bench_case(dtype, case):
    """One case of a bench preset as ``fastattn bench`` runs it on the triton backend, forward
    and, for a forward_backward case, backward."""
    _triton_on_cpu_tensors()
    workload = case.build(case.inputs("cpu", dtype))
    with fastattn.backend("triton"):
        outputs = workload.run()
        if case.backward:
            differentiable = [output for output in outputs if isinstance(output, torch.Tensor) and output.requires_grad]
            torch.autograd.backward(differentiable, [torch.zeros_like(output) for output in differentiable])


def gpu_test_higher_order(dtype, name):
    """The Triton launches of tests/test_higher_order_gradients.py's gpu test (float32): the
    forward (its backward with create_graph=True runs the reference)."""
    _triton_on_cpu_tensors()
    attention_outputs("triton", *attention_problem(name, dtype))


def gpu_test_attention(dtype, case):
    """The Triton half of tests/test_triton_attention.py's low-precision and float32 gpu tests."""
    score, mode, shape = case
    _triton_on_cpu_tensors()
    gpu_outputs("triton", dtype, "cpu", score, *gpu_problem(score, mode, *shape))


def gpu_test_fullgraph_eager(dtype, score):
    """The eager launches of tests/test_triton_attention.py's torch.compile gpu test (float32)."""
    _triton_on_cpu_tensors()
    attend, inputs = fullgraph_problem(score, "cpu")
    with fastattn.backend("triton"):
        fullgraph_gradients(attend(*inputs), inputs)


def gpu_test_hard_attention(dtype):
    """The Triton launches of tests/test_triton_hard_attention.py's gpu tests."""
    chosen_outputs_and_gradients(*hard_attention_gpu_problem(dtype, "cpu"))


def gpu_test_cell(dtype, kind, batch):
    """The Triton half of tests/test_triton_recurrent.py's low-precision gpu test."""
    _triton_on_cpu_tensors()
    run_cell("triton", kind, *gpu_cell_problem(kind, batch, dtype, "cpu"))


def gpu_test_layer(dtype, kind):
    """The Triton half of tests/test_triton_recurrent.py's low-precision gpu layer test."""
    _triton_on_cpu_tensors()
    run_layer("triton", *gpu_layer_problem(kind, dtype, "cpu"))


def gpu_test_autotuned(dtype, score):
    """tests/test_triton_tuning.py's autotuned gpu test (float32), tuning on as it turns it on:
    its launches compile every config the prunes keep."""
    _triton_on_cpu_tensors()
    with mock.patch.dict(os.environ, {"FASTATTN_TRITON_AUTOTUNE": "1"}):
        for source_length in AUTOTUNED_SOURCE_LENGTHS:
            run("triton", score, *autotuned_problem(score, source_length, "cpu"))


def _problems(entries):
    return [Problem(name, functools.partial(function, **arguments), *dtypes)
            for name, function, arguments, *dtypes in entries]


LOW_PRECISION = ("float16", "bfloat16")
QUICK_PROBLEMS = _problems([
    ("attention.dot.decode_b64_s1024_d512.weights", attention,
     dict(batch=64, queries=1, keys=1024, features=512, weights=True)),
    ("attention.additive.decode_b64_s1024_d512.weights.backward", attention,
     dict(batch=64, queries=1, keys=1024, features=512, score="additive", bias=True, weights=True, backward=True)),
    ("attention.dot.b8_t64_s64_d64.weights.backward", attention,
     dict(batch=8, queries=64, keys=64, features=64, weights=True, backward=True)),
    # local-p centers: their gradient is what runs the additive grad_query kernel
    ("attention.additive.b8_t64_s64_d128.local_p.weights.backward", attention,
     dict(batch=8, queries=64, keys=64, features=128, score="additive", bias=True, weights=True, backward=True,
          local_p=True)),
    ("hard.argmax.rows64_s512", hard_attention, dict(rows=64, keys=512, sample=False)),
    ("lstm_cell.b64_h256", cell, dict(kind="lstm", batch=64, hidden=256)),
    ("lstm_cell.b128_h256", cell, dict(kind="lstm", batch=128, hidden=256)),
    ("gru_cell.b64_h256", cell, dict(kind="gru", batch=64, hidden=256)),
    ("gru_cell.b128_h256", cell, dict(kind="gru", batch=128, hidden=256)),
    ("lstm_layer.t2_b64_h256", layer, dict(kind="lstm", steps=2, batch=64, hidden=256)),
    ("gru_layer.t2_b64_h256.lengths", layer, dict(kind="gru", steps=2, batch=64, hidden=256, lengths=True)),
])

_MULTI_QUERY = dict(batch=64, queries=512, keys=512)  # the gpu preset's multi-query attention
_FULL = dict(batch=32, queries=64, keys=64, features=256)  # the full preset's attention
_ODD = dict(batch=3, queries=37, keys=45, features=50)  # sizes off every block and alignment

ALL_PROBLEMS = QUICK_PROBLEMS + _problems([
    *(
        (f"attention.{score}.decode_b64_s{keys}_d512", attention,
         dict(batch=64, queries=1, keys=keys, features=512, score=score, bias=score == "additive"))
        for score in ("dot", "cosine", "additive") for keys in (64, 1024, 4096)
    ),
    *(
        (f"attention.{score}.decode_b64_s1024_d1024", attention,
         dict(batch=64, queries=1, keys=1024, features=1024, score=score, bias=score == "additive"))
        for score in ("dot", "cosine", "additive")
    ),
    *(
        (f"attention.dot.b64_t512_s512_d{features}.backward", attention,
         dict(_MULTI_QUERY, features=features, backward=True))
        for features in (64, 128)
    ),
    ("attention.additive.b16_t512_s512_d128", attention, dict(_MULTI_QUERY, batch=16, features=128, score="additive")),
    *(
        (f"attention.{score}.b32_t64_s64_d256.weights.backward", attention,
         dict(_FULL, score=score, scale=scale, weights=True, backward=True))
        for score, scale in (("dot", 0.0625), ("cosine", 1.0), ("cosine", 100.0), ("additive", 1.0))
    ),
    ("attention.dot.b32_t1_s64_d256.backward", attention, dict(_FULL, queries=1, backward=True)),
    ("attention.additive.b32_t1_s64_d256.backward", attention,
     dict(_FULL, queries=1, score="additive", bias=True, backward=True)),
    ("attention.dot.lengths_padding_causal.backward", attention,
     dict(_FULL, lengths=True, padding=True, causal=True, weights=True, backward=True)),
    ("attention.dot.local_m.backward", attention, dict(_FULL, window=8, weights=True, backward=True)),
    ("attention.dot.local_p.backward", attention, dict(_FULL, local_p=True, weights=True, backward=True)),
    ("attention.additive.local_p.backward", attention,
     dict(_FULL, score="additive", local_p=True, lengths=True, weights=True, backward=True)),
    *(
        (f"attention.{score}.odd_sizes.backward", attention, dict(_ODD, score=score, weights=True, backward=True))
        for score in ("dot", "cosine", "additive")
    ),
    *((f"hard.{mode}.rows64_s{keys}", hard_attention, dict(rows=64, keys=keys, sample=mode == "sample"))
      for mode in ("argmax", "sample") for keys in (45, 512, 4096)),
    *(
        (f"{kind}_cell.b{batch}_h{hidden}", cell, dict(kind=kind, batch=batch, hidden=hidden))
        for kind in ("lstm", "gru") for batch, hidden in ((64, 1024), (32, 256), (128, 1024), (5, 7))
    ),
    *(
        (f"{kind}_layer.t2_b{batch}_h{hidden}", layer, dict(kind=kind, steps=2, batch=batch, hidden=hidden))
        for kind in ("lstm", "gru") for batch, hidden in ((64, 1024), (32, 256), (5, 7))
    ),
    *(
        (f"{kind}_layer.t2_b{batch}_h{hidden}.lengths", layer,
         dict(kind=kind, steps=2, batch=batch, hidden=hidden, lengths=True))
        for kind in ("lstm", "gru") for batch, hidden in ((64, 1024), (5, 7))
    ),
])

# What benchmarks/gpu_check.sh launches, in its order: the gpu tests (pytest's order), then
# the benches ((preset, the dtype it runs that preset in)).
GPU_TEST_PROBLEMS = _problems([
    *((f"gpu_test.higher_order.{name}", gpu_test_higher_order, dict(name=name), ("float32",))
      for name in GPU_ATTENTION_CASES),
    *((f"gpu_test.attention.{case[0]}.{case[1]}", gpu_test_attention, dict(case=case), LOW_PRECISION)
      for case in GPU_LOW_PRECISION_CASES),
    ("gpu_test.attention.float32", gpu_test_attention, dict(case=GPU_FLOAT32_CASE), ("float32", "float32-tf32")),
    *((f"gpu_test.fullgraph_eager.{score}", gpu_test_fullgraph_eager, dict(score=score), ("float32",))
      for score in FULLGRAPH_GPU_SCORES),
    ("gpu_test.hard_attention", gpu_test_hard_attention, {}, LOW_PRECISION),
    *((f"gpu_test.{kind}_cell.b{batch}", gpu_test_cell, dict(kind=kind, batch=batch), LOW_PRECISION)
      for kind, batch in GPU_CELL_CASES),
    *((f"gpu_test.{kind}_layer", gpu_test_layer, dict(kind=kind), LOW_PRECISION) for kind in ("lstm", "gru")),
    *((f"gpu_test.autotuned.{score}", gpu_test_autotuned, dict(score=score), ("float32",))
      for score in AUTOTUNED_GPU_SCORES),
])
BENCH_RUNS = (("full", "float32"), ("gpu", "bfloat16"))
BENCH_PROBLEMS = _problems([
    (f"bench.{preset}.{case.name}", bench_case, dict(case=case), (dtype_name,))
    for preset, dtype_name in BENCH_RUNS for case in cases(PRESETS[preset])
])
GPU_CHECK_PROBLEMS = GPU_TEST_PROBLEMS + BENCH_PROBLEMS
ALL_PROBLEMS += GPU_CHECK_PROBLEMS
