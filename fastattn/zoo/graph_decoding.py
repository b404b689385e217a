"""Greedy decoding of the zoo's Seq2Seq with its decoder steps captured in a CUDA graph.

One replay of the graph runs ``steps`` greedy steps on static buffers, all on the device:
embed the previous token, the decoder step (on the CUDA backend the fused op
``attention_decoder_step``), the vocabulary projection, the argmax, padding for the rows
that have ended, and the device-side ``finished`` mask; step i writes its token and
attention weights into column i of the replay's output buffers.  The host reads
``finished`` once per replay (every ``steps`` steps, :func:`steps_per_replay`) and stops
when every row has ended or ``max_length`` steps are done; the tokens are then cut where
the eager loop stops, so both return the same tokens and weights.

What is captured is exactly :meth:`StaticGreedySteps.run`, which runs eagerly too (the CPU
tests check it against the eager loop).  Value checks (the range of ``lengths``) run
before the capture, in the warm-up on a side stream, and once per source in
:meth:`StaticGreedySteps.load`; during the capture fastattn skips them
(``fastattn.checks.reads_values``).  A model keeps its last few graphs, one per shape,
backend and set of parameter storages (parameters updated in place are seen by the next
replay).  Not handled: attention "local-m", whose window is sliced on the host by the
step index.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

import torch

from fastattn import backends, checks
from fastattn.data.vocabulary import Vocabulary, never_emitted
from fastattn.functional.attention_inputs import Layout, checked_lengths
from fastattn.nn.attention import AttentionCache
from fastattn.nn.decoder import DecoderState

if TYPE_CHECKING:
    from fastattn.zoo.seq2seq import Encoded, Seq2Seq

PAD, BOS, EOS = Vocabulary.pad_id, Vocabulary.bos_id, Vocabulary.eos_id
MAX_STEPS_PER_REPLAY = 8  # steps per graph replay, and so per host check of ``finished``
WARMUP_RUNS = 2  # eager runs on a side stream before the capture, as torch.cuda.graphs asks
GRAPHS_PER_MODEL = 4  # shapes (batch, source length, ...) a model keeps a captured graph for
UNCAPTURABLE_ATTENTIONS = ("local-m",)


def wants_graph(cuda_graph: object, attention: str, device: torch.device) -> bool:
    """Whether greedy decoding on ``device`` runs captured: ``cuda_graph`` True, False, or
    None (captured on a CUDA device when ``attention`` allows it)."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None (automatic), got {checks.describe(cuda_graph)}")
    capturable = attention not in UNCAPTURABLE_ATTENTIONS
    if cuda_graph:
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model and the source on a CUDA device, got {device}")
        if not capturable:
            raise ValueError(
                f"cuda_graph=True cannot capture attention {attention!r}: its window is cut on the host at "
                "every step; use cuda_graph=False"
            )
    return (device.type == "cuda" and capturable) if cuda_graph is None else cuda_graph


def steps_per_replay(max_length: int) -> int:
    """At most :data:`MAX_STEPS_PER_REPLAY`, as even as the replays allow, so that the last
    replay runs few steps past ``max_length``."""
    replays = math.ceil(max_length / MAX_STEPS_PER_REPLAY)
    return math.ceil(max_length / replays)


def _memory_tensors(memory: AttentionCache | torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of an encoded source's memory, by name (values only when they are not the keys)."""
    if not isinstance(memory, AttentionCache):
        return {"summary": memory}
    tensors = {"keys": memory.keys}
    if memory.values is not memory.keys:
        tensors["values"] = memory.values
    if memory.projected_keys is not None:
        tensors["projected_keys"] = memory.projected_keys
    return tensors


def _memory_from(tensors: dict[str, torch.Tensor], like: AttentionCache | torch.Tensor) -> AttentionCache | torch.Tensor:
    if not isinstance(like, AttentionCache):
        return tensors["summary"]
    keys = tensors["keys"]
    return AttentionCache(keys, tensors.get("values", keys), tensors.get("projected_keys"), like.score)


class StaticGreedySteps:
    """The static buffers of ``steps`` greedy steps, and the steps (:meth:`run`)."""

    def __init__(self, encoded: Encoded, state: DecoderState, steps: int):
        self.steps = steps
        self.memory = {name: tensor.clone() for name, tensor in _memory_tensors(encoded.memory).items()}
        self.encoded = encoded._replace(memory=_memory_from(self.memory, encoded.memory), lengths=encoded.lengths.clone())
        self.state = DecoderState(*(None if part is None else part.clone() for part in state))
        batch, device = state.hidden.shape[0], state.hidden.device
        self.previous = torch.full((batch,), BOS, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.tokens = torch.full((batch, steps), PAD, dtype=torch.long, device=device)
        self.weights = None
        if isinstance(encoded.memory, AttentionCache):
            self.weights = state.hidden.new_zeros(batch, steps, encoded.source_length)

    def load(self, encoded: Encoded, state: DecoderState) -> None:
        """A new source (of the same shapes) and its initial state; the first token is BOS."""
        checked_lengths(
            encoded.lengths, Layout((self.previous.shape[0],), True, None), state.hidden, encoded.source_length
        )
        for name, tensor in _memory_tensors(encoded.memory).items():
            self.memory[name].copy_(tensor)
        self.encoded.lengths.copy_(encoded.lengths)
        _copy_state(self.state, state)
        self.previous.fill_(BOS)
        self.finished.zero_()

    def run(self, model: Seq2Seq) -> None:
        """``steps`` greedy steps from the buffers, back into them: no host synchronisation,
        no value-dependent control flow, the same allocations every time."""
        previous, state = self.previous, self.state
        for column in range(self.steps):
            # t is read by attention "local-m" only, which is never run here (wants_graph).
            logits, state, weights = model.step(previous, state, self.encoded, None)
            previous = never_emitted(logits).argmax(dim=-1).masked_fill(self.finished, PAD)
            self.tokens[:, column] = previous
            if self.weights is not None:
                self.weights[:, column] = weights
            self.finished |= previous == EOS
        self.previous.copy_(previous)
        _copy_state(self.state, state)


def _copy_state(static: DecoderState, state: DecoderState) -> None:
    for static_part, part in zip(static, state):
        if static_part is not None:
            static_part.copy_(part)


def decode(buffers: StaticGreedySteps, advance: Callable[[], None], max_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calls ``advance`` (``buffers.steps`` steps) until every row has ended or ``max_length``
    steps are done -> (tokens (B, T), weights (B, T, S) or None), T where the eager loop stops."""
    tokens, weights = [], []
    for _ in range(math.ceil(max_length / buffers.steps)):
        advance()
        tokens.append(buffers.tokens.clone())
        if buffers.weights is not None:
            weights.append(buffers.weights.clone())
        if buffers.finished.all():  # the host check, once per replay
            break
    tokens = torch.cat(tokens, dim=1)[:, :max_length]
    length = _eager_length(tokens)
    return tokens[:, :length], (torch.cat(weights, dim=1)[:, :length] if weights else None)


def _eager_length(tokens: torch.Tensor) -> int:
    """The steps the eager loop takes: up to the last row's end token, or all of them."""
    ended = tokens == EOS
    if not ended.any(dim=1).all():
        return tokens.shape[1]
    return int(ended.int().argmax(dim=1).max()) + 1  # a row's end token is its first and only one


class GreedyGraph:
    """:meth:`StaticGreedySteps.run` captured once; :meth:`replay` runs it again."""

    def __init__(self, model: Seq2Seq, encoded: Encoded, state: DecoderState, steps: int):
        self.buffers = StaticGreedySteps(encoded, state, steps)
        self.buffers.load(encoded, state)
        side = torch.cuda.Stream(device=state.hidden.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.buffers.run(model)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.buffers.run(model)

    def replay(self) -> None:
        self.graph.replay()


# model -> its graphs by key, least recently used first; the graphs do not hold the model.
_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graph_key(model: Seq2Seq, encoded: Encoded, state: DecoderState, steps: int) -> tuple:
    inputs = {**_memory_tensors(encoded.memory), "lengths": encoded.lengths}
    inputs |= {name: part for name, part in zip(DecoderState._fields, state) if part is not None}
    layouts = tuple((name, tuple(t.shape), t.stride(), t.dtype, t.device) for name, t in inputs.items())
    return steps, backends.current_backend(), layouts, tuple(p.data_ptr() for p in model.parameters())


def _graph_for(model: Seq2Seq, encoded: Encoded, state: DecoderState, steps: int) -> GreedyGraph:
    graphs = _graphs.setdefault(model, OrderedDict())
    key = _graph_key(model, encoded, state, steps)
    if key in graphs:
        graphs.move_to_end(key)
    else:
        graphs[key] = GreedyGraph(model, encoded, state, steps)
        if len(graphs) > GRAPHS_PER_MODEL:
            graphs.popitem(last=False)
    return graphs[key]


@torch.no_grad()
def greedy(model: Seq2Seq, encoded: Encoded, state: DecoderState, max_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy decoding from an encoded source on a CUDA device, captured (arguments checked
    by the caller, :meth:`Seq2Seq.greedy_decode`) -> (tokens (B, T), weights (B, T, S) or None)."""
    graph = _graph_for(model, encoded, state, steps_per_replay(max_length))
    graph.buffers.load(encoded, state)
    return decode(graph.buffers, graph.replay, max_length)
