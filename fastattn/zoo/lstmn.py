"""The Long Short-Term Memory-Network (Cheng, Dong and Lapata 2016, section 3): an LSTM
whose single memory slot is replaced by a tape of every earlier hidden and cell state,
read with intra-attention (causal self-attention) at each step:

  a_i^t = v^T tanh(W_h h_i + W_x x_t + W_h~ h~_{t-1}),  i < t     fastattn.nn.Attention, additive
                                                                   (or score="general": [x_t; h~_{t-1}]^T W h_i),
  s^t = softmax(a^t);  [h~_t; c~_t] = sum_i s_i^t [h_i; c_i]       query [x_t; h~_{t-1}], values [h_i; c_i]
  i, f, o, c^ = gates(x_t, h~_t);  c_t = f * c~_t + i * c^;  h_t = o * tanh(c_t)

The last line is an LSTM cell run from the summary (h~_t, c~_t) instead of (h_{t-1}, c_{t-1}),
so it is ``fastattn.nn.LSTMCell``.  The tape starts with a zero state, so the first step
reads that.

``read_next_token=True`` (not in the paper) also stores, with each tape entry, the embedding of
the token that came right after it, and feeds what is read of it, x~_t, to the gates beside
x_t and h~_t.  Attention has no notion of position, so in the paper's model a value step
cannot single out the state of the key just before it, and the binding key -> value has to
pass through a blurred summary; with the next token stored, matching the key's state reads
its value directly (the read-out of a key-value memory).

``RecallClassifier`` puts an LSTMN or a plain ``fastattn.nn.LSTM`` of the same hidden size
under a linear read-out of the last hidden state.
Not handled: padding (every sequence in a batch has the same length), the paper's
dual-tape encoder-decoder fusion.
"""

from __future__ import annotations

import torch

from fastattn import checks
from fastattn.nn import LSTM, Attention, LSTMCell

ENCODERS = ("lstmn", "lstm")
SCORES = ("additive", "general")  # additive is the paper's; general (bilinear) matches contents more easily


class LSTMN(torch.nn.Module):
    def __init__(
        self, input_size: int, hidden_size: int, attn_dim: int | None = None, score: str = "additive",
        read_next_token: bool = False,
    ):
        super().__init__()
        self.input_size = checks.positive_int("input_size", input_size)
        self.hidden_size = checks.positive_int("hidden_size", hidden_size)
        checks.choice("score", score, SCORES)
        self.read_next_token = checks.flag("read_next_token", read_next_token)
        self.read_sizes = [hidden_size, hidden_size, input_size if read_next_token else 0]  # h~_t, c~_t, x~_t
        self.attention = Attention(
            input_size + hidden_size, hidden_size, sum(self.read_sizes), score=score, attn_dim=attn_dim or hidden_size
        )
        self.cell = LSTMCell(input_size * (2 if read_next_token else 1), hidden_size)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, input_size) -> (hidden states (B, T, hidden_size), intra-attention
        (B, T, T + 1): row t weighs the tape [zero state, h_1 .. h_{t}] read at step t+1,
        zero for entries not yet written)."""
        checks.float_tensor("inputs", inputs)
        if inputs.dim() != 3 or inputs.shape[1] == 0 or inputs.shape[2] != self.input_size:
            raise ValueError(
                f"inputs must have shape (B, T >= 1, input_size={self.input_size}), got {checks.describe(inputs)}"
            )
        batch, steps, _ = inputs.shape
        zeros = inputs.new_zeros(batch, self.hidden_size)
        hidden_tape, memory_tape = [zeros], [zeros]
        summary = zeros  # h~_{t-1}
        outputs, weights = [], inputs.new_zeros(batch, steps, steps + 1)
        for t in range(steps):
            keys = torch.stack(hidden_tape, 1)
            values = [keys, torch.stack(memory_tape, 1)]
            if self.read_next_token:  # entry i (the state after token i; 0: the zero state) -> token i + 1
                values.append(inputs[:, : t + 1])
            query = torch.cat([inputs[:, t], summary], -1)
            read, weights[:, t, : t + 1] = self.attention(query, keys, torch.cat(values, -1))
            summary, memory_summary, next_token_read = read.split(self.read_sizes, -1)
            cell_input = torch.cat([inputs[:, t], next_token_read], -1) if self.read_next_token else inputs[:, t]
            hidden, memory = self.cell(cell_input, (summary, memory_summary))
            hidden_tape.append(hidden)
            memory_tape.append(memory)
            outputs.append(hidden)
        return torch.stack(outputs, 1), weights


class RecallClassifier(torch.nn.Module):
    """Token ids (B, T) -> logits (B, classes) from the last hidden state of an LSTMN or an LSTM."""

    def __init__(
        self, vocab_size: int, classes: int, *, encoder: str = "lstmn", embed_dim: int = 32, hidden_size: int = 64,
        score: str = "additive", read_next_token: bool = False,
    ):
        super().__init__()
        checks.choice("encoder", encoder, ENCODERS)
        self.encoder_kind = encoder
        self.embedding = torch.nn.Embedding(checks.positive_int("vocab_size", vocab_size), embed_dim)
        if encoder == "lstmn":
            self.encoder = LSTMN(embed_dim, hidden_size, score=score, read_next_token=read_next_token)
        else:
            self.encoder = LSTM(embed_dim, hidden_size, batch_first=True)
        self.readout = torch.nn.Linear(hidden_size, checks.positive_int("classes", classes))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits (B, classes), the LSTMN's intra-attention (B, T, T + 1) or None for the LSTM)."""
        checks.integer_tensor("tokens", tokens)
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape (B, T >= 1), got {checks.describe(tokens)}")
        hidden, weights = self.encoder(self.embedding(tokens))
        if self.encoder_kind == "lstm":
            weights = None
        return self.readout(hidden[:, -1]), weights
