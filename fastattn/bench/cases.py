"""The benchmark's cases: one op at one shape, forward or forward+backward.

A :class:`Case` builds a :class:`Workload` from an :class:`Inputs`: the fastattn call
(run on whichever backend is in force), the tensors a backward differentiates, and the
peers that compute the same thing another way (``torch.nn.LSTM``,
``scaled_dot_product_attention``...) on the very same tensors.  The torch.compile'd
reference is added by the runner, for cases marked ``compilable``.

Case names: ``attention.<score>.<multi_query|decode_step>.<forward|forward_backward>``,
``hard_attention.multi_query.forward``, ``<lstm|gru>_<cell|layer>.<forward|forward_backward>``,
``<lstm|gru>_layer.t100_b64_h1024.<forward|forward_backward>`` (full preset: issue 6's target shape),
``decoder_step.forward``, ``greedy_decoding.forward`` (and ``.batch_1.``) and
``greedy_decoding.cuda_graph.batch_<1|64>.forward`` (the zoo's Seq2Seq, CUDA graph against
the eager reference).

A preset with ``targets`` (the "gpu" preset) holds instead only the GPU targets of issues 4
and 6 (:func:`target_cases`), each with its :class:`Target` s and the peers they name; the
shape is in the name: ``attention.<score>.decode_step.b64_s1024_d512.forward``,
``attention.scaled_dot.multi_query.b64_t512_s512_d64.forward_backward``,
``attention.additive.multi_query.b16_t512_s512_d128.forward``, ``lstm_cell.b64_h1024.forward``,
``<lstm|gru>_layer.t100_b64_h1024.forward``, ``greedy_decoding.cuda_graph.batch_<1|64>.forward``.
(The layers' forward+backward are cases of the full preset.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastattn import backends, roofline
from fastattn.optimize import optimize
from fastattn.functional.attention import additive_attention, attention, hard_attention
from fastattn.functional.recurrent import gru_cell, lstm_cell
from fastattn.nn.decoder import AttentionDecoderCell, DecoderState
from fastattn.zoo.seq2seq import EOS, Seq2Seq, Seq2SeqConfig

SCORES = ("dot", "scaled_dot", "general", "additive", "cosine", "location")
MODES = ("forward", "forward_backward")
GREEDY_BATCHES = (1, 64)  # of the Seq2Seq greedy decoding cases, whatever the preset
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
Outputs = tuple  # of tensors; nested tuples are flattened by the runner
REFERENCE = "reference"  # the eager reference backend's row
COMPILED_REFERENCE = "reference-compiled"  # the torch.compile'd reference's row
FLASH_PEER = "torch sdpa (flash)"
GEMM_BASELINE = "recurrent GEMM alone"
EAGER_DECODING = "eager reference"  # the Seq2Seq greedy cases' peer: the eager loop on the reference backend
DECODE_BANDWIDTH_FROM = 1024  # S from which the decode-step targets include the bandwidth one


class BenchError(Exception):
    """A benchmark request that cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Preset:
    batch: int
    length: int  # T = S of the attention cases, S of the decoder cases
    dim: int  # D of queries, keys, values and the additive attention dimension
    hidden: int  # hidden (and input) size of the recurrent and decoder cases
    steps: int  # sequence length of the LSTM / GRU layer cases
    tokens: int  # tokens per greedy decoding
    vocabulary: int  # greedy decoding's output vocabulary
    min_run_time: float  # seconds spent timing each case on each implementation
    compile: bool  # whether the torch.compile'd reference is a peer by default
    large_layers: bool = False  # also the layers at T=100, B=64, H=1024 (LARGE_LAYER)
    targets: bool = False  # only the issues' GPU targets (target_cases), at the sizes below
    decode_lengths: tuple[int, ...] = ()  # targets: S of the decode-step cases (B = batch, D = dim)
    head_dims: tuple[int, ...] = ()  # targets: D of the multi-query scaled_dot cases (B = batch, T = S = length)
    additive_batch: int = 0  # targets: B of the additive forward (T = S = length, D = the largest head dim)
    targets_dtype: str = "bfloat16"  # targets: the dtype the issues state them in; a run in another is not judged


PRESETS = {
    "tiny": Preset(batch=2, length=5, dim=6, hidden=7, steps=3, tokens=2, vocabulary=11, min_run_time=0.002, compile=False),
    "quick": Preset(batch=4, length=16, dim=32, hidden=32, steps=16, tokens=5, vocabulary=100, min_run_time=0.03, compile=False),
    "full": Preset(batch=32, length=64, dim=256, hidden=256, steps=100, tokens=20, vocabulary=1000, min_run_time=0.3, compile=True,
                   large_layers=True),
    # Issues 4 and 6, "Performance": bf16 on an H100/H200 (benchmarks/gpu_check.sh runs it with
    # --dtype bfloat16).  One S per decade; the additive case at B=16 keeps the float64 oracle's
    # (B, T, S, D) tanh argument at 4 GiB.
    "gpu": Preset(batch=64, length=512, dim=512, hidden=1024, steps=100, tokens=20, vocabulary=1000, min_run_time=0.05,
                  compile=True, targets=True, decode_lengths=(64, 1024, 4096), head_dims=(64, 128), additive_batch=16),
}
# The greedy decoding target's sizes: the full preset's (a source of 64, hidden 256, 20 tokens
# over a vocabulary of 1000), since issue 6 states the target at batch 1 and 64 only.
GREEDY_TARGET_SIZES = {name: getattr(PRESETS["full"], name) for name in ("length", "hidden", "tokens", "vocabulary")}
LARGE_LAYER = (100, 64, 1024)  # (T, B, H) of the persistent-kernel target in issue 6
LAYER_MICROSECONDS_PER_STEP = 5.0  # issue 6: a layer's forward at LARGE_LAYER in bf16 on an H100/H200


class Inputs:
    """Reproducible random tensors on one device and dtype.

    Values are drawn in float32 from a seeded generator, rounded through ``rounded_to``
    (the dtype of the run being checked, so a float64 oracle sees the same values), then
    cast to ``dtype``.  With ``requires_grad`` every tensor made here, and every parameter of
    the modules passed to :meth:`module`, is a leaf of the backward, in :attr:`leaves`."""

    def __init__(self, device: str | torch.device, dtype: torch.dtype, *, requires_grad: bool = False,
                 rounded_to: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.requires_grad = requires_grad
        self.rounded_to = rounded_to or dtype
        self.generator = torch.Generator().manual_seed(0)
        self.leaves: list[torch.Tensor] = []

    def _values(self, shape: Sequence[int]) -> torch.Tensor:
        values = torch.randn(tuple(shape), generator=self.generator) / math.sqrt(shape[-1])
        return values.to(self.rounded_to).to(self.device, self.dtype)

    def random(self, *shape: int) -> torch.Tensor:
        """Normal values scaled by 1/sqrt(last dimension), to keep scores moderate."""
        tensor = self._values(shape).requires_grad_(self.requires_grad)
        self.leaves.append(tensor)
        return tensor

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on this device and dtype, its parameters overwritten in place with random values."""
        module.to(self.device, self.dtype)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.copy_(self._values(parameter.shape))
                parameter.requires_grad_(self.requires_grad)
                self.leaves.append(parameter)
        return module


@dataclass
class Workload:
    run: Callable[[], Outputs]  # the fastattn call; dispatches to the backend in force
    leaves: list[torch.Tensor]  # what forward_backward differentiates (empty for forward cases)
    peers: dict[str, Callable[[], Outputs]] = field(default_factory=dict)
    # Timed for comparison but computing something else (part of the op), so not checked:
    baselines: dict[str, Callable[[], Outputs]] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A goal for fastattn's backends on a case: at least ``minimum`` times the speed of the
    implementation ``peer`` (its time / ours), at least ``minimum`` % of the device's
    ``resource`` limit (a :func:`fastattn.roofline.percent_of_each` key), or at most
    ``microseconds_per_step`` of the median time per one of the case's ``steps`` time steps."""

    minimum: float | None = None
    peer: str | None = None
    resource: str | None = None
    microseconds_per_step: float | None = None
    steps: int = 1

    def __post_init__(self):
        if sum(goal is not None for goal in (self.peer, self.resource, self.microseconds_per_step)) != 1:
            raise ValueError("a Target names exactly one of peer, resource and microseconds_per_step")
        if (self.minimum is None) != (self.microseconds_per_step is not None):
            raise ValueError("a Target has a minimum exactly when it names a peer or a resource")

    def describe(self) -> str:
        if self.peer is not None:
            return f">= {self.minimum:.3g}x vs {self.peer}"
        if self.resource is not None:
            return f">= {self.minimum:.3g}% of the {self.resource} limit"
        return f"<= {self.microseconds_per_step:.3g} us per step"

    @property
    def unit(self) -> str:
        """How the value shows: "x" (speedup), "%" (of a limit) or " us" (per step)."""
        return "x" if self.peer is not None else "%" if self.resource is not None else " us"

    def value(self, median_s: float | None, speedup: dict[str, float], percent_of: dict[str, float]) -> float | None:
        """What the target judges of a row (None where it cannot be told): the speedup over
        ``peer``, the % of ``resource``, or the microseconds per step of the median time."""
        if self.peer is not None:
            return speedup.get(self.peer)
        if self.resource is not None:
            return percent_of.get(self.resource)
        return None if median_s is None else median_s * 1e6 / self.steps

    def met_by(self, value: float) -> bool:
        return value <= self.microseconds_per_step if self.microseconds_per_step is not None else value >= self.minimum


@dataclass(frozen=True)
class Case:
    name: str
    ops: tuple[str, ...]  # the backends ops it runs: a backend is benchmarked when it runs them all
    shape: dict[str, int]
    backward: bool
    compilable: bool  # whether the torch.compile'd reference is a peer
    build: Callable[[Inputs], Workload]
    work: Callable[[int], roofline.Work]  # element size in bytes -> the op's work
    targets: tuple[Target, ...] = ()

    def inputs(self, device: str, dtype: torch.dtype, rounded_to: torch.dtype | None = None) -> Inputs:
        return Inputs(device, dtype, requires_grad=self.backward, rounded_to=rounded_to)


def _score_parameters(score: str, inputs: Inputs, dim: int, source_length: int) -> dict:
    if score == "general":
        return {"weight": inputs.random(dim, dim)}
    if score == "additive":
        return {"w_query": inputs.random(dim, dim), "w_key": inputs.random(dim, dim),
                "v": inputs.random(dim), "bias": inputs.random(dim)}
    if score == "location":
        return {"weight": inputs.random(source_length, dim)}
    return {}


def _torch_sdpa(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's scaled_dot_product_attention with values = keys, as one head (N, 1, T, D), so
    that torch picks among its fused kernels: on 3-D tensors it runs its math path only (the
    unfused matmul, softmax, matmul).  A 2-D decoder-step query becomes T = 1."""
    step = query.dim() == 2
    heads_query = (query.unsqueeze(1) if step else query).unsqueeze(1)
    heads_keys = keys.unsqueeze(1)
    context = torch.nn.functional.scaled_dot_product_attention(heads_query, heads_keys, heads_keys, scale=scale)
    return context.squeeze(1).squeeze(1) if step else context.squeeze(1)


def _torch_sdpa_flash(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`_torch_sdpa` on torch's flash backend only.  Raises where flash cannot run (a
    float32 CUDA tensor, a head dim over 256)."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return _torch_sdpa(query, keys, scale)


def _attention_case(score: str, layout: str, mode: str, batch: int, length: int, dim: int, *, tag: str = "",
                    compilable: bool = True, flash_peer: bool = False, cached_keys: bool = False,
                    targets: tuple[Target, ...] = ()) -> Case:
    """``layout`` is ``multi_query`` (query (B, T, D), T = S = ``length``) or ``decode_step``
    (query (B, D)); ``tag`` (the shape) goes into the name before the mode; ``flash_peer``
    adds SDPA on its flash backend (dot and scaled_dot multi-query only); ``cached_keys``
    (additive only): the key projection W_k h is computed once, outside the timed call, as a
    decoder does once per source, and each call runs ``additive_attention`` on it."""
    if cached_keys and (score != "additive" or mode != "forward"):
        raise BenchError(f"cached_keys is for additive forward cases, not {score} {mode}")
    queries = length if layout == "multi_query" else 1
    shape = {"B": batch, "T": length, "S": length, "D": dim} if layout == "multi_query" else {"B": batch, "S": length, "D": dim}
    backward = mode == "forward_backward"

    def build(inputs: Inputs) -> Workload:
        query = inputs.random(*((batch, length, dim) if layout == "multi_query" else (batch, dim)))
        keys = inputs.random(batch, length, dim)
        parameters = _score_parameters(score, inputs, dim, length)
        peers = {}
        if score in ("dot", "scaled_dot"):
            scale = 1.0 if score == "dot" else 1 / math.sqrt(dim)
            peers["torch sdpa"] = lambda: (_torch_sdpa(query, keys, scale),)
            if flash_peer:
                peers[FLASH_PEER] = lambda: (_torch_sdpa_flash(query, keys, scale),)
        if cached_keys:
            with torch.no_grad():
                key_projection = keys @ parameters["w_key"].T
            w_query, v, bias = parameters["w_query"], parameters["v"], parameters["bias"]
            read = [query, key_projection, keys, w_query, v, bias]  # W_k is not read by the call
            return Workload(lambda: (additive_attention(query @ w_query.T, key_projection, v, keys, bias=bias),), read, peers)
        return Workload(lambda: (attention(query, keys, score=score, **parameters),), inputs.leaves, peers)

    def work(element_bytes: int) -> roofline.Work:
        return roofline.attention_work(score, batch, queries, length, dim, element_bytes=element_bytes, backward=backward,
                                       cached_keys=cached_keys)

    name = ".".join(part for part in ("attention", score, layout, tag, mode) if part)
    return Case(name, ("attention",), shape, backward, compilable, build, work, targets)


def _hard_attention_case(preset: Preset) -> Case:
    batch, length, dim = preset.batch, preset.length, preset.dim

    def build(inputs: Inputs) -> Workload:
        query, keys = inputs.random(batch, length, dim), inputs.random(batch, length, dim)
        return Workload(lambda: hard_attention(query, keys, score="scaled_dot", sample=False), inputs.leaves)

    def work(element_bytes: int) -> roofline.Work:
        return roofline.hard_attention_work(batch, length, length, dim, element_bytes=element_bytes)

    shape = {"B": batch, "T": length, "S": length, "D": dim}
    return Case("hard_attention.multi_query.forward", ("hard_attention",), shape, False, True, build, work)


def _cell_case(cell: str, mode: str, batch: int, hidden: int, *, tag: str = "", compilable: bool = True,
               gemm_baseline: bool = False, targets: tuple[Target, ...] = ()) -> Case:
    """A fastattn cell step against ``torch.nn.LSTMCell``/``GRUCell`` holding the same weights;
    ``gemm_baseline`` also times the recurrent GEMM alone (h @ W_hh^T, the step's floor)."""
    backward = mode == "forward_backward"
    torch_cell, fastattn_cell = {"lstm": (torch.nn.LSTMCell, lstm_cell), "gru": (torch.nn.GRUCell, gru_cell)}[cell]

    def build(inputs: Inputs) -> Workload:
        x = inputs.random(batch, hidden)
        state = (inputs.random(batch, hidden), inputs.random(batch, hidden)) if cell == "lstm" else inputs.random(batch, hidden)
        module = inputs.module(torch_cell(hidden, hidden))
        weights = (module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)
        h = state[0] if cell == "lstm" else state
        baselines = {GEMM_BASELINE: lambda: (torch.mm(h, module.weight_hh.t()),)} if gemm_baseline else {}
        return Workload(
            lambda: _as_tuple(fastattn_cell(x, state, *weights)),
            inputs.leaves,
            {f"torch.nn.{torch_cell.__name__}": lambda: _as_tuple(module(x, state))},
            baselines,
        )

    def work(element_bytes: int) -> roofline.Work:
        return roofline.cell_work(cell, batch, hidden, hidden, element_bytes=element_bytes, backward=backward)

    shape = {"B": batch, "I": hidden, "H": hidden}
    name = ".".join(part for part in (f"{cell}_cell", tag, mode) if part)
    return Case(name, (f"{cell}_cell",), shape, backward, compilable, build, work, targets)


def _layer_case(cell: str, mode: str, preset: Preset, shape: tuple[int, int, int] | None = None, *,
                targets: tuple[Target, ...] = ()) -> Case:
    """``fastattn.optimize(torch.nn.LSTM)`` (same parameters) against the torch module itself,
    at the preset's shape or at ``shape`` (T, B, H), named after it.
    Not compiled: torch.compile unrolls the reference's time loop, which takes minutes."""
    steps, batch, hidden = shape or (preset.steps, preset.batch, preset.hidden)
    backward = mode == "forward_backward"
    torch_layer = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]

    def build(inputs: Inputs) -> Workload:
        sequence = inputs.random(steps, batch, hidden)
        module = inputs.module(torch_layer(hidden, hidden))
        ours = optimize(module)
        return Workload(
            lambda: _as_tuple(ours(sequence)), inputs.leaves, {f"torch.nn.{torch_layer.__name__}": lambda: _as_tuple(module(sequence))}
        )

    def work(element_bytes: int) -> roofline.Work:
        return roofline.layer_work(cell, steps, batch, hidden, hidden, element_bytes=element_bytes, backward=backward)

    name = f"{cell}_layer.{mode}" if shape is None else f"{cell}_layer.t{steps}_b{batch}_h{hidden}.{mode}"
    return Case(name, (f"{cell}_layer",), {"T": steps, "B": batch, "I": hidden, "H": hidden}, backward, False, build, work,
                targets)


def _decoder(inputs: Inputs, hidden: int) -> AttentionDecoderCell:
    """Luong-style decoder cell: LSTM, additive score, input feeding, all sizes ``hidden``."""
    return inputs.module(AttentionDecoderCell(hidden, hidden, hidden, score="additive"))


def _decoder_step_case(preset: Preset) -> Case:
    batch, length, hidden = preset.batch, preset.length, preset.hidden

    def build(inputs: Inputs) -> Workload:
        decoder = _decoder(inputs, hidden)
        keys, previous = inputs.random(batch, length, hidden), inputs.random(batch, hidden)
        state = DecoderState(inputs.random(batch, hidden), inputs.random(batch, hidden), inputs.random(batch, hidden))
        with torch.no_grad():
            cache = decoder.precompute(keys)
        return Workload(lambda: _as_tuple(decoder(previous, state, cache)), [])

    def work(element_bytes: int) -> roofline.Work:
        return roofline.decoder_step_work(batch, length, hidden, element_bytes=element_bytes)

    shape = {"B": batch, "S": length, "H": hidden}
    return Case("decoder_step.forward", ("attention", "lstm_cell"), shape, False, True, build, work)


def _greedy_decoding_case(preset: Preset, batch: int | None = None) -> Case:
    """Embed, decode one step, project to the vocabulary, take the argmax; ``tokens`` times,
    from encoder states prepared once outside the timed call (``precompute``: W_k h), as the
    Seq2Seq cases decode from an encoded source.
    ``batch``: the preset's when None (``greedy_decoding.forward``), else named in the case."""
    name = "greedy_decoding.forward" if batch is None else f"greedy_decoding.batch_{batch}.forward"
    batch = preset.batch if batch is None else batch
    length, hidden, tokens, vocabulary = preset.length, preset.hidden, preset.tokens, preset.vocabulary

    def build(inputs: Inputs) -> Workload:
        decoder = _decoder(inputs, hidden)
        embed = inputs.module(torch.nn.Embedding(vocabulary, hidden))
        project = inputs.module(torch.nn.Linear(hidden, vocabulary))
        with torch.no_grad():
            cache = decoder.precompute(inputs.random(batch, length, hidden))

        def decode() -> Outputs:
            state = None
            token = torch.zeros(batch, dtype=torch.long, device=inputs.device)
            logits = []
            for _ in range(tokens):
                output, state, _ = decoder(embed(token), state, cache)
                logits.append(project(output))
                token = logits[-1].argmax(-1)
            return torch.stack(logits), token

        return Workload(decode, [])

    def work(element_bytes: int) -> roofline.Work:
        return roofline.greedy_decoding_work(tokens, batch, length, hidden, vocabulary, element_bytes=element_bytes)

    shape = {"B": batch, "S": length, "H": hidden, "tokens": tokens, "V": vocabulary}
    return Case(name, ("attention", "lstm_cell"), shape, False, False, build, work)


def _seq2seq_greedy_case(batch: int, preset: Preset, targets: tuple[Target, ...] = ()) -> Case:
    """The zoo's Seq2Seq (additive attention, LSTM, input feeding) decoding ``tokens`` tokens
    greedily from an encoded source of the preset's ``length``, at its ``hidden`` size: the
    backend rows capture the steps in a CUDA graph on a GPU (``fastattn.zoo.graph_decoding``;
    eager on a CPU), the peer is the eager loop on the reference backend (its time / ours is
    the ratio of tokens per second: both decode the same tokens).  The end token is never
    chosen, so every call decodes ``tokens`` steps."""
    length, tokens, vocabulary = preset.length, preset.tokens, preset.vocabulary
    hidden = preset.hidden + preset.hidden % 2  # Seq2Seq splits it between two encoder directions

    def build(inputs: Inputs) -> Workload:
        config = Seq2SeqConfig(vocabulary, vocabulary, embedding_size=hidden, hidden_size=hidden)
        model = inputs.module(Seq2Seq(config))
        source = torch.randint(1, vocabulary, (batch, length), generator=inputs.generator).to(inputs.device)
        with torch.no_grad():
            model.output.bias[EOS] = -1e4
            encoded, state = model.encode(source, torch.full((batch,), length, device=inputs.device))

        def eager_reference() -> Outputs:
            with backends.backend("reference"):
                return tuple(model.greedy_decode(encoded, state, tokens, cuda_graph=False))

        return Workload(lambda: tuple(model.greedy_decode(encoded, state, tokens)), [], {EAGER_DECODING: eager_reference})

    def work(element_bytes: int) -> roofline.Work:
        return roofline.greedy_decoding_work(tokens, batch, length, hidden, vocabulary, element_bytes=element_bytes)

    shape = {"B": batch, "S": length, "H": hidden, "tokens": tokens, "V": vocabulary}
    return Case(f"greedy_decoding.cuda_graph.batch_{batch}.forward", ("attention", "lstm_cell"), shape, False, False, build, work,
                targets)


def _as_tuple(outputs: object) -> Outputs:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def target_cases(preset: Preset) -> list[Case]:
    """The GPU targets of issues 4 and 6 ("Performance"), at the sizes of a ``targets`` preset:
    decode-step attention, every score (additive on cached projected keys K', as the issues
    state its per-step read), at each of ``decode_lengths``: >= 85% of the memory
    (HBM) bandwidth from S = 1024 on and >= 3x the eager reference; multi-query scaled_dot
    forward+backward at each head dim: >= 1x SDPA on its flash backend; additive forward:
    >= 60% of the special-function (tanh) limit and >= 5x the torch.compile'd reference (the
    only compiled peer here); the LSTM cell step: at most 1.5x the time of its recurrent GEMM;
    the LSTM and GRU layer forwards at T = ``steps``: at most 5 us per step and at least as
    fast as ``torch.nn.LSTM`` / ``GRU`` (cuDNN on a GPU); greedy Seq2Seq decoding at each of
    :data:`GREEDY_BATCHES` with the steps in a CUDA graph: >= 10x the eager reference's tokens
    per second, at the full preset's decoding sizes (:data:`GREEDY_TARGET_SIZES`; the issue
    names none), last, as the slowest to set up (a CUDA graph capture per backend)."""
    batch, length, dim, hidden = preset.batch, preset.length, preset.dim, preset.hidden
    decode = [
        _attention_case(score, "decode_step", "forward", batch, keys, dim, tag=f"b{batch}_s{keys}_d{dim}", compilable=False,
                        cached_keys=score == "additive", targets=(
            *((Target(85.0, resource="memory"),) if keys >= DECODE_BANDWIDTH_FROM else ()), Target(3.0, peer=REFERENCE),
        ))
        for keys in preset.decode_lengths
        for score in SCORES
    ]
    multi_query = [
        _attention_case("scaled_dot", "multi_query", "forward_backward", batch, length, head_dim,
                        tag=f"b{batch}_t{length}_s{length}_d{head_dim}", compilable=False, flash_peer=True,
                        targets=(Target(1.0, peer=FLASH_PEER),))
        for head_dim in preset.head_dims
    ]
    additive_batch, additive_dim = preset.additive_batch, max(preset.head_dims)
    additive = _attention_case(
        "additive", "multi_query", "forward", additive_batch, length, additive_dim,
        tag=f"b{additive_batch}_t{length}_s{length}_d{additive_dim}",
        targets=(Target(60.0, resource="special functions"), Target(5.0, peer=COMPILED_REFERENCE)),
    )
    cell = _cell_case("lstm", "forward", batch, hidden, tag=f"b{batch}_h{hidden}", compilable=False, gemm_baseline=True,
                      targets=(Target(1 / 1.5, peer=GEMM_BASELINE),))
    steps = preset.steps
    layers = [
        _layer_case(layer, "forward", preset, (steps, batch, hidden), targets=(
            Target(microseconds_per_step=LAYER_MICROSECONDS_PER_STEP, steps=steps), Target(1.0, peer=f"torch.nn.{module}"),
        ))
        for layer, module in (("lstm", "LSTM"), ("gru", "GRU"))
    ]
    greedy_sizes = replace(preset, **GREEDY_TARGET_SIZES)
    greedy = [_seq2seq_greedy_case(batch, greedy_sizes, targets=(Target(10.0, peer=EAGER_DECODING),)) for batch in GREEDY_BATCHES]
    return [*decode, *multi_query, additive, cell, *layers, *greedy]


def cases(preset: Preset) -> list[Case]:
    """Every case of the benchmark at the shapes of ``preset`` (only its targets for a ``targets`` preset)."""
    if preset.targets:
        return target_cases(preset)
    batch, length, dim = preset.batch, preset.length, preset.dim
    attention_cases = [
        _attention_case(score, layout, mode, batch, length, dim)
        for score in SCORES
        for layout in ("multi_query", "decode_step")
        for mode in MODES
    ]
    recurrent_cases = [_cell_case(cell, mode, preset.batch, preset.hidden) for cell in ("lstm", "gru") for mode in MODES]
    recurrent_cases += [_layer_case(cell, mode, preset) for cell in ("lstm", "gru") for mode in MODES]
    if preset.large_layers:
        recurrent_cases += [_layer_case(cell, mode, preset, LARGE_LAYER) for cell in ("lstm", "gru") for mode in MODES]
    return [
        *attention_cases,
        _hard_attention_case(preset),
        *recurrent_cases,
        _decoder_step_case(preset),
        _greedy_decoding_case(preset),
        _greedy_decoding_case(preset, batch=1),
        *(_seq2seq_greedy_case(batch, preset) for batch in GREEDY_BATCHES),
    ]


def matches(case: Case, selector: str) -> bool:
    """``selector`` names the case or a leading part of its dotted name (``attention.additive``)."""
    return case.name == selector or case.name.startswith(selector + ".")


def select(all_cases: list[Case], selectors: Sequence[str]) -> list[Case]:
    """The cases that match one of ``selectors`` (all of them when there are none)."""
    if not selectors:
        return all_cases
    unknown = [selector for selector in selectors if not any(matches(case, selector) for case in all_cases)]
    if unknown:
        valid = ", ".join(case.name for case in all_cases)
        raise BenchError(f"unknown op {', '.join(map(repr, unknown))}; valid ops: {valid}")
    return [case for case in all_cases if any(matches(case, selector) for selector in selectors)]
