"""Checks the arguments of the attention functions and maps them onto the canonical
layout every backend receives: queries (N, T, Dq), keys and values (N, S, D),
lengths (N,), key_padding_mask (N, S), center (N, T).

It is the one place that knows the caller's shapes: leading batch dimensions
(``(..., T, D)``, heads being one more of them), a single decoder step (a 2-D
query ``(B, Dq)`` against 3-D or 4-D keys), and spatial keys ``(..., H, W, D)``.
Mask tensors may cover a prefix of the batch dimensions (``lengths`` of shape
``(B,)`` for queries ``(B, heads, T, D)``) and are broadcast over the rest.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch

from fastattn import checks

SCORES = ("dot", "scaled_dot", "general", "additive", "cosine", "location")
SCORE_PARAMETERS = {
    "dot": (),
    "scaled_dot": ("scale",),
    "general": ("weight",),
    "additive": ("w_query", "w_key", "v", "bias"),
    "cosine": ("scale",),
    "location": ("weight",),
}


class Layout(NamedTuple):
    """How the caller's tensors fold into the canonical (N, T, S) layout and back (a
    NamedTuple: made at every call, it costs half of a frozen dataclass)."""

    lead: tuple[int, ...]  # leading batch dimensions
    single_step: bool  # query (B, Dq): no T dimension in the outputs
    grid: tuple[int, int] | None  # (H, W) of spatial keys

    @property
    def batch(self) -> int:
        return math.prod(self.lead)

    @property
    def folded(self) -> bool:
        """Whether the caller's queries and per-query outputs are canonical already,
        (N, T, ...): then they are passed on as they are (no view made)."""
        return len(self.lead) == 1 and not self.single_step

    def fold_queries(self, query: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return query
        query_length = 1 if self.single_step else query.shape[-2]
        return query.reshape(self.batch, query_length, query.shape[-1])

    def fold_keys(self, keys: torch.Tensor) -> torch.Tensor:
        if len(self.lead) == 1 and self.grid is None:  # (N, S, D) already
            return keys
        positions = math.prod(keys.shape[len(self.lead) : -1])  # S, or H W: not -1, which an empty batch leaves open
        return keys.reshape(self.batch, positions, keys.shape[-1])

    def unfold_per_query(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, ...) -> (*lead, T, ...), without T for a single step."""
        if self.folded:
            return x
        return x.reshape(*self.lead, *x.shape[2 if self.single_step else 1 :])

    def unfold_weights(self, weights: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            weights = weights.reshape(*weights.shape[:-1], *self.grid)
        return self.unfold_per_query(weights)


def layout_of(query_name: str, query: torch.Tensor, keys_name: str, keys: torch.Tensor) -> Layout:
    query_dims, key_dims = query.dim(), keys.dim()
    if query_dims < 2:
        raise ValueError(
            f"{query_name} must have shape (..., T, D) or (B, D) for one decoder step, "
            f"got {checks.describe(query)}"
        )
    query_shape, key_shape = query.shape, keys.shape
    single_step = query_dims == 2 and key_dims >= 3
    lead_dims = query_dims - 1 if single_step else query_dims - 2
    lead = query_shape[:lead_dims]
    if key_dims == lead_dims + 2:
        grid = None
    elif key_dims == lead_dims + 3:
        grid = tuple(key_shape[-3:-1])
    else:
        raise ValueError(
            f"{keys_name} must have shape {(*lead, 'S', 'D')} or {(*lead, 'H', 'W', 'D')} "
            f"to match {query_name} of shape {tuple(query_shape)}, got {checks.describe(keys)}"
        )
    if key_shape[:lead_dims] != lead:
        raise ValueError(
            f"{keys_name} must have the batch dimensions {tuple(lead)} of {query_name}, "
            f"got {checks.describe(keys)}"
        )
    if not single_step and query_shape[-2] == 0:
        raise ValueError(f"{query_name} must have at least one query position, got {checks.describe(query)}")
    if math.prod(key_shape[lead_dims:-1]) == 0:  # math.prod: a symbolic S stays symbolic under export
        raise ValueError(f"{keys_name} must have at least one key position, got {checks.describe(keys)}")
    check_features(query_name, query)
    check_features(keys_name, keys)
    return Layout(tuple(lead), single_step, grid)


def check_location_source_length(weight: torch.Tensor, source_length: int) -> None:
    """The location score has a row of ``weight`` for each source position, up to S_max."""
    if source_length > weight.shape[0]:
        raise ValueError(
            f"score 'location' needs S <= S_max: weight has S_max={weight.shape[0]} rows, got S={source_length} keys"
        )


def check_features(name: str, tensor: torch.Tensor) -> None:
    """The last dimension (the features) must not be empty."""
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature in its last dimension, got {checks.describe(tensor)}")


def check_values(name: str, values: torch.Tensor, keys_name: str, keys: torch.Tensor, query_name: str, query: torch.Tensor) -> None:
    checks.float_like(name, values, query_name, query)
    if values.dim() != keys.dim() or values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {(*keys.shape[:-1], 'Dv')} to match {keys_name}, "
            f"got {checks.describe(values)}"
        )
    check_features(name, values)


def broadcast_over_batch(
    name: str, mask: torch.Tensor, layout: Layout, trailing: tuple[int, ...], meaning: checks.Meaning
) -> torch.Tensor:
    """A tensor of shape prefix-of-lead + trailing, broadcast to (N, *trailing)."""
    prefix_length = mask.dim() - len(trailing)
    if (
        prefix_length < 0
        or prefix_length > len(layout.lead)
        or tuple(mask.shape[:prefix_length]) != layout.lead[:prefix_length]
        or tuple(mask.shape[prefix_length:]) != trailing
    ):
        raise ValueError(
            f"{name} must have shape {checks.spelled(meaning)}, where (B, ...) are leading batch dimensions "
            f"of the query {layout.lead}, got {checks.describe(mask)}"
        )
    if prefix_length < len(layout.lead):
        padded = mask.reshape((*mask.shape[:prefix_length], *([1] * (len(layout.lead) - prefix_length)), *trailing))
        mask = padded.expand((*layout.lead, *trailing))
    return mask if len(layout.lead) == 1 else mask.reshape((layout.batch, *trailing))  # (N, *trailing) already


def checked_key_padding_mask(key_padding_mask: object, layout: Layout, query: torch.Tensor, source_length: int) -> torch.Tensor:
    """The (N, S) bool mask of a (B, ..., S) or grid (B, ..., H, W) ``key_padding_mask``."""
    checks.bool_tensor("key_padding_mask", key_padding_mask)
    checks.same_device("key_padding_mask", key_padding_mask, "query", query)
    over_grid = layout.grid is not None and tuple(key_padding_mask.shape[-2:]) == layout.grid
    trailing = layout.grid if over_grid else (source_length,)
    mask = broadcast_over_batch(
        "key_padding_mask", key_padding_mask, layout, trailing, lambda: f"(B, ..., {', '.join(map(str, trailing))})"
    )
    return mask.reshape(layout.batch, source_length) if over_grid else mask


def masking_arguments(
    layout: Layout,
    query: torch.Tensor,
    query_length: int,
    source_length: int,
    *,
    lengths: object,
    key_padding_mask: object,
    causal: object,
    window: object,
    center: object,
    gaussian: object,
) -> dict:
    """Checked mask arguments in the canonical layout, as keyword arguments of the ops."""
    checks.flag("causal", causal)
    if causal and query_length != source_length:
        raise ValueError(
            f"causal=True needs as many queries as keys (T == S), got T={query_length}, S={source_length}"
        )
    if window is not None:
        window = checks.positive_int("window", window, minimum=0)
    if gaussian is not None:
        checks.flag("gaussian", gaussian)
    if lengths is not None:
        lengths = checked_lengths(lengths, layout, query, source_length)
    if key_padding_mask is not None:
        key_padding_mask = checked_key_padding_mask(key_padding_mask, layout, query, source_length)
    if center is not None:
        center = _checked_center(center, layout, query, query_length, window)
    gaussian = center is not None if gaussian is None else gaussian
    if gaussian and (window is None or window < 1):
        raise ValueError(f"gaussian=True needs window >= 1 (sigma = window / 2), got window={window!r}")
    return {
        "lengths": lengths,
        "key_padding_mask": key_padding_mask,
        "causal": causal,
        "window": window,
        "center": center,
        "gaussian": gaussian,
    }


# The lengths tensor whose values were last found in [0, S]: (a weak reference to it, its
# _version then, S).  A decoder passes the same lengths at every step; reading their range
# again would cost two reductions and, on a GPU, a synchronisation per step.  Inference
# tensors have no version counter (they are checked every time).  Writes that bypass the
# counter (through .data or a NumPy view) go unchecked; the kernels clamp lengths to [0, S].
_last_checked_lengths: tuple = (lambda: None, -1, -1)


def _checked_before(lengths: torch.Tensor, source_length: int) -> bool:
    reference, version, checked_source_length = _last_checked_lengths
    if lengths.is_inference():
        return False
    return reference() is lengths and version == lengths._version and checked_source_length == source_length


def checked_lengths(lengths: object, layout: Layout, query: torch.Tensor, source_length: int) -> torch.Tensor:
    global _last_checked_lengths
    checks.integer_tensor("lengths", lengths)
    checks.same_device("lengths", lengths, "query", query)
    given = lengths
    lengths = broadcast_over_batch("lengths", lengths, layout, (), "(B,) or (B, ...)")
    if checks.reads_values(lengths) and lengths.numel() and not _checked_before(given, source_length):
        version = None if given.is_inference() else given._version  # before the check: a write during it counts
        if lengths.min() < 0 or lengths.max() > source_length:
            raise ValueError(
                f"lengths must lie in [0, S={source_length}], got values from "
                f"{int(lengths.min())} to {int(lengths.max())}"
            )
        if version is not None:
            _last_checked_lengths = (weakref.ref(given), version, source_length)
    return lengths if lengths.dtype == torch.int64 else lengths.to(torch.int64)  # no dispatch when it is


def center_dtypes(query_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes a local-p ``center`` may have: the query's, or float32 for a 16-bit
    query (positions past 256 need more than bfloat16's 8 bits: p_t = 365.4 would be 366)."""
    return (query_dtype, torch.float32) if query_dtype in (torch.float16, torch.bfloat16) else (query_dtype,)


def _checked_center(center: object, layout: Layout, query: torch.Tensor, query_length: int, window: object) -> torch.Tensor:
    checks.float_tensor("center", center)
    checks.same_device("center", center, "query", query)
    if center.dtype not in center_dtypes(query.dtype) and not checks.autocast_casts(center, query):
        raise TypeError(
            f"center must have the dtype of query ({query.dtype}), or float32 for a float16 or bfloat16 query, "
            f"got {checks.describe(center)}"
        )
    if window is None:
        raise ValueError("center (local-p attention) needs window, the half-width D of the window")
    trailing = () if layout.single_step else (query_length,)
    meaning = "(B,) for a single decoder step" if layout.single_step else lambda: f"(B, ..., T={query_length})"
    center = broadcast_over_batch("center", center, layout, trailing, meaning)
    if layout.single_step:
        center = center.reshape(layout.batch, query_length)
    if checks.reads_values(center) and not torch.isfinite(center).all():
        raise ValueError("center must hold finite positions, got inf or NaN")
    return center


def score_arguments(
    score: object,
    query: torch.Tensor,
    keys: torch.Tensor,
    source_length: int,
    *,
    weight: object,
    w_query: object,
    w_key: object,
    v: object,
    bias: object,
    scale: object,
) -> dict:
    """Checked score parameters, with the default scale filled in."""
    checks.choice("score", score, SCORES)
    given = {"weight": weight, "w_query": w_query, "w_key": w_key, "v": v, "bias": bias, "scale": scale}
    for name, value in given.items():
        if value is not None and name not in SCORE_PARAMETERS[score]:
            raise ValueError(f"{name} is not a parameter of score {score!r} (it takes {SCORE_PARAMETERS[score] or 'none'})")
    query_dim, key_dim = query.shape[-1], keys.shape[-1]
    if score in ("dot", "scaled_dot", "cosine") and query_dim != key_dim:
        raise ValueError(
            f"score {score!r} needs query and keys of the same feature size, got Dq={query_dim}, Dk={key_dim}"
        )
    if score == "scaled_dot":
        scale = 1 / math.sqrt(key_dim) if scale is None else checks.finite_number("scale", scale)
    elif score == "cosine":
        scale = 1.0 if scale is None else checks.finite_number("scale", scale)
    elif score == "general":
        _parameter("weight", weight, query, (query_dim, key_dim), lambda: f"(Dq={query_dim}, Dk={key_dim})", score)
    elif score == "location":
        _parameter("weight", weight, query, (None, query_dim), lambda: f"(S_max, Dq={query_dim})", score)
        check_location_source_length(weight, source_length)
    elif score == "additive":
        _parameter("w_query", w_query, query, (None, query_dim), lambda: f"(Da, Dq={query_dim})", score)
        attention_dim = w_query.shape[0]
        if attention_dim == 0:
            raise ValueError(f"w_query must have at least one row (the attention size Da >= 1), got {checks.describe(w_query)}")
        _parameter("w_key", w_key, query, (attention_dim, key_dim), lambda: f"(Da={attention_dim}, Dk={key_dim})", score)
        _parameter("v", v, query, (attention_dim,), lambda: f"(Da={attention_dim},)", score)
        if bias is not None:
            _parameter("bias", bias, query, (attention_dim,), lambda: f"(Da={attention_dim},)", score)
    return {"score": score, "weight": weight, "w_query": w_query, "w_key": w_key, "v": v, "bias": bias, "scale": scale}


def _parameter(
    name: str,
    value: object,
    query: torch.Tensor,
    expected: tuple,
    meaning: checks.Meaning,
    score: str,
    query_name: str = "query",
) -> None:
    if value is None:
        raise ValueError(f"score {score!r} needs {name} of shape {checks.spelled(meaning)}")
    checks.float_like(name, value, query_name, query)
    checks.shape(name, value, expected, meaning)


def additive_parameters(v: object, bias: object, query_projection: torch.Tensor) -> None:
    """v_a and b of additive attention applied to ready projections (q_proj's last size is Da)."""
    attention_dim = query_projection.shape[-1]
    meaning = lambda: f"(Da={attention_dim},)"  # noqa: E731 (spelled out only in an error)
    _parameter("v", v, query_projection, (attention_dim,), meaning, "additive", "q_proj")
    if bias is not None:
        _parameter("bias", bias, query_projection, (attention_dim,), meaning, "additive", "q_proj")
