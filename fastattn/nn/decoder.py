"""``AttentionDecoderCell``: one step of an attention decoder, s_t = f(s_{t-1}, y_{t-1}, c_t).

input_feeding=True (Luong 2015, section 3.3): the cell reads [y_{t-1}; h~_{t-1}], then
  attends with its new state s_t: c_t = attend(s_t), h~_t = tanh(W_c [c_t; s_t]).
input_feeding=False (Bahdanau 2015): attends with the previous state, c_t = attend(s_{t-1}),
  and the cell reads [y_{t-1}; c_t]; the output is h~_t = tanh(W_c [c_t; s_t]) too.
The output h~_t (B, hidden_size) feeds the vocabulary projection.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

from fastattn import backends, checks
from fastattn.functional.attention_inputs import check_location_source_length
from fastattn.nn.attention import Attention, AttentionCache
from fastattn.nn.recurrent import GRUCell, LSTMCell

CELLS = {"lstm": LSTMCell, "gru": GRUCell}


class DecoderState(NamedTuple):
    hidden: torch.Tensor  # s_t, (B, hidden_size)
    cell: torch.Tensor | None  # LSTM memory c_t, None for a GRU
    attentional: torch.Tensor  # h~_t, (B, hidden_size)


class AttentionDecoderCell(torch.nn.Module):
    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        key_dim: int,
        *,
        score: str = "additive",
        cell: str = "lstm",
        input_feeding: bool = True,
        attn_dim: int | None = None,
        max_source_len: int | None = None,
        window: int | None = None,
        local: str | None = None,
    ):
        super().__init__()
        checks.choice("cell", cell, tuple(CELLS))
        self.input_size = checks.positive_int("input_size", input_size)
        self.hidden_size = checks.positive_int("hidden_size", hidden_size)
        self.input_feeding = checks.flag("input_feeding", input_feeding)
        self.attention = Attention(
            hidden_size, key_dim, score=score, attn_dim=attn_dim,
            max_source_len=max_source_len, window=window, local=local,
        )
        fed_size = hidden_size if input_feeding else key_dim
        self.cell = CELLS[cell](input_size + fed_size, hidden_size)
        self.combine = torch.nn.Linear(key_dim + hidden_size, hidden_size, bias=False)

    def precompute(self, keys: torch.Tensor, values: torch.Tensor | None = None) -> AttentionCache:
        """The encoder states, prepared once per source (W_k h for additive attention)."""
        return self.attention.precompute(keys, values)

    def initial_state(self, batch_size: int, like: torch.Tensor) -> DecoderState:
        """All-zero state on ``like``'s device and dtype."""
        zeros = like.new_zeros(batch_size, self.hidden_size)
        return DecoderState(zeros, zeros if isinstance(self.cell, LSTMCell) else None, zeros)

    def forward(
        self,
        y_prev_embedded: torch.Tensor,
        state: DecoderState | None,
        cache: AttentionCache,
        *,
        lengths: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """-> (output h~_t (B, hidden_size), new state, attention weights (B, S)).

        ``key_padding_mask`` (B, S), True = not attended: e.g. outside a local-m window
        centred on this step (a single-step query has no t of its own, so a decoder built
        with ``local="m"`` raises; mask the keys instead)."""
        checks.float_tensor("y_prev_embedded", y_prev_embedded)
        checks.shape("y_prev_embedded", y_prev_embedded, (None, self.input_size), f"(B, input_size={self.input_size})")
        checks.like("y_prev_embedded", y_prev_embedded, "the decoder's parameters", self.combine.weight)
        self.attention.check_cache(cache)
        if cache.keys.dim() < 3 or cache.keys.shape[0] != y_prev_embedded.shape[0]:
            raise ValueError(
                f"cache must hold the keys (B={y_prev_embedded.shape[0]}, S, key_dim) of y_prev_embedded's batch, "
                f"got keys {checks.describe(cache.keys)}"
            )
        source_length = math.prod(cache.keys.shape[1:-1])
        if source_length == 0:
            raise ValueError(f"cache must hold at least one key position, got keys {checks.describe(cache.keys)}")
        checks.like("cache.keys", cache.keys, "y_prev_embedded", y_prev_embedded)
        if self.attention.score == "location":
            check_location_source_length(self.attention.weight, source_length)
        if state is None:
            state = self.initial_state(y_prev_embedded.shape[0], y_prev_embedded)
        else:
            state = self._checked_state(state, y_prev_embedded)
        tensors = (y_prev_embedded, *state, cache.keys, cache.values, cache.projected_keys)
        inputs = itertools.chain(tensors, self.parameters())  # the parameters are read only under a transform
        fused_step = backends.fused("attention_decoder_step", y_prev_embedded.device.type, inputs=inputs)
        masks = dict(lengths=lengths, key_padding_mask=key_padding_mask)
        fused = None if fused_step is None else fused_step(self, y_prev_embedded, state, cache, **masks)
        if fused is not None:
            attentional, hidden, memory, weights = fused
            return attentional, DecoderState(hidden, memory, attentional), weights
        return self._composed_step(y_prev_embedded, state, cache, masks)

    def _checked_state(self, state: object, like: torch.Tensor) -> DecoderState:
        """A DecoderState (or a 3-tuple) of (B, hidden_size) tensors like ``like``."""
        if not isinstance(state, tuple) or len(state) != 3:
            raise TypeError(f"state must be a DecoderState (hidden, cell, attentional) or None, got {checks.describe(state)}")
        state = DecoderState(*state)
        meaning = lambda: f"(B={like.shape[0]}, hidden_size={self.hidden_size})"  # noqa: E731 (only in an error)
        is_lstm = isinstance(self.cell, LSTMCell)
        for name, tensor in zip(DecoderState._fields, state):
            if name == "cell" and not is_lstm:
                if tensor is not None:
                    raise ValueError(f"state.cell must be None for a GRU decoder, got {checks.describe(tensor)}")
                continue
            checks.float_tensor(f"state.{name}", tensor)
            checks.like(f"state.{name}", tensor, "y_prev_embedded", like)
            checks.shape(f"state.{name}", tensor, (like.shape[0], self.hidden_size), meaning)
        return state

    def _composed_step(
        self, y_prev_embedded: torch.Tensor, state: DecoderState, cache: AttentionCache, masks: dict
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """The step as a sequence of the attention and cell ops (any backend, any option)."""
        if self.input_feeding:
            hidden, memory = self._step(torch.cat([y_prev_embedded, state.attentional], dim=-1), state)
            context, weights = self.attention(hidden, cache=cache, **masks)
        else:
            context, weights = self.attention(state.hidden, cache=cache, **masks)
            hidden, memory = self._step(torch.cat([y_prev_embedded, context], dim=-1), state)
        attentional = torch.tanh(self.combine(torch.cat([context, hidden], dim=-1)))
        return attentional, DecoderState(hidden, memory, attentional), weights

    def _step(self, cell_input: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, torch.Tensor | None]:
        if state.cell is None:
            return self.cell(cell_input, state.hidden), None
        return self.cell(cell_input, (state.hidden, state.cell))
