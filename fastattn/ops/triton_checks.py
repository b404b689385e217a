"""The argument checks of the Triton ops.  ``torch.ops.fastattn.triton_*`` can be called
directly, not only through fastattn's functions (which check their own arguments first),
and their kernels index raw pointers by the sizes they are given: a shape, dtype or
device they would misread is refused here, naming the argument and what was expected (as
the C++ ops' checks do), before anything is launched.  Shapes only, so the checks also
run on fake tensors (opcheck, torch.compile).  The fake (meta) kernels of the C++ ops
(``fastattn.ops.attention``, ``fastattn.ops.recurrent``) check their arguments here too,
so that a call the kernels refuse is refused at trace time, with the same error: a
TypeError for a dtype, a ValueError for anything else (API.md, section 6)."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastattn.functional.attention_inputs import center_dtypes

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _refuse(op: str, message: str, error: type = ValueError) -> None:
    raise error(f"fastattn::{op}: {message}")


def _shape_text(shape: Sequence[Optional[int]]) -> str:
    sizes = ", ".join("*" if size is None else str(size) for size in shape)
    return f"({sizes},)" if len(shape) == 1 else f"({sizes})"


def tensor(op: str, name: str, value: Tensor, like: Tensor, shape: Sequence[Optional[int]], dtype=None,
           same_device: bool = True) -> None:
    """``value`` on ``like``'s device (unless not ``same_device``: a kernel that moves it), of
    ``dtype`` (default: ``like``'s; "integer": any integer dtype; a tuple: one of them) and of
    ``shape`` (None: any size)."""
    if same_device and value.device != like.device:
        _refuse(op, f"{name} must be on {like.device}, got a tensor on {value.device}")
    wanted = like.dtype if dtype is None else dtype
    if wanted == "integer":
        integer = not (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool)
        ok, text = integer, "an integer dtype"
    elif isinstance(wanted, tuple):
        ok, text = value.dtype in wanted, " or ".join(map(str, wanted))
    else:
        ok, text = value.dtype == wanted, str(wanted)
    if not ok:
        _refuse(op, f"{name} must have {text}, got {value.dtype}", TypeError)
    if value.shape != shape and (  # equal: the common case, one comparison (these run at every launch)
        value.dim() != len(shape) or any(size is not None and size != got for size, got in zip(shape, value.shape))
    ):
        _refuse(op, f"{name} must have shape {_shape_text(shape)}, got {tuple(value.shape)}")


def optional_tensor(op: str, name: str, value: Optional[Tensor], like: Tensor, shape: Sequence[Optional[int]],
                    dtype=None, same_device: bool = True) -> None:
    if value is not None:
        tensor(op, name, value, like, shape, dtype, same_device)


def float_tensor(op: str, name: str, value: Tensor, dim: int) -> None:
    if value.dtype not in FLOAT_DTYPES:
        _refuse(op, f"{name} must be float32, float64, float16 or bfloat16, got {value.dtype}", TypeError)
    if value.dim() != dim:
        _refuse(op, f"{name} must have {dim} dimensions, got shape {tuple(value.shape)}")


def attention(op: str, query: Tensor, keys: Tensor, values: Tensor, v: Optional[Tensor], bias: Optional[Tensor],
              score: str, scores: Sequence[str], scale: float, lengths: Optional[Tensor],
              key_padding_mask: Optional[Tensor], window: Optional[int], center: Optional[Tensor], gaussian: bool,
              masks_on_any_device: bool = False) -> None:
    """The arguments the attention forward and backward share: query (N, T, D), keys
    (N or 1, S, D), values (N, S, Dv), the additive score's v and bias (D,) and scale 1
    (a ValueError otherwise, as the kernels'), lengths (N,), key_padding_mask (N, S) bool
    (on query's device unless ``masks_on_any_device``: kernels that move them), window >= 0,
    center (N, T) with a window, gaussian with a window of at least 1."""
    if score not in scores:
        _refuse(op, f"score must be one of {', '.join(scores)}, got {score!r}")
    float_tensor(op, "query", query, 3)
    batch, query_length, features = query.shape
    source_length = keys.shape[1] if keys.dim() == 3 else None
    tensor(op, "keys", keys, query, (None, source_length, features))
    if keys.shape[0] not in (batch, 1):
        _refuse(op, f"keys must have shape ({batch} or 1, S, {features}), got {tuple(keys.shape)}")
    tensor(op, "values", values, query, (batch, source_length, None))
    if score == "additive":
        if v is None:
            _refuse(op, f"score 'additive' needs v of shape ({features},)")
        tensor(op, "v", v, query, (features,))
        optional_tensor(op, "bias", bias, query, (features,))
        if scale != 1.0:
            raise ValueError(f"fastattn::{op}: scale must be 1 with score 'additive' (v . tanh(q + k + bias) has "
                             f"none), got {scale}")
    elif v is not None or bias is not None:
        _refuse(op, f"v and bias are parameters of the additive score only, got them with score {score!r}")
    same_device = not masks_on_any_device
    optional_tensor(op, "lengths", lengths, query, (batch,), "integer", same_device)
    optional_tensor(op, "key_padding_mask", key_padding_mask, query, (batch, source_length), torch.bool, same_device)
    if window is not None and window < 0:
        _refuse(op, f"window must be >= 0, got {window}")
    if center is not None:
        if window is None:
            _refuse(op, "center (local-p attention) needs window")
        tensor(op, "center", center, query, (batch, query_length), center_dtypes(query.dtype))
    if gaussian and (window is None or window < 1):
        _refuse(op, f"gaussian needs window >= 1 (sigma = window / 2), got {window}")


def attention_backward(op: str, grad_context: Tensor, grad_weights: Optional[Tensor], query: Tensor, keys: Tensor,
                       values: Tensor, logsumexp: Tensor, logsumexp_dtype: torch.dtype = torch.float32,
                       row_stats: bool = False, values_are_keys: bool = False) -> None:
    """The gradients of the forward's outputs, grad_context (N, T, Dv) and grad_weights
    (N, T, S) where given, and logsumexp (N, T) of ``logsumexp_dtype`` (with ``row_stats``,
    the Triton forward's row statistics (N, T, 2) in its place); with ``values_are_keys``,
    keys and values of one shape."""
    batch, query_length = query.shape[:2]
    source_length, value_features = keys.shape[1], values.shape[2]
    tensor(op, "grad_context", grad_context, query, (batch, query_length, value_features))
    if row_stats:
        tensor(op, "row_stats", logsumexp, query, (batch, query_length, 2), logsumexp_dtype)
    else:
        tensor(op, "logsumexp", logsumexp, query, (batch, query_length), logsumexp_dtype)
    if grad_weights is not None:
        tensor(op, "grad_weights", grad_weights, query, (batch, query_length, source_length))
    if values_are_keys and keys.shape != values.shape:
        _refuse(op, f"values_are_keys needs keys and values of one shape, got keys {tuple(keys.shape)} and values "
                    f"{tuple(values.shape)}")


def cell(op: str, gates: int, state_name: str, tensors: dict[str, Optional[Tensor]], *,
         saved_dtype: Optional[torch.dtype] = torch.float32, any_h_width: bool = False) -> None:
    """The tensors of one LSTM/GRU cell op by name: B and H from tensors[state_name] (B, H);
    x (B, I), w_ih (gates * H, I), w_hh (gates * H, H), b_ih and b_hh (gates * H,), saved
    (B, 4H) of ``saved_dtype`` (None: the state's), any other (B, H).  With ``any_h_width``
    (the C++ LSTM cell), h is (B, H') and w_hh (gates * H, H') for any H'."""
    reference = tensors[state_name]
    float_tensor(op, state_name, reference, 2)
    batch, hidden = reference.shape
    x, h = tensors.get("x"), tensors.get("h")
    inputs = x.shape[1] if x is not None and x.dim() == 2 else None
    h_width = h.shape[1] if any_h_width and h is not None and h.dim() == 2 else hidden
    shapes = {
        "x": (batch, inputs), "h": (batch, h_width), "w_ih": (gates * hidden, inputs),
        "w_hh": (gates * hidden, h_width), "b_ih": (gates * hidden,), "b_hh": (gates * hidden,),
        "saved": (batch, 4 * hidden),
    }
    for name, value in tensors.items():
        optional_tensor(op, name, value, reference, shapes.get(name, (batch, hidden)),
                        saved_dtype if name == "saved" else None)


def layer(op: str, gates: int, tensors: dict[str, Optional[Tensor]]) -> None:
    """The tensors of one LSTM/GRU layer op by name, of w_hh's dtype and device: H from
    w_hh (gates * H, H); T and B from saved (T, B, 4H) float32, or without it from
    projected (T, B, gates * H) float32; b_hh (gates * H,), lengths (B,) of an integer
    dtype, h0 and c0 (B, H), any other (T + 1, B, H): the states and their gradients."""
    w_hh = tensors["w_hh"]
    float_tensor(op, "w_hh", w_hh, 2)
    hidden = w_hh.shape[1]
    leading = "saved" if "saved" in tensors else "projected"
    if tensors[leading].dim() != 3:
        _refuse(op, f"{leading} must have 3 dimensions (T, B, ·), got shape {tuple(tensors[leading].shape)}")
    steps, batch = tensors[leading].shape[:2]
    shapes = {
        "projected": (steps, batch, gates * hidden), "saved": (steps, batch, 4 * hidden),
        "w_hh": (gates * hidden, hidden), "b_hh": (gates * hidden,), "lengths": (batch,), "h0": (batch, hidden),
        "c0": (batch, hidden),
    }
    dtypes = {"projected": torch.float32, "saved": torch.float32, "lengths": "integer"}
    for name, value in tensors.items():
        optional_tensor(op, name, value, w_hh, shapes.get(name, (steps + 1, batch, hidden)), dtypes.get(name))


def projection(op: str, x: Tensor, w: Tensor, b: Optional[Tensor]) -> None:
    """x (M, K), w (N, K) and b (N,) of one dtype."""
    float_tensor(op, "x", x, 2)
    tensor(op, "w", w, x, (None, x.shape[1]))
    optional_tensor(op, "b", b, x, (w.shape[0],))


def weights_and_index(op: str, weights: Tensor, index: Tensor) -> None:
    """Hard attention's soft weights (N, T, S) of a float dtype and its positions (N, T) int64."""
    float_tensor(op, "weights", weights, 3)
    tensor(op, "index", index, weights, weights.shape[:2], torch.int64)


def hard_attention_outputs(op: str, weights: Tensor, index: Optional[Tensor], values: Tensor) -> None:
    """weights (N, T, S), index (N, T) int64 where given, values (N, S, Dv) of any float dtype."""
    if index is None:
        float_tensor(op, "weights", weights, 3)
    else:
        weights_and_index(op, weights, index)
    float_tensor(op, "values", values, 3)
    tensor(op, "values", values, weights, (weights.shape[0], weights.shape[2], None), values.dtype)


def hard_attention_outputs_backward(op: str, grad_context: Optional[Tensor], grad_log_prob: Optional[Tensor],
                                    weights: Tensor, index: Tensor) -> None:
    """weights and index as the forward's, grad_context (N, T, Dv) of any float dtype and
    grad_log_prob (N, T) of the weights' dtype where given."""
    weights_and_index(op, weights, index)
    if grad_context is not None:
        float_tensor(op, "grad_context", grad_context, 3)
        tensor(op, "grad_context", grad_context, weights, (*index.shape, None), grad_context.dtype)
    optional_tensor(op, "grad_log_prob", grad_log_prob, weights, index.shape)
