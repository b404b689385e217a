"""CPU speed and memory of the C++ kernels against their peers, for the targets of the
C++ extension issue (B=32, T=S=64, Da=Dv=256, float32, 2 threads).

    make bench                     # or: pytest benchmarks --benchmark-only --benchmark-json FILE
    python benchmarks/report.py FILE   # ratios between the members of each group

Each group holds one op run by several implementations in the same session, so the
ratios come from one run.  Peak memory is measured in a child process per
implementation (peak RSS growth over the set-up) and stored in extra_info.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import backends, reference

torch.set_num_threads(2)
BATCH, QUERIES, KEYS, WIDTH = 32, 64, 64, 256
pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpu") is not None, reason="needs fastattn._C")


def attention_problem(score: str, requires_grad: bool = False) -> dict:
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return (torch.randn(*shape, generator=generator) / shape[-1] ** 0.5).requires_grad_(requires_grad)

    problem = {"query": tensor(BATCH, QUERIES, WIDTH), "keys": tensor(BATCH, KEYS, WIDTH), "values": tensor(BATCH, KEYS, WIDTH)}
    if score == "additive":
        problem.update(w_query=tensor(WIDTH, WIDTH), w_key=tensor(WIDTH, WIDTH), v=tensor(WIDTH), bias=tensor(WIDTH))
    if score in ("general", "location"):
        problem["weight"] = tensor(WIDTH, WIDTH)
    return problem


def attend(backend_name: str, score: str, problem: dict):
    with fastattn.backend(backend_name):
        return fastattn.attention(score=score, **problem)


def compiled_reference(score: str):
    with fastattn.backend("reference"):
        return torch.compile(lambda problem: fastattn.attention(score=score, **problem))


IMPLEMENTATIONS = ["cpu", "reference", "reference-compiled"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("score", ["additive", "dot", "scaled_dot", "general", "cosine", "location"])
def test_attention_forward(benchmark, score, implementation):
    benchmark.group = f"attention.{score}.forward"
    problem = attention_problem(score)
    if implementation == "reference-compiled":
        function = compiled_reference(score)
        with torch.no_grad(), fastattn.backend("reference"):
            function(problem)  # compile outside the timing
            benchmark(function, problem)
        return
    with torch.no_grad():
        benchmark(attend, implementation, score, problem)


def _peak_memory_of(implementation: str, score: str) -> int:
    """Peak resident-memory growth (bytes) of one forward+backward, in a fresh process:
    the kernel's high-water mark is reset (/proc/self/clear_refs) after the set-up."""
    program = f"""
import json, torch, fastattn
from benchmarks.test_cpu_kernels import attention_problem

def status(field):
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) * 1024 for line in file if line.startswith(field))

torch.set_num_threads(2)
problem = attention_problem({score!r}, requires_grad=True)
with open("/proc/self/clear_refs", "w") as file:
    file.write("5")
baseline = status("VmRSS")
with fastattn.backend({implementation!r}):
    fastattn.attention(score={score!r}, **problem).sum().backward()
print(json.dumps(status("VmHWM") - baseline))
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("implementation", ["cpu", "reference"])
def test_additive_forward_backward_peak_memory(benchmark, implementation):
    benchmark.group = "attention.additive.forward_backward"
    benchmark.extra_info["peak_bytes"] = _peak_memory_of(implementation, "additive")
    problem = attention_problem("additive", requires_grad=True)

    def forward_backward():
        attend(implementation, "additive", problem).sum().backward()

    benchmark(forward_backward)


@pytest.mark.parametrize("implementation", ["cpu", "torch.nn.LSTM"])
def test_lstm_layer_forward_backward(benchmark, implementation):
    benchmark.group = "lstm_layer.forward_backward"
    torch.manual_seed(0)
    module = torch.nn.LSTM(256, 256)
    if implementation == "cpu":
        module = fastattn.optimize(module, backend="cpu")
    x = torch.randn(100, 32, 256, requires_grad=True)

    def forward_backward():
        output, _ = module(x)
        output.sum().backward()

    benchmark(forward_backward)


@pytest.mark.parametrize("implementation", ["cpu", "reference"])
@pytest.mark.parametrize("batch", [1, 32])
def test_greedy_decoding(benchmark, batch, implementation):
    """Bahdanau seq2seq greedy decoding through AttentionDecoderCell: 20 tokens per sequence."""
    benchmark.group = f"greedy_decoding.batch{batch}"
    torch.manual_seed(0)
    vocabulary, embedding_size, hidden, steps = 1000, 256, 256, 20
    embed, project = torch.nn.Embedding(vocabulary, embedding_size), torch.nn.Linear(hidden, vocabulary)
    decoder = fastattn.nn.AttentionDecoderCell(embedding_size, hidden, 2 * hidden, score="additive", input_feeding=False)
    encoder_states = torch.randn(batch, 30, 2 * hidden)

    def decode():
        with torch.no_grad(), fastattn.backend(implementation):
            cache, state = decoder.precompute(encoder_states), None
            tokens = torch.zeros(batch, dtype=torch.long)
            for _ in range(steps):
                output, state, _ = decoder(embed(tokens), state, cache)
                tokens = project(output).argmax(-1)
        return tokens

    benchmark(decode)
    benchmark.extra_info["tokens_per_decode"] = batch * steps
