"""Encoder-decoder models for sequence-to-sequence tasks, as in the papers.

Encoder: embeddings, then a bidirectional LSTM/GRU (``fastattn.nn``); h_j = [h_j^fwd; h_j^bwd].
Decoder: s_0 = tanh(W_s [h_S^fwd; h_1^bwd]) (the final states of both directions), then
one ``fastattn.nn.AttentionDecoderCell`` step per target token, p(y_t) = softmax(W_o h~_t).

``attention``:
  none      Sutskever 2014 / Cho 2014: no attention; the final encoder state c (what s_0
            is made of) is the only summary of the source, fed to every step: s_t = f(s_{t-1}, [y_{t-1}; c]).
  dot, general, cosine, location   Luong 2015 global attention with that score.
  scaled_dot  global attention with the dot score over sqrt(hidden_size) (Vaswani 2017).
  additive  Bahdanau 2015 (v^T tanh(W s + U h)).
  local-m   Luong 2015 local attention, monotonic: the general score over the window
            [t - D, t + D] around the decoder step t.
  local-p   Luong 2015 local attention, predictive: p_t = S sigmoid(v_p^T tanh(W_p s_t)),
            window [p_t - D, p_t + D], weights times a Gaussian of sigma D / 2.
``input_feeding`` (Luong 2015 section 3.3) feeds h~_{t-1} into the step t cell; without it the
step attends with s_{t-1} and feeds the context, as Bahdanau 2015 does.

Decoding: greedy and beam search (width, length normalisation score / length^alpha), both
returning the attention weights of every step of the chosen hypothesis.  Token ids follow
:class:`fastattn.data.vocabulary.Vocabulary` (pad 0, begin 1, end 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastattn.nn
from fastattn import checks
from fastattn.data.vocabulary import SPECIALS, Vocabulary, never_emitted
from fastattn.nn.attention import AttentionCache
from fastattn.nn.decoder import AttentionDecoderCell, DecoderState
from fastattn.zoo import graph_decoding

ATTENTIONS = ("none", "dot", "scaled_dot", "general", "additive", "cosine", "location", "local-m", "local-p")
CELLS = ("lstm", "gru")
PAD, BOS, EOS = Vocabulary.pad_id, Vocabulary.bos_id, Vocabulary.eos_id


def least_window(attention: str) -> int:
    """The smallest ``window`` D under ``attention``: local-p weighs its window by a Gaussian
    of sigma D / 2, which needs D >= 1; the others take D = 0 (local-m: step t alone)."""
    return 1 if attention == "local-p" else 0


@dataclass(frozen=True)
class Seq2SeqConfig:
    source_vocab_size: int
    target_vocab_size: int
    attention: str = "additive"
    cell: str = "lstm"
    embedding_size: int = 64
    hidden_size: int = 128  # the decoder's; each encoder direction has half of it
    input_feeding: bool = True
    window: int = 5  # D, the half-width of local-m / local-p windows
    max_source_length: int = 100  # the longest source the "location" score accepts

    def __post_init__(self):
        for name in ("source_vocab_size", "target_vocab_size"):  # the four special tokens at least
            checks.positive_int(name, getattr(self, name), minimum=len(SPECIALS))
        checks.positive_int("embedding_size", self.embedding_size)
        checks.positive_int("hidden_size", self.hidden_size)
        checks.positive_int("window", self.window, minimum=least_window(self.attention))
        checks.positive_int("max_source_length", self.max_source_length)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.hidden_size < 2 or self.hidden_size % 2:
            raise ValueError(f"hidden_size must be even (two encoder directions of half the size), got {self.hidden_size}")


class Encoded(NamedTuple):
    """A source batch after the encoder, what every decoder step reads."""

    memory: AttentionCache | torch.Tensor  # prepared encoder states; for attention "none" the summary c
    lengths: torch.Tensor  # (B,) source lengths
    source_length: int  # S, padded


class Decoded(NamedTuple):
    tokens: torch.Tensor  # (B, T) int64: the hypothesis, the end token, then padding
    weights: torch.Tensor | None  # (B, T, S) attention of every step; None for attention "none"


class Encoder(torch.nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.embedding = torch.nn.Embedding(config.source_vocab_size, config.embedding_size, padding_idx=PAD)
        recurrent = fastattn.nn.LSTM if config.cell == "lstm" else fastattn.nn.GRU
        self.rnn = recurrent(config.embedding_size, config.hidden_size // 2, batch_first=True, bidirectional=True)

    def forward(self, source: torch.Tensor, lengths: torch.Tensor):
        """-> (states h (B, S, H), final hidden [fwd; bwd] (B, H), final LSTM memory (B, H) or None)."""
        packed = pack_padded_sequence(self.embedding(source), lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, final = self.rnn(packed)
        states, _ = pad_packed_sequence(outputs, batch_first=True, total_length=source.shape[1])
        hidden, memory = final if isinstance(final, tuple) else (final, None)
        return states, _both_directions(hidden), None if memory is None else _both_directions(memory)


def _both_directions(final: torch.Tensor) -> torch.Tensor:
    """A one-layer bidirectional RNN's final states (2, B, H/2) as [forward; backward] (B, H)."""
    return torch.cat([final[0], final[1]], dim=-1)


class SummaryDecoderCell(torch.nn.Module):
    """The decoder step without attention: s_t = f(s_{t-1}, [y_{t-1}; c]), output s_t.

    Same call as ``AttentionDecoderCell`` (``memory`` is the summary c, (B, H)), no weights."""

    def __init__(self, input_size: int, hidden_size: int, cell: str):
        super().__init__()
        recurrent = fastattn.nn.LSTMCell if cell == "lstm" else fastattn.nn.GRUCell
        self.cell = recurrent(input_size + hidden_size, hidden_size)

    def forward(self, y_prev_embedded, state: DecoderState, summary: torch.Tensor, *, lengths=None):
        cell_input = torch.cat([y_prev_embedded, summary], dim=-1)
        if state.cell is None:
            hidden, memory = self.cell(cell_input, state.hidden), None
        else:
            hidden, memory = self.cell(cell_input, (state.hidden, state.cell))
        return hidden, DecoderState(hidden, memory, hidden), None


def decoder_cell(config: Seq2SeqConfig) -> torch.nn.Module:
    size, embedding = config.hidden_size, config.embedding_size
    if config.attention == "none":
        return SummaryDecoderCell(embedding, size, config.cell)
    score = {"local-m": "general", "local-p": "general"}.get(config.attention, config.attention)
    local = dict(window=config.window, local="p") if config.attention == "local-p" else {}
    return AttentionDecoderCell(
        embedding, size, size, score=score, cell=config.cell, input_feeding=config.input_feeding,
        max_source_len=config.max_source_length if score == "location" else None, **local,
    )


class Seq2Seq(torch.nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.target_embedding = torch.nn.Embedding(config.target_vocab_size, config.embedding_size, padding_idx=PAD)
        self.initial_hidden = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.initial_memory = torch.nn.Linear(config.hidden_size, config.hidden_size) if config.cell == "lstm" else None
        self.decoder = decoder_cell(config)
        self.output = torch.nn.Linear(config.hidden_size, config.target_vocab_size)

    def encode(self, source: torch.Tensor, lengths: torch.Tensor) -> tuple[Encoded, DecoderState]:
        """-> (what the decoder steps read, the initial decoder state s_0)."""
        _check_source(source, lengths)
        if self.config.attention == "location" and source.shape[1] > self.config.max_source_length:
            raise ValueError(
                f"attention 'location' was built for sources of at most {self.config.max_source_length} tokens, "
                f"got {source.shape[1]}"
            )
        states, final_hidden, final_memory = self.encoder(source, lengths)
        hidden = torch.tanh(self.initial_hidden(final_hidden))
        memory = None if final_memory is None else self.initial_memory(final_memory)
        state = DecoderState(hidden, memory, torch.zeros_like(hidden))
        summary = final_hidden if self.config.attention == "none" else self.decoder.precompute(states)
        return Encoded(summary, lengths, source.shape[1]), state

    def step(self, previous: torch.Tensor, state: DecoderState, encoded: Encoded, t: int):
        """Decoder step t (from 0) after token ``previous`` (B,) -> (logits (B, V), state, weights (B, S) or None)."""
        if self.config.attention == "local-m":
            return self._local_monotonic_step(previous, state, encoded, t)
        output, state, weights = self.decoder(
            self.target_embedding(previous), state, encoded.memory, lengths=encoded.lengths
        )
        return self.output(output), state, weights

    def _local_monotonic_step(self, previous: torch.Tensor, state: DecoderState, encoded: Encoded, t: int):
        """local-m (p_t = t): the step attends to the encoder states of the window
        [t - D, t + D] only, clipped to the source; weights outside it are zero."""
        first, end = max(0, t - self.config.window), min(encoded.source_length, t + self.config.window + 1)
        if first < end:
            lengths = (encoded.lengths - first).clamp(min=0, max=end - first)
        else:  # a step past the end of the source sees no state: its last one, masked (a zero context)
            first, lengths = end - 1, torch.zeros_like(encoded.lengths)
        memory = encoded.memory
        window = AttentionCache(
            memory.keys[:, first:end], memory.values[:, first:end], memory.projected_keys[:, first:end], memory.score
        )
        output, state, window_weights = self.decoder(self.target_embedding(previous), state, window, lengths=lengths)
        weights = window_weights.new_zeros(window_weights.shape[0], encoded.source_length)
        weights[:, first:end] = window_weights
        return self.output(output), state, weights

    def forward(self, source: torch.Tensor, source_lengths: torch.Tensor, target_input: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``target_input`` (B, T) starts with the begin token -> logits (B, T, V)."""
        checks.integer_tensor("target_input", target_input)
        if target_input.dim() != 2 or target_input.shape[0] != source.shape[0] or target_input.shape[1] == 0:
            raise ValueError(
                f"target_input must have shape (B={source.shape[0]}, T >= 1), got {checks.describe(target_input)}"
            )
        encoded, state = self.encode(source, source_lengths)
        logits = []
        for t in range(target_input.shape[1]):
            step_logits, state, _ = self.step(target_input[:, t], state, encoded, t)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def greedy(self, source: torch.Tensor, lengths: torch.Tensor, max_length: int, cuda_graph: bool | None = None) -> Decoded:
        """The most likely token at every step, until every sequence has ended or ``max_length``.

        ``cuda_graph``: run the steps captured in a CUDA graph (``fastattn.zoo.graph_decoding``,
        same tokens); None (default): on a CUDA device, unless the attention is "local-m"."""
        encoded, state = self.encode(source, lengths)
        return self.greedy_decode(encoded, state, max_length, cuda_graph=cuda_graph)

    @torch.no_grad()
    def greedy_decode(self, encoded: Encoded, state: DecoderState, max_length: int, *, cuda_graph: bool | None = None) -> Decoded:
        """:meth:`greedy` from an encoded source and its initial state (``encode``)."""
        checks.positive_int("max_length", max_length)
        if graph_decoding.wants_graph(cuda_graph, self.config.attention, state.hidden.device):
            return Decoded(*graph_decoding.greedy(self, encoded, state, max_length))
        previous = torch.full((state.hidden.shape[0],), BOS, dtype=torch.long, device=state.hidden.device)
        finished = torch.zeros_like(previous, dtype=torch.bool)
        tokens, weights = [], []
        for t in range(max_length):
            logits, state, step_weights = self.step(previous, state, encoded, t)
            previous = never_emitted(logits).argmax(dim=-1).masked_fill(finished, PAD)
            tokens.append(previous)
            weights.append(step_weights)
            finished |= previous == EOS
            if finished.all():
                break
        return Decoded(torch.stack(tokens, dim=1), _stacked(weights))

    @torch.no_grad()
    def beam_search(
        self, source: torch.Tensor, lengths: torch.Tensor, max_length: int, width: int = 4, length_penalty: float = 1.0,
        *, max_lengths: torch.Tensor | None = None,
    ) -> Decoded:
        """The ``width`` best partial hypotheses by log-probability at every step; at the end
        the best by log-probability / length^``length_penalty`` (0: no normalisation).
        ``max_lengths`` (B,), each in [1, ``max_length``]: a row's own limit, its hypotheses
        end there as if it had been searched alone with that ``max_length``."""
        checks.positive_int("max_length", max_length)
        checks.positive_int("width", width)
        length_penalty = checks.finite_number("length_penalty", length_penalty)
        batch = source.shape[0]
        if max_lengths is not None:
            checks.integer_tensor("max_lengths", max_lengths)
            checks.shape("max_lengths", max_lengths, (batch,), lambda: f"(B={batch},)")
            if checks.reads_values(max_lengths) and ((max_lengths < 1) | (max_lengths > max_length)).any():
                raise ValueError(f"max_lengths must be in [1, max_length={max_length}], got {max_lengths.tolist()}")
            row_limits = max_lengths.to(source.device).repeat_interleave(width)
        encoded, state = self.encode(source, lengths)
        beams = torch.arange(batch, device=source.device).repeat_interleave(width)
        encoded, state = _selected_encoded(encoded, beams), _selected_state(state, beams)
        scores = torch.full((batch, width), float("-inf"), device=source.device)
        scores[:, 0] = 0.0  # every beam starts as the same empty hypothesis: keep one
        previous = torch.full((batch * width,), BOS, dtype=torch.long, device=source.device)
        finished = torch.zeros_like(previous, dtype=torch.bool)
        tokens = previous.new_empty(batch * width, 0)
        weights = None
        for t in range(max_length):
            logits, state, step_weights = self.step(previous, state, encoded, t)
            log_probs = never_emitted(torch.log_softmax(logits.float(), dim=-1))
            log_probs[finished] = float("-inf")
            log_probs[finished, PAD] = 0.0  # an ended hypothesis continues with padding, at no cost
            vocabulary = log_probs.shape[-1]
            scores, chosen = (scores.reshape(-1, 1) + log_probs).reshape(batch, -1).topk(width, dim=-1)
            origin = (torch.arange(batch, device=source.device).unsqueeze(1) * width + chosen // vocabulary).reshape(-1)
            previous = (chosen % vocabulary).reshape(-1)
            state = _selected_state(state, origin)
            tokens = torch.cat([tokens[origin], previous.unsqueeze(1)], dim=1)
            if step_weights is not None:
                step_weights = step_weights[origin].unsqueeze(1)
                weights = step_weights if weights is None else torch.cat([weights[origin], step_weights], dim=1)
            finished = finished[origin] | (previous == EOS)
            if max_lengths is not None:
                finished |= row_limits <= t + 1  # beams stay in their row: its limit applies to all of them
            if finished.all():
                break
        hypothesis_lengths = (tokens != PAD).sum(dim=1).clamp(min=1).reshape(batch, width)
        best = (scores / hypothesis_lengths.to(scores.dtype) ** length_penalty).argmax(dim=-1)
        rows = torch.arange(batch, device=source.device) * width + best
        return Decoded(tokens[rows], None if weights is None else weights[rows])


def _check_source(source: object, lengths: object) -> None:
    """Token ids (B, S) and each sequence's length in [1, S] (B,)."""
    checks.integer_tensor("source", source)
    if source.dim() != 2 or 0 in source.shape:
        raise ValueError(f"source must have shape (B >= 1, S >= 1), got {checks.describe(source)}")
    checks.integer_tensor("lengths", lengths)
    checks.shape("lengths", lengths, (source.shape[0],), lambda: f"(B={source.shape[0]},)")
    if checks.reads_values(lengths) and ((lengths < 1) | (lengths > source.shape[1])).any():
        raise ValueError(f"lengths must be in [1, S={source.shape[1]}], got {lengths.tolist()}")


def _stacked(weights: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if weights[0] is None else torch.stack(weights, dim=1)


def _selected_state(state: DecoderState, rows: torch.Tensor) -> DecoderState:
    return DecoderState(*(None if part is None else part[rows] for part in state))


def _selected_encoded(encoded: Encoded, rows: torch.Tensor) -> Encoded:
    memory = encoded.memory
    if isinstance(memory, AttentionCache):
        memory = AttentionCache(
            memory.keys[rows], memory.values[rows],
            None if memory.projected_keys is None else memory.projected_keys[rows], memory.score,
        )
    else:
        memory = memory[rows]
    return Encoded(memory, encoded.lengths[rows], encoded.source_length)
