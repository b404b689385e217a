"""Show, Attend and Tell (Xu et al. 2015) in miniature: a small CNN turns an image into
a grid of annotation vectors a_i, and an LSTM decoder attends over the grid at each word.

Per step t (the paper's section 3.1.2 and 4):
  alpha_t = softmax_i(v^T tanh(W_h h_{t-1} + W_a a_i + b))   fastattn.nn.Attention, additive, grid keys
  soft:  z_t = beta_t * sum_i alpha_ti a_i                   beta_t = sigmoid(w_beta h_{t-1} + b_beta)
  hard:  z_t = beta_t * a_{s_t},  s_t ~ Multinoulli(alpha_t)  fastattn.hard_attention (argmax when decoding)
  h_t, c_t = LSTM([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
  p(y_t) = softmax(L_o(E y_{t-1} + L_h h_t + L_z z_t))      the deep output layer
  h_0, c_0 = tanh(f_init(mean_i a_i))
The CNN is trained from scratch with the decoder; its features are layer-normalised and a
learned embedding of each grid cell is added, because a translation-equivariant CNN this
shallow could not otherwise tell left from right (VGG's large receptive fields and padding
carry position in the paper).  Cells whose 4x4 pixels hold no ink are masked out of the
attention (``mask_blank``, a key_padding_mask on the grid): they carry nothing to attend to.  The doubly stochastic regulariser and the REINFORCE objective of hard
attention are here as functions; the captions task combines them into its loss.
Not handled: beam search, images of another size than the model was built for.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

import fastattn
from fastattn import checks
from fastattn.data.vocabulary import never_emitted
from fastattn.nn import Attention, LSTMCell

ATTENTION_KINDS = ("soft", "hard")
POOLING = 4  # the encoder halves the image twice: grid = image / 4
# beta_t starts open (sigmoid(5) = 0.993): a gate starting half shut lets the decoder, which
# cannot yet read the untrained CNN's features, learn to shut the image out, and it then
# never learns to read it (measured: no progress in 400 steps; open: 0.84 exact match).
GATE_OPEN_BIAS = 5.0


class ConvEncoder(torch.nn.Module):
    """(B, H, W) images -> (B, H/4, W/4, feature_dim) annotation grid, each cell seeing 12x12 pixels."""

    def __init__(self, feature_dim: int, grid_size: tuple[int, int]):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, feature_dim, 1),
        )
        self.position = torch.nn.Parameter(torch.zeros(*grid_size, feature_dim))
        torch.nn.init.normal_(self.position, std=0.1)
        self.normalise = torch.nn.LayerNorm(feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.layers(images.unsqueeze(1)).permute(0, 2, 3, 1)
        return self.normalise(features) + self.position


class DecoderOutputs(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    weights: torch.Tensor  # alpha, (B, T, grid_h, grid_w)
    location_log_probs: torch.Tensor | None  # log p(s_t | a), (B, T); hard attention only
    entropy: torch.Tensor  # H[alpha_t], (B, T)


class ShowAttendTell(torch.nn.Module):
    def __init__(
        self,
        vocab_size: int,
        image_size: tuple[int, int],
        *,
        attention: str = "soft",
        feature_dim: int = 64,
        embed_dim: int = 32,
        hidden_dim: int = 128,
        attn_dim: int = 64,
        mask_blank: bool = True,
    ):
        super().__init__()
        checks.choice("attention", attention, ATTENTION_KINDS)
        height, width = image_size
        if height % POOLING or width % POOLING:
            raise ValueError(f"image_size must be multiples of {POOLING} (the encoder pools twice), got {image_size}")
        self.attention_kind = attention
        self.mask_blank = checks.flag("mask_blank", mask_blank)
        self.image_size = (height, width)
        self.grid_size = (height // POOLING, width // POOLING)
        self.encoder = ConvEncoder(checks.positive_int("feature_dim", feature_dim), self.grid_size)
        self.embedding = torch.nn.Embedding(checks.positive_int("vocab_size", vocab_size), embed_dim)
        self.attention = Attention(
            checks.positive_int("hidden_dim", hidden_dim), feature_dim, score="additive", attn_dim=attn_dim
        )
        self.gate = torch.nn.Linear(hidden_dim, 1)  # beta_t
        torch.nn.init.constant_(self.gate.bias, GATE_OPEN_BIAS)
        self.init_hidden = torch.nn.Linear(feature_dim, hidden_dim)
        self.init_memory = torch.nn.Linear(feature_dim, hidden_dim)
        self.cell = LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.output_hidden = torch.nn.Linear(hidden_dim, embed_dim)  # L_h
        self.output_context = torch.nn.Linear(feature_dim, embed_dim, bias=False)  # L_z
        self.output = torch.nn.Linear(embed_dim, vocab_size)  # L_o

    def forward(
        self, images: torch.Tensor, inputs: torch.Tensor, generator: torch.Generator | None = None
    ) -> DecoderOutputs:
        """Teacher forcing: ``inputs`` (B, T) are the previous words (<bos> first).
        Hard attention samples its locations with ``generator`` while training and
        takes the argmax in eval mode."""
        checks.integer_tensor("inputs", inputs)
        if inputs.dim() != 2 or inputs.shape[1] == 0:
            raise ValueError(f"inputs must have shape (B, T >= 1), got {checks.describe(inputs)}")
        grid, blank = self.encode(images), self.blank_cells(images)
        state, cache = self._initial_state(grid), self.attention.precompute(grid)
        embedded = self.embedding(inputs)
        logits, weights, log_probs, entropies = [], [], [], []
        for t in range(inputs.shape[1]):
            step_logits, state, alpha, log_prob = self._step(
                embedded[:, t], state, grid, cache, blank, sample=self.training, generator=generator
            )
            logits.append(step_logits)
            weights.append(alpha)
            log_probs.append(log_prob)
            entropies.append(attention_entropy(alpha))
        stacked_log_probs = torch.stack(log_probs, 1) if self.attention_kind == "hard" else None
        return DecoderOutputs(torch.stack(logits, 1), torch.stack(weights, 1), stacked_log_probs, torch.stack(entropies, 1))

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, bos: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (words (B, max_length), attention (B, max_length, grid_h, grid_w)): the most
        likely word at each step (never <pad> or <s>), fed back; hard attention takes each
        step's argmax location.  The caller cuts each row at its end-of-caption word."""
        checks.positive_int("max_length", max_length)
        grid, blank = self.encode(images), self.blank_cells(images)
        state, cache = self._initial_state(grid), self.attention.precompute(grid)
        previous = torch.full((images.shape[0],), bos, dtype=torch.int64, device=images.device)
        words, weights = [], []
        for _ in range(max_length):
            logits, state, alpha, _ = self._step(
                self.embedding(previous), state, grid, cache, blank, sample=False, generator=None
            )
            previous = never_emitted(logits).argmax(-1)
            words.append(previous)
            weights.append(alpha)
        return torch.stack(words, 1), torch.stack(weights, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) images -> (B, grid_h, grid_w, feature_dim) annotation vectors."""
        checks.float_tensor("images", images)
        checks.shape("images", images, (None, *self.image_size), f"(B, {self.image_size[0]}, {self.image_size[1]})")
        return self.encoder(images)

    def blank_cells(self, images: torch.Tensor) -> torch.Tensor | None:
        """(B, grid_h, grid_w) bool, True where a cell's 4x4 pixels hold no ink: the
        key_padding_mask of the attention (None when ``mask_blank`` is off)."""
        if not self.mask_blank:
            return None
        return torch.nn.functional.max_pool2d(images.unsqueeze(1), POOLING).squeeze(1) <= 0

    def _initial_state(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = grid.mean(dim=(1, 2))
        return torch.tanh(self.init_hidden(mean)), torch.tanh(self.init_memory(mean))

    def _step(self, embedded_previous, state, grid, cache, blank, *, sample: bool, generator):
        """-> (logits (B, vocab), new state, alpha (B, grid_h, grid_w), log p(s_t) (B,) or None)."""
        hidden, _ = state
        if self.attention_kind == "soft":
            context, alpha = self.attention(hidden, cache=cache, key_padding_mask=blank)
            log_prob = None
        else:
            context, _, log_prob, alpha = fastattn.hard_attention(
                hidden, grid, score="additive", w_query=self.attention.w_query, w_key=self.attention.w_key,
                v=self.attention.v, bias=self.attention.bias, key_padding_mask=blank, sample=sample, generator=generator,
            )
        context = torch.sigmoid(self.gate(hidden)) * context
        state = self.cell(torch.cat([embedded_previous, context], dim=-1), state)
        logits = self.output(embedded_previous + self.output_hidden(state[0]) + self.output_context(context))
        return logits, state, alpha, log_prob


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """H[alpha] = -sum_i alpha_i log alpha_i over the grid: (B, h, w) -> (B,)."""
    flat = weights.flatten(-2)
    return -(flat * torch.log(flat.clamp_min(torch.finfo(flat.dtype).tiny))).sum(-1)


def doubly_stochastic_penalty(weights: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """sum_i (1 - sum_t alpha_ti)^2 per caption (Xu 2015, eq. 14), over the steps where
    ``step_mask`` (B, T) is True: weights (B, T, h, w) -> (B,)."""
    checks.bool_tensor("step_mask", step_mask)
    checks.shape("step_mask", step_mask, tuple(weights.shape[:2]), f"(B, T) = {tuple(weights.shape[:2])}")
    attention_per_location = (weights.flatten(2) * step_mask.unsqueeze(-1).to(weights.dtype)).sum(1)
    return ((1 - attention_per_location) ** 2).sum(-1)


def reinforce_surrogate(
    caption_log_likelihood: torch.Tensor,
    location_log_probs: torch.Tensor,
    entropy: torch.Tensor,
    step_mask: torch.Tensor,
    baseline: float,
    *,
    reinforce_weight: float = 1.0,
    entropy_weight: float = 0.01,
) -> torch.Tensor:
    """The hard-attention objective to minimise, per caption (B,) (Xu 2015, eq. 12):
    its gradient is -[d log p(y|s,a) + lambda_r (log p(y|s,a) - b) d log p(s|a) + lambda_e d H[s]].
    The reward log p(y|s,a) (B,) is detached in the REINFORCE term; ``baseline`` b is
    the caller's moving average of it."""
    mask = step_mask.to(location_log_probs.dtype)
    advantage = (caption_log_likelihood.detach() - baseline).unsqueeze(-1)
    policy = (advantage * location_log_probs * mask).sum(-1)
    return -(caption_log_likelihood + reinforce_weight * policy + entropy_weight * (entropy * mask).sum(-1))
