"""``fastattn.nn.Attention``: an attention layer that owns its score parameters.

Forward runs ``fastattn.attention`` (or ``fastattn.additive_attention`` for the
additive score, with W_k h taken from ``precompute`` when the keys are fixed across
decoder steps).  Local attention: ``local="m"`` centres a window of half-width
``window`` on p_t = t; ``local="p"`` predicts p_t = S * sigmoid(v_p^T tanh(W_p s_t))
(Luong 2015, eq. 9) and applies the Gaussian factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastattn import checks
from fastattn.functional.attention import additive_attention, attention
from fastattn.functional.attention_inputs import SCORES, layout_of

LOCAL_KINDS = (None, "m", "p")


@dataclass
class AttentionCache:
    """What ``Attention.precompute`` keeps of a source: computed once, read every step.

    ``projected_keys`` is W_k h for the additive score and W_a h for the general one
    (so that s^T W_a h becomes a dot product), else ``None``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    projected_keys: torch.Tensor | None


class Attention(torch.nn.Module):
    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        value_dim: int | None = None,
        *,
        score: str = "additive",
        attn_dim: int | None = None,
        max_source_len: int | None = None,
        window: int | None = None,
        local: str | None = None,
        bias: bool = True,
    ):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if local not in LOCAL_KINDS:
            raise ValueError(f"local must be one of {LOCAL_KINDS}, got {local!r}")
        self.query_dim = checks.positive_int("query_dim", query_dim)
        self.key_dim = checks.positive_int("key_dim", key_dim)
        self.value_dim = key_dim if value_dim is None else checks.positive_int("value_dim", value_dim)
        self.attn_dim = key_dim if attn_dim is None else checks.positive_int("attn_dim", attn_dim)
        self.score = score
        if window is not None:
            checks.positive_int("window", window, minimum=0)
            local = local or "m"
        elif local is not None:
            raise ValueError(f"local={local!r} needs window, the half-width D of the window")
        self.window, self.local = window, local
        if score in ("dot", "scaled_dot", "cosine") and query_dim != key_dim:
            raise ValueError(f"score {score!r} needs query_dim == key_dim, got {query_dim} and {key_dim}")
        if score == "general":
            self.weight = torch.nn.Parameter(torch.empty(query_dim, key_dim))
        if score == "location":
            if max_source_len is None:
                raise ValueError("score 'location' needs max_source_len, the longest source it will see")
            checks.positive_int("max_source_len", max_source_len)
            self.weight = torch.nn.Parameter(torch.empty(max_source_len, query_dim))
        if score == "additive":
            self.w_query = torch.nn.Parameter(torch.empty(self.attn_dim, query_dim))
            self.w_key = torch.nn.Parameter(torch.empty(self.attn_dim, key_dim))
            self.v = torch.nn.Parameter(torch.empty(self.attn_dim))
            self.bias = torch.nn.Parameter(torch.empty(self.attn_dim)) if bias else None
        if local == "p":
            self.position_weight = torch.nn.Parameter(torch.empty(self.attn_dim, query_dim))
            self.position_v = torch.nn.Parameter(torch.empty(self.attn_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in +-1/sqrt(fan_in), as torch.nn.Linear; fan_in is the size each
        parameter's products sum over (Dq for W_a of the general score, s^T W_a)."""
        for name, parameter in self.named_parameters(recurse=False):
            sums_over_rows = parameter.dim() == 1 or (name == "weight" and self.score == "general")
            fan_in = parameter.shape[0] if sums_over_rows else parameter.shape[-1]
            torch.nn.init.uniform_(parameter, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def precompute(self, keys: torch.Tensor, values: torch.Tensor | None = None) -> AttentionCache:
        """Work on the keys that does not depend on the query, done once per source."""
        checks.float_tensor("keys", keys)
        values = keys if values is None else values
        projected = None
        if self.score == "additive":
            projected = keys @ self.w_key.T
        elif self.score == "general":
            projected = keys @ self.weight.T
        return AttentionCache(keys, values, projected)

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        *,
        lengths: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        return_weights: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (context, weights); weights is None when ``return_weights=False``."""
        if cache is None and keys is None:
            raise ValueError("Attention needs keys, or a cache from precompute(keys)")
        if cache is not None and keys is not None:
            raise ValueError("give either keys or cache, not both (the cache already holds the keys)")
        if cache is not None and not isinstance(cache, AttentionCache):
            raise TypeError(f"cache must be an AttentionCache from precompute(), got {checks.describe(cache)}")
        cache = self.precompute(keys, values) if cache is None else cache
        checks.float_tensor("query", query)
        masking = dict(
            lengths=lengths,
            key_padding_mask=key_padding_mask,
            window=self.window,
            center=self._predicted_centers(query, cache.keys, lengths),
        )
        if self.score == "additive":
            outputs = additive_attention(
                query @ self.w_query.T, cache.projected_keys, self.v, cache.values,
                bias=self.bias, return_weights=return_weights, **masking,
            )
        elif self.score == "general":
            outputs = attention(
                query, cache.projected_keys, cache.values, score="dot", return_weights=return_weights, **masking
            )
        else:
            weight = self.weight if self.score == "location" else None
            outputs = attention(
                query, cache.keys, cache.values, score=self.score, weight=weight,
                return_weights=return_weights, **masking,
            )
        return outputs if return_weights else (outputs, None)

    def _predicted_centers(
        self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor | None
    ) -> torch.Tensor | None:
        """p_t = S * sigmoid(v_p^T tanh(W_p s_t)) for local-p, with S each source's length."""
        if self.local != "p":
            return None
        fraction = torch.sigmoid(torch.tanh(query @ self.position_weight.T) @ self.position_v)
        if lengths is None:
            layout = layout_of("query", query, "keys", keys)
            return fraction * keys.shape[len(layout.lead) : -1].numel()
        checks.integer_tensor("lengths", lengths)
        sizes = lengths.reshape(*lengths.shape, *([1] * (fraction.dim() - lengths.dim())))
        return fraction * sizes.to(fraction.dtype)

    def extra_repr(self) -> str:
        local = f", window={self.window}, local={self.local!r}" if self.window is not None else ""
        return f"{self.query_dim}, {self.key_dim}, {self.value_dim}, score={self.score!r}, attn_dim={self.attn_dim}{local}"
