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
from fastattn.functional.attention_inputs import SCORES, checked_key_padding_mask, checked_lengths, layout_of

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
    score: str  # of the module that made it


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
        checks.choice("score", score, SCORES)
        checks.choice("local", local, LOCAL_KINDS)
        checks.flag("bias", bias)
        self.query_dim = checks.positive_int("query_dim", query_dim)
        self.key_dim = checks.positive_int("key_dim", key_dim)
        self.value_dim = self.key_dim if value_dim is None else checks.positive_int("value_dim", value_dim)
        self.attn_dim = self.key_dim if attn_dim is None else checks.positive_int("attn_dim", attn_dim)
        self.score = score
        if window is not None:
            window = checks.positive_int("window", window, minimum=0)
            local = local or "m"
        elif local is not None:
            raise ValueError(f"local={local!r} needs window, the half-width D of the window")
        if local == "p" and window < 1:
            raise ValueError(f"local='p' applies a Gaussian of sigma = window / 2, so it needs window >= 1, got {window}")
        self.window, self.local = window, local
        if score in ("dot", "scaled_dot", "cosine") and query_dim != key_dim:
            raise ValueError(f"score {score!r} needs query_dim == key_dim, got {query_dim} and {key_dim}")
        if score == "general":
            self.weight = torch.nn.Parameter(torch.empty(query_dim, key_dim))
        if max_source_len is not None:
            max_source_len = checks.positive_int("max_source_len", max_source_len)
        if score == "location":
            if max_source_len is None:
                raise ValueError("score 'location' needs max_source_len, the longest source it will see")
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
        self._check_input("keys", keys, self.key_dim)
        if values is None:
            if self.value_dim != self.key_dim:
                raise ValueError(
                    f"values must be given: this Attention has value_dim={self.value_dim} and key_dim="
                    f"{self.key_dim}, so its keys cannot serve as values"
                )
            values = keys
        else:
            self._check_input("values", values, self.value_dim)
            if values.shape[:-1] != keys.shape[:-1]:
                raise ValueError(
                    f"values must have the positions of keys {tuple(keys.shape[:-1])} before its features, "
                    f"got {checks.describe(values)}"
                )
        projected = None
        if self.score == "additive":
            projected = keys @ self.w_key.T
        elif self.score == "general":
            projected = keys @ self.weight.T
        return AttentionCache(keys, values, projected, self.score)

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
        checks.flag("return_weights", return_weights)
        if cache is None and keys is None:
            raise ValueError("Attention needs keys, or a cache from precompute(keys)")
        if cache is not None and keys is not None:
            raise ValueError("give either keys or cache, not both (the cache already holds the keys)")
        if cache is not None and values is not None:
            raise ValueError(
                "give values to precompute(keys, values), not with cache: the cache already holds the values, "
                f"so values {checks.describe(values)} would be ignored"
            )
        if cache is not None:
            self.check_cache(cache)
        self._check_input("query", query, self.query_dim)
        cache = self.precompute(keys, values) if cache is None else cache
        layout = layout_of("query", query, "keys", cache.keys)
        if self.local == "m" and layout.single_step:
            raise ValueError(
                "local='m' centres the window on the query's own position t, which a single decoder "
                f"step (query {tuple(query.shape)}) does not carry: pass the queries of all steps "
                "(B, T, D), use local='p', or mask the keys outside step t's window with key_padding_mask"
            )
        masking = dict(
            lengths=lengths,
            key_padding_mask=key_padding_mask,
            window=self.window,
            center=self._predicted_centers(query, cache.keys, layout, lengths, key_padding_mask),
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

    def check_cache(self, cache: object) -> None:
        """``cache`` must come from the precompute() of an Attention with this score and
        these sizes (another module's would bring its own projection of the keys)."""
        if not isinstance(cache, AttentionCache):
            raise TypeError(f"cache must be an AttentionCache from precompute(), got {checks.describe(cache)}")
        if cache.score != self.score:
            raise ValueError(
                f"cache was made by an Attention with score {cache.score!r}; this one has score {self.score!r}"
            )
        projected_dim = {"additive": self.attn_dim, "general": self.query_dim}.get(self.score)
        expected = [("keys", cache.keys, self.key_dim), ("values", cache.values, self.value_dim)]
        if projected_dim is not None:
            expected.append(("projected_keys", cache.projected_keys, projected_dim))
        for name, tensor, features in expected:
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or tensor.shape[-1] != features:
                raise ValueError(
                    f"cache must hold {name} with {features} features, as this module's precompute() makes them, "
                    f"got {checks.describe(tensor)}"
                )
            if tensor.shape[:-1] != cache.keys.shape[:-1]:
                raise ValueError(
                    f"cache must hold {name} at the positions of its keys {tuple(cache.keys.shape[:-1])}, "
                    f"got {checks.describe(tensor)}"
                )

    def _check_input(self, name: str, tensor: object, features: int) -> None:
        """A float tensor with ``features`` last, of the dtype and device of the parameters."""
        checks.float_tensor(name, tensor)
        if tensor.dim() < 1 or tensor.shape[-1] != features:
            raise ValueError(f"{name} must have {features} features in its last dimension, got {checks.describe(tensor)}")
        parameter = next(self.parameters(), None)
        if parameter is not None:
            checks.like(name, tensor, "the module's parameters", parameter)

    def _predicted_centers(
        self, query: torch.Tensor, keys: torch.Tensor, layout, lengths: object, key_padding_mask: object
    ) -> torch.Tensor | None:
        """p_t = first + S * sigmoid(v_p^T tanh(W_p s_t)) for local-p, with first each
        source's first key and S its length: its keys within ``lengths`` and not padding,
        from the first to the last (the same p_t for a source however it is padded, on the
        left or the right, by lengths or by a mask; padding between keys counts)."""
        if self.local != "p":
            return None
        logit = torch.tanh(query @ self.position_weight.T) @ self.position_v
        # p_t in float32 at least: a 16-bit one is off by up to 1 past 256 (center_dtypes)
        fraction = torch.sigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32)))
        source_length = math.prod(keys.shape[len(layout.lead) : -1])  # symbolic under export
        if lengths is None and key_padding_mask is None:
            return fraction * source_length
        if key_padding_mask is None:
            first, sizes = None, checked_lengths(lengths, layout, query, source_length)
        else:
            visible = ~checked_key_padding_mask(key_padding_mask, layout, query, source_length)
            if lengths is not None:
                positions = torch.arange(source_length, device=query.device)
                visible = visible & (positions < checked_lengths(lengths, layout, query, source_length)[:, None])
            as_int = visible.to(torch.int8)
            first = as_int.argmax(-1)
            sizes = torch.where(visible.any(-1), source_length - as_int.flip(-1).argmax(-1) - first, 0)
        shape = layout.lead if layout.single_step else (*layout.lead, 1)
        centers = fraction * sizes.reshape(shape).to(fraction.dtype)
        return centers if first is None else centers + first.reshape(shape).to(fraction.dtype)

    def extra_repr(self) -> str:
        local = f", window={self.window}, local={self.local!r}" if self.window is not None else ""
        return f"{self.query_dim}, {self.key_dim}, {self.value_dim}, score={self.score!r}, attn_dim={self.attn_dim}{local}"
