"""Bad inputs to the attention API are refused with a TypeError (wrong kind of
object or dtype) or a ValueError (wrong shape, range or device) whose message names
the offending argument (API.md section 6).

The "meta" device stands in for a second device on a CPU-only machine.  Each case
runs once per name in ``BACKENDS`` (the checks come before any backend runs, so
every backend must refuse the same inputs the same way).
"""

from __future__ import annotations

import math
import re
from functools import partial

import numpy as np
import pytest
import torch

import fastattn
from fastattn.nn import Attention, AttentionDecoderCell
from fastattn.nn.attention import AttentionCache
from tests.problems import cpu_backends

BACKENDS = cpu_backends()

F64 = torch.float64


def _randn(*shape, dtype=F64, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _f32(*shape, device="cpu"):
    return torch.randn(*shape, device=device)


def _mask(*shape, value=False, device="cpu"):
    return torch.full(shape, value, dtype=torch.bool, device=device)


# B=2, T=3, S=5, Dq=Dk=4, Dv=6
QUERY = _randn(2, 3, 4)
KEYS = _randn(2, 5, 4)
VALUES = _randn(2, 5, 6)
KEYS_3 = _randn(2, 5, 3)  # Dk=3 != Dq
QUERY_STEP = _randn(2, 4)  # one decoder step
KEYS_GRID = _randn(2, 2, 3, 4)  # (B, H, W, D), S=6
QUERY_HEADS = _randn(2, 2, 3, 4)
KEYS_HEADS = _randn(2, 2, 5, 4)
ON_META = _randn(2, 5, 4, device="meta")
LENGTHS = torch.tensor([5, 2])
CENTER = torch.tensor([[0.0, 1.0, 2.0], [4.5, 0.0, 3.0]], dtype=F64)
# score parameters for Dq=4, Dk=3 (general) / Dk=4 (additive), Da=5, S_max=8
W_GENERAL = _randn(4, 3)
W_QUERY, W_KEY, V_A, B_A = _randn(5, 4), _randn(5, 4), _randn(5), _randn(5)
W_LOCATION = _randn(8, 4)
ADDITIVE = dict(score="additive", w_query=W_QUERY, w_key=W_KEY, v=V_A, bias=B_A)
# additive_attention: projections with Da=5
Q_PROJ, K_PROJ = _randn(2, 3, 5), _randn(2, 5, 5)


def case(case_id, error, argument, function, *args, **kwargs):
    """``function(*args, **kwargs)`` must raise ``error`` naming ``argument``."""
    return pytest.param(partial(function, *args, **kwargs), error, argument, id=case_id)


def attention_case(case_id, error, argument, *args, **kwargs):
    """fastattn.attention(QUERY, KEYS, ...) with ``args`` replacing the leading ones."""
    positional = (*args, *(QUERY, KEYS)[len(args) :])
    return case("attention-" + case_id, error, argument, fastattn.attention, *positional, **kwargs)


def additive_case(case_id, error, argument, *args, **kwargs):
    defaults = (Q_PROJ, K_PROJ, V_A, VALUES)
    positional = (*args, *defaults[len(args) :])
    return case("additive-" + case_id, error, argument, fastattn.additive_attention, *positional, **kwargs)


def sdpa_case(case_id, error, argument, *args, **kwargs):
    defaults = (QUERY, KEYS, VALUES)
    positional = (*args, *defaults[len(args) :])
    return case("sdpa-" + case_id, error, argument, fastattn.scaled_dot_product_attention, *positional, **kwargs)


def hard_case(case_id, error, argument, *args, **kwargs):
    positional = (*args, *(QUERY, KEYS)[len(args) :])
    return case("hard-" + case_id, error, argument, fastattn.hard_attention, *positional, **kwargs)


def module_case(case_id, error, argument, **kwargs):
    return case("Attention-init-" + case_id, error, argument, Attention, **kwargs)


def forward_case(case_id, error, argument, module_kwargs, *args, **kwargs):
    """Attention(**module_kwargs)(F32_QUERY, F32_KEYS, ...) with ``args`` replacing
    the leading ones."""
    positional = (*args, *(F32_QUERY, F32_KEYS)[len(args) :])

    def run():
        module = Attention(**module_kwargs)
        return module(*positional, **kwargs)

    return pytest.param(run, error, argument, id="Attention-forward-" + case_id)


F32_QUERY, F32_KEYS, F32_VALUES = QUERY.float(), KEYS.float(), VALUES.float()
ADDITIVE_MODULE = dict(query_dim=4, key_dim=4)
LOCATION_MODULE = dict(query_dim=4, key_dim=4, score="location")
LOCAL_P_MODULE = dict(query_dim=4, key_dim=4, window=1, local="p")

CASES = [
    # ---------------------------------------------------------------- attention
    # not tensors
    attention_case("query-list", TypeError, "query", [[1.0, 2.0]]),
    attention_case("query-none", TypeError, "query", None),
    attention_case("keys-numpy", TypeError, "keys", QUERY, np.zeros((2, 5, 4))),
    attention_case("values-list", TypeError, "values", QUERY, KEYS, [[0.0]]),
    # integer and bool dtypes
    attention_case("query-int", TypeError, "query", QUERY.long()),
    attention_case("query-bool", TypeError, "query", QUERY > 0),
    attention_case("keys-int", TypeError, "keys", QUERY, KEYS.int()),
    attention_case("values-bool", TypeError, "values", QUERY, KEYS, VALUES > 0),
    # mismatched dtypes
    attention_case("keys-float32", TypeError, "keys", QUERY, KEYS.float()),
    attention_case("values-float32", TypeError, "values", QUERY, KEYS, VALUES.float()),
    attention_case("weight-float32", TypeError, "weight", QUERY, KEYS_3, score="general", weight=W_GENERAL.float()),
    attention_case("w_query-float32", TypeError, "w_query", **{**ADDITIVE, "w_query": W_QUERY.float()}),
    attention_case("w_key-float32", TypeError, "w_key", **{**ADDITIVE, "w_key": W_KEY.float()}),
    attention_case("v-float32", TypeError, "v", **{**ADDITIVE, "v": V_A.float()}),
    attention_case("bias-float32", TypeError, "bias", **{**ADDITIVE, "bias": B_A.float()}),
    attention_case("center-float32", TypeError, "center", window=1, center=CENTER.float()),
    # mismatched devices
    attention_case("keys-meta", ValueError, "keys", QUERY, ON_META),
    attention_case("query-meta", ValueError, "keys", _randn(2, 3, 4, device="meta"), KEYS),
    attention_case("values-meta", ValueError, "values", QUERY, KEYS, _randn(2, 5, 6, device="meta")),
    attention_case("weight-meta", ValueError, "weight", QUERY, KEYS_3, score="general", weight=_randn(4, 3, device="meta")),
    attention_case("w_key-meta", ValueError, "w_key", **{**ADDITIVE, "w_key": _randn(5, 4, device="meta")}),
    attention_case("lengths-meta", ValueError, "lengths", lengths=LENGTHS.to("meta")),
    attention_case("key_padding_mask-meta", ValueError, "key_padding_mask", key_padding_mask=_mask(2, 5, device="meta")),
    attention_case("center-meta", ValueError, "center", window=1, center=_randn(2, 3, device="meta")),
    # ranks and batch dimensions
    attention_case("query-1d", ValueError, "query", _randn(4)),
    attention_case("query-0d", ValueError, "query", torch.tensor(1.0, dtype=F64)),
    attention_case("keys-2d", ValueError, "keys", QUERY, _randn(5, 4)),
    attention_case("keys-5d", ValueError, "keys", QUERY, _randn(2, 1, 2, 5, 4)),
    attention_case("keys-batch", ValueError, "keys", QUERY, _randn(3, 5, 4)),
    attention_case("keys-heads", ValueError, "keys", QUERY_HEADS, _randn(2, 3, 5, 4)),
    attention_case("query-no-positions", ValueError, "query", _randn(2, 0, 4)),
    attention_case("keys-no-positions", ValueError, "keys", QUERY, _randn(2, 0, 4)),
    attention_case("query-no-features", ValueError, "query", _randn(2, 3, 0), _randn(2, 5, 0)),
    attention_case("keys-no-features", ValueError, "keys", QUERY, _randn(2, 5, 0)),
    attention_case("values-no-features", ValueError, "values", QUERY, KEYS, _randn(2, 5, 0)),
    attention_case("step-keys-batch", ValueError, "keys", QUERY_STEP, _randn(3, 5, 4)),
    # values of the wrong length / rank / batch
    attention_case("values-length", ValueError, "values", QUERY, KEYS, _randn(2, 4, 6)),
    attention_case("values-rank", ValueError, "values", QUERY, KEYS, _randn(2, 5, 1, 6)),
    attention_case("values-batch", ValueError, "values", QUERY, KEYS, _randn(1, 5, 6)),
    attention_case("values-grid", ValueError, "values", QUERY, KEYS_GRID, _randn(2, 3, 2, 6)),
    # Dq != Dk for the dot-product scores
    attention_case("dot-Dk", ValueError, "keys", QUERY, KEYS_3, score="dot"),
    attention_case("scaled_dot-Dk", ValueError, "keys", QUERY, KEYS_3, score="scaled_dot"),
    attention_case("cosine-Dk", ValueError, "keys", QUERY, KEYS_3, score="cosine"),
    # unknown score
    attention_case("score-unknown", ValueError, "score", score="bilinear"),
    attention_case("score-case", ValueError, "score", score="Dot"),
    attention_case("score-not-a-string", TypeError, "score", score=3),
    # missing and extra score parameters
    attention_case("dot-weight", ValueError, "weight", score="dot", weight=W_GENERAL),
    attention_case("dot-scale", ValueError, "scale", score="dot", scale=2.0),
    attention_case("scaled_dot-bias", ValueError, "bias", score="scaled_dot", bias=B_A),
    attention_case("cosine-v", ValueError, "v", score="cosine", v=V_A),
    attention_case("general-scale", ValueError, "scale", QUERY, KEYS_3, score="general", weight=W_GENERAL, scale=1.0),
    attention_case("general-w_query", ValueError, "w_query", QUERY, KEYS_3, score="general", weight=W_GENERAL, w_query=W_QUERY),
    attention_case("additive-weight", ValueError, "weight", **ADDITIVE, weight=W_GENERAL),
    attention_case("location-w_key", ValueError, "w_key", score="location", weight=W_LOCATION, w_key=W_KEY),
    attention_case("general-missing-weight", ValueError, "weight", QUERY, KEYS_3, score="general"),
    attention_case("location-missing-weight", ValueError, "weight", score="location"),
    attention_case("additive-missing-w_query", ValueError, "w_query", **{**ADDITIVE, "w_query": None}),
    attention_case("additive-missing-w_key", ValueError, "w_key", **{**ADDITIVE, "w_key": None}),
    attention_case("additive-missing-v", ValueError, "v", **{**ADDITIVE, "v": None}),
    # score parameters that are not tensors, or of the wrong shape
    attention_case("general-weight-list", TypeError, "weight", QUERY, KEYS_3, score="general", weight=[[1.0]]),
    attention_case("general-weight-int", TypeError, "weight", QUERY, KEYS_3, score="general", weight=W_GENERAL.long()),
    attention_case("general-weight-transposed", ValueError, "weight", QUERY, KEYS_3, score="general", weight=W_GENERAL.T),
    attention_case("general-weight-1d", ValueError, "weight", QUERY, KEYS_3, score="general", weight=_randn(4)),
    attention_case("general-weight-3d", ValueError, "weight", QUERY, KEYS_3, score="general", weight=_randn(1, 4, 3)),
    attention_case("additive-w_query-Dq", ValueError, "w_query", **{**ADDITIVE, "w_query": _randn(5, 3)}),
    attention_case("additive-w_query-1d", ValueError, "w_query", **{**ADDITIVE, "w_query": _randn(5)}),
    attention_case("additive-w_query-no-rows", ValueError, "w_query",  # Da = 0, as additive_attention's q_proj
                   **{**ADDITIVE, "w_query": _randn(0, 4), "w_key": _randn(0, 4), "v": _randn(0), "bias": None}),
    attention_case("additive-w_key-Da", ValueError, "w_key", **{**ADDITIVE, "w_key": _randn(6, 4)}),
    attention_case("additive-w_key-Dk", ValueError, "w_key", **{**ADDITIVE, "w_key": _randn(5, 3)}),
    attention_case("additive-v-Da", ValueError, "v", **{**ADDITIVE, "v": _randn(4)}),
    attention_case("additive-v-2d", ValueError, "v", **{**ADDITIVE, "v": _randn(5, 1)}),
    attention_case("additive-bias-Da", ValueError, "bias", **{**ADDITIVE, "bias": _randn(6)}),
    attention_case("additive-v-numpy", TypeError, "v", **{**ADDITIVE, "v": np.zeros(5)}),
    attention_case("location-weight-Dq", ValueError, "weight", score="location", weight=_randn(8, 3)),
    attention_case("location-weight-1d", ValueError, "weight", score="location", weight=_randn(8)),
    attention_case("location-S-over-S_max", ValueError, "weight", score="location", weight=_randn(4, 4)),
    attention_case("location-grid-over-S_max", ValueError, "weight", QUERY, KEYS_GRID, score="location", weight=_randn(5, 4)),
    # scale
    attention_case("scale-inf", ValueError, "scale", scale=float("inf")),
    attention_case("scale-nan", ValueError, "scale", scale=float("nan")),
    attention_case("cosine-scale-ninf", ValueError, "scale", score="cosine", scale=float("-inf")),
    attention_case("scale-string", TypeError, "scale", scale="0.5"),
    attention_case("scale-bool", TypeError, "scale", scale=True),
    attention_case("scale-complex", TypeError, "scale", scale=1j),
    # lengths
    attention_case("lengths-float", TypeError, "lengths", lengths=torch.tensor([5.0, 2.0])),
    attention_case("lengths-bool", TypeError, "lengths", lengths=torch.tensor([True, False])),
    attention_case("lengths-list", TypeError, "lengths", lengths=[5, 2]),
    attention_case("lengths-int", TypeError, "lengths", lengths=5),
    attention_case("lengths-negative", ValueError, "lengths", lengths=torch.tensor([5, -1])),
    attention_case("lengths-over-S", ValueError, "lengths", lengths=torch.tensor([6, 2])),
    attention_case("lengths-uint8-over-S", ValueError, "lengths", lengths=torch.tensor([255, 2], dtype=torch.uint8)),
    attention_case("lengths-over-grid-S", ValueError, "lengths", QUERY, KEYS_GRID, lengths=torch.tensor([7, 2])),
    attention_case("lengths-batch", ValueError, "lengths", lengths=torch.tensor([5, 2, 1])),
    attention_case("lengths-2d", ValueError, "lengths", lengths=LENGTHS[:, None]),
    attention_case("lengths-heads", ValueError, "lengths", QUERY_HEADS, KEYS_HEADS, lengths=torch.ones(2, 3, dtype=torch.long)),
    attention_case("lengths-step-2d", ValueError, "lengths", QUERY_STEP, KEYS, lengths=torch.ones(2, 1, dtype=torch.long)),
    # key_padding_mask
    attention_case("key_padding_mask-float", TypeError, "key_padding_mask", key_padding_mask=torch.zeros(2, 5)),
    attention_case("key_padding_mask-int", TypeError, "key_padding_mask", key_padding_mask=torch.zeros(2, 5, dtype=torch.long)),
    attention_case("key_padding_mask-list", TypeError, "key_padding_mask", key_padding_mask=[[False] * 5] * 2),
    attention_case("key_padding_mask-S", ValueError, "key_padding_mask", key_padding_mask=_mask(2, 4)),
    attention_case("key_padding_mask-batch", ValueError, "key_padding_mask", key_padding_mask=_mask(3, 5)),
    attention_case("key_padding_mask-per-query", ValueError, "key_padding_mask", key_padding_mask=_mask(2, 3, 5)),
    attention_case("key_padding_mask-grid", ValueError, "key_padding_mask", QUERY, KEYS_GRID, key_padding_mask=_mask(2, 3, 2)),
    # causal
    attention_case("causal-T-ne-S", ValueError, "causal", causal=True),
    attention_case("causal-int", TypeError, "causal", _randn(2, 5, 4), causal=1),
    attention_case("causal-none", TypeError, "causal", _randn(2, 5, 4), causal=None),
    # window
    attention_case("window-negative", ValueError, "window", window=-1),
    attention_case("window-float", TypeError, "window", window=1.5),
    attention_case("window-integral-float", TypeError, "window", window=2.0),
    attention_case("window-bool", TypeError, "window", window=True),
    attention_case("window-string", TypeError, "window", window="2"),
    attention_case("window-tensor", TypeError, "window", window=torch.tensor([1, 2])),
    # center
    attention_case("center-without-window", ValueError, "window", center=_randn(2, 3)),
    attention_case("center-T", ValueError, "center", window=1, center=_randn(2, 4)),
    attention_case("center-batch", ValueError, "center", window=1, center=_randn(3, 3)),
    attention_case("center-trailing-1", ValueError, "center", window=1, center=_randn(2, 3, 1)),
    attention_case("center-step-2d", ValueError, "center", QUERY_STEP, KEYS, window=1, center=_randn(2, 1)),
    attention_case("center-int", TypeError, "center", window=1, center=torch.ones(2, 3, dtype=torch.long)),
    attention_case("center-list", TypeError, "center", window=1, center=[[0.0] * 3] * 2),
    attention_case("center-inf", ValueError, "center", window=1, center=CENTER.index_fill(1, torch.tensor([2]), math.inf)),
    attention_case("center-nan", ValueError, "center", window=1, center=CENTER.index_fill(0, torch.tensor([1]), math.nan)),
    # gaussian
    attention_case("gaussian-without-window", ValueError, "window", gaussian=True),
    attention_case("gaussian-window-0", ValueError, "window", window=0, gaussian=True),
    attention_case("gaussian-center-window-0", ValueError, "window", window=0, center=_randn(2, 3)),
    attention_case("gaussian-int", TypeError, "gaussian", window=1, gaussian=1),
    attention_case("gaussian-string", TypeError, "gaussian", window=1, gaussian="yes"),
    # return_weights
    attention_case("return_weights-int", TypeError, "return_weights", return_weights=1),
    attention_case("return_weights-string", TypeError, "return_weights", return_weights="True"),
    attention_case("return_weights-none", TypeError, "return_weights", return_weights=None),
    # ------------------------------------------------------- additive_attention
    additive_case("q_proj-list", TypeError, "q_proj", [[0.0] * 5]),
    additive_case("q_proj-no-features", ValueError, "q_proj", _randn(2, 3, 0), _randn(2, 5, 0), _randn(0)),
    additive_case("values-no-features", ValueError, "values", Q_PROJ, K_PROJ, V_A, _randn(2, 5, 0)),
    additive_case("q_proj-int", TypeError, "q_proj", Q_PROJ.long()),
    additive_case("k_proj-bool", TypeError, "k_proj", Q_PROJ, K_PROJ > 0),
    additive_case("k_proj-float32", TypeError, "k_proj", Q_PROJ, K_PROJ.float()),
    additive_case("k_proj-meta", ValueError, "k_proj", Q_PROJ, _randn(2, 5, 5, device="meta")),
    additive_case("k_proj-Da", ValueError, "k_proj", Q_PROJ, _randn(2, 5, 4)),
    additive_case("k_proj-batch", ValueError, "k_proj", Q_PROJ, _randn(3, 5, 5)),
    additive_case("k_proj-2d", ValueError, "k_proj", Q_PROJ, _randn(5, 5)),
    additive_case("q_proj-1d", ValueError, "q_proj", _randn(5)),
    additive_case("v-none", ValueError, "v", Q_PROJ, K_PROJ, None),
    additive_case("v-list", TypeError, "v", Q_PROJ, K_PROJ, [0.0] * 5),
    additive_case("v-float32", TypeError, "v", Q_PROJ, K_PROJ, V_A.float()),
    additive_case("v-meta", ValueError, "v", Q_PROJ, K_PROJ, _randn(5, device="meta")),
    additive_case("v-Da", ValueError, "v", Q_PROJ, K_PROJ, _randn(4)),
    additive_case("v-2d", ValueError, "v", Q_PROJ, K_PROJ, _randn(1, 5)),
    additive_case("bias-Da", ValueError, "bias", bias=_randn(4)),
    additive_case("bias-int", TypeError, "bias", bias=torch.ones(5, dtype=torch.long)),
    additive_case("values-none", TypeError, "values", Q_PROJ, K_PROJ, V_A, None),
    additive_case("values-int", TypeError, "values", Q_PROJ, K_PROJ, V_A, VALUES.long()),
    additive_case("values-float32", TypeError, "values", Q_PROJ, K_PROJ, V_A, VALUES.float()),
    additive_case("values-length", ValueError, "values", Q_PROJ, K_PROJ, V_A, _randn(2, 4, 6)),
    additive_case("values-meta", ValueError, "values", Q_PROJ, K_PROJ, V_A, _randn(2, 5, 6, device="meta")),
    additive_case("lengths-float", TypeError, "lengths", lengths=torch.tensor([1.0, 2.0])),
    additive_case("lengths-over-S", ValueError, "lengths", lengths=torch.tensor([1, 6])),
    additive_case("lengths-negative", ValueError, "lengths", lengths=torch.tensor([-2, 1])),
    additive_case("key_padding_mask-float", TypeError, "key_padding_mask", key_padding_mask=torch.zeros(2, 5)),
    additive_case("key_padding_mask-S", ValueError, "key_padding_mask", key_padding_mask=_mask(2, 6)),
    additive_case("causal-T-ne-S", ValueError, "causal", causal=True),
    additive_case("window-negative", ValueError, "window", window=-3),
    additive_case("window-float", TypeError, "window", window=0.5),
    additive_case("center-without-window", ValueError, "window", center=_randn(2, 3)),
    additive_case("center-T", ValueError, "center", window=2, center=_randn(2, 2)),
    additive_case("center-nan", ValueError, "center", window=2, center=torch.full((2, 3), float("nan"), dtype=F64)),
    additive_case("gaussian-window-0", ValueError, "window", window=0, gaussian=True),
    additive_case("return_weights-int", TypeError, "return_weights", return_weights=0),
    # ----------------------------------------------------------- hard_attention
    hard_case("query-int", TypeError, "query", QUERY.long()),
    hard_case("values-no-features", ValueError, "values", QUERY, KEYS, _randn(2, 5, 0)),
    hard_case("keys-meta", ValueError, "keys", QUERY, ON_META),
    hard_case("keys-batch", ValueError, "keys", QUERY, _randn(3, 5, 4)),
    hard_case("values-length", ValueError, "values", QUERY, KEYS, _randn(2, 4, 6)),
    hard_case("score-unknown", ValueError, "score", score="soft"),
    hard_case("dot-weight", ValueError, "weight", score="dot", weight=W_GENERAL),
    hard_case("general-weight-shape", ValueError, "weight", QUERY, KEYS_3, score="general", weight=_randn(3, 4)),
    hard_case("lengths-over-S", ValueError, "lengths", lengths=torch.tensor([6, 2])),
    hard_case("lengths-float", TypeError, "lengths", lengths=torch.tensor([1.0, 2.0])),
    hard_case("key_padding_mask-shape", ValueError, "key_padding_mask", key_padding_mask=_mask(2, 4)),
    hard_case("causal-T-ne-S", ValueError, "causal", causal=True),
    hard_case("window-negative", ValueError, "window", window=-1),
    hard_case("center-without-window", ValueError, "window", center=_randn(2, 3)),
    hard_case("gaussian-window-0", ValueError, "window", window=0, gaussian=True),
    hard_case("generator-int", TypeError, "generator", generator=0),
    hard_case("generator-numpy", TypeError, "generator", generator=np.random.default_rng(0)),
    hard_case("generator-class", TypeError, "generator", generator=torch.Generator),
    hard_case("sample-int", TypeError, "sample", sample=1),
    hard_case("sample-string", TypeError, "sample", sample="argmax"),
    hard_case("scale-nan", ValueError, "scale", scale=float("nan")),
    # --------------------------------------------- scaled_dot_product_attention
    sdpa_case("query-list", TypeError, "query", [[0.0]]),
    sdpa_case("query-no-features", ValueError, "query", _randn(2, 3, 0), _randn(2, 5, 0)),
    sdpa_case("value-no-features", ValueError, "value", QUERY, KEYS, _randn(2, 5, 0)),
    sdpa_case("query-int", TypeError, "query", QUERY.long()),
    sdpa_case("key-bool", TypeError, "key", QUERY, KEYS > 0),
    sdpa_case("value-numpy", TypeError, "value", QUERY, KEYS, np.zeros((2, 5, 6))),
    sdpa_case("key-float32", TypeError, "key", QUERY, KEYS.float()),
    sdpa_case("value-float32", TypeError, "value", QUERY, KEYS, VALUES.float()),
    sdpa_case("key-meta", ValueError, "key", QUERY, ON_META),
    sdpa_case("value-meta", ValueError, "value", QUERY, KEYS, _randn(2, 5, 6, device="meta")),
    sdpa_case("query-1d", ValueError, "query", _randn(4), _randn(5, 4), _randn(5, 6)),
    sdpa_case("enable_gqa-int", TypeError, "enable_gqa", enable_gqa=1),
    sdpa_case("key-heads-not-dividing-with-enable_gqa", ValueError, "key", _randn(2, 6, 3, 4), _randn(2, 4, 5, 4),
              _randn(2, 2, 5, 6), enable_gqa=True),
    sdpa_case("value-no-heads-with-enable_gqa", ValueError, "value", _randn(6, 3, 4), _randn(2, 5, 4), _randn(5, 6),
              enable_gqa=True),
    sdpa_case("key-batch", ValueError, "key", QUERY, _randn(3, 5, 4), _randn(3, 5, 6)),
    sdpa_case("value-batch", ValueError, "value", QUERY, KEYS, _randn(3, 5, 6)),
    sdpa_case("key-E", ValueError, "key", QUERY, KEYS_3),
    sdpa_case("value-length", ValueError, "value", QUERY, KEYS, _randn(2, 4, 6)),
    sdpa_case("attn_mask-list", TypeError, "attn_mask", attn_mask=[[True]]),
    sdpa_case("attn_mask-int", TypeError, "attn_mask", attn_mask=torch.ones(3, 5, dtype=torch.long)),
    sdpa_case("attn_mask-meta", ValueError, "attn_mask", attn_mask=_mask(3, 5, value=True, device="meta")),
    sdpa_case("attn_mask-with-is_causal", ValueError, "attn_mask", _randn(2, 5, 4), KEYS, VALUES, attn_mask=_mask(5, 5, value=True), is_causal=True),
    sdpa_case("attn_mask-S", ValueError, "attn_mask", attn_mask=_mask(3, 4, value=True)),
    sdpa_case("attn_mask-L", ValueError, "attn_mask", attn_mask=_mask(2, 5, value=True)),
    sdpa_case("attn_mask-batch", ValueError, "attn_mask", attn_mask=_mask(3, 3, 5, value=True)),
    sdpa_case("attn_mask-rank", ValueError, "attn_mask", attn_mask=_mask(1, 2, 3, 5, value=True)),
    sdpa_case("attn_mask-float-S", ValueError, "attn_mask", attn_mask=torch.zeros(2, 3, 6, dtype=F64)),
    # a float mask must be float32 or the query's dtype, as torch's
    sdpa_case("attn_mask-float16", TypeError, "attn_mask", attn_mask=torch.zeros(3, 5, dtype=torch.float16)),
    sdpa_case("dropout_p-above-one", ValueError, "dropout_p", dropout_p=1.5),
    sdpa_case("dropout_p-negative", ValueError, "dropout_p", dropout_p=-0.1),
    sdpa_case("dropout_p-nan", ValueError, "dropout_p", dropout_p=float("nan")),
    sdpa_case("dropout_p-string", TypeError, "dropout_p", dropout_p="0.1"),
    sdpa_case("dropout_p-none", TypeError, "dropout_p", dropout_p=None),
    sdpa_case("is_causal-int", TypeError, "is_causal", is_causal=1),
    sdpa_case("scale-inf", ValueError, "scale", scale=float("inf")),
    sdpa_case("scale-nan", ValueError, "scale", scale=float("nan")),
    sdpa_case("scale-string", TypeError, "scale", scale="1"),
    # ------------------------------------------------ nn.Attention constructor
    module_case("score-unknown", ValueError, "score", query_dim=4, key_dim=4, score="luong"),
    module_case("score-not-a-string", TypeError, "score", query_dim=4, key_dim=4, score=3),
    module_case("local-unknown", ValueError, "local", query_dim=4, key_dim=4, window=1, local="q"),
    module_case("local-not-a-string", TypeError, "local", query_dim=4, key_dim=4, window=1, local=1),
    module_case("query_dim-zero", ValueError, "query_dim", query_dim=0, key_dim=4),
    module_case("query_dim-negative", ValueError, "query_dim", query_dim=-4, key_dim=4),
    module_case("query_dim-float", TypeError, "query_dim", query_dim=4.0, key_dim=4),
    module_case("query_dim-bool", TypeError, "query_dim", query_dim=True, key_dim=4),
    module_case("key_dim-zero", ValueError, "key_dim", query_dim=4, key_dim=0),
    module_case("key_dim-string", TypeError, "key_dim", query_dim=4, key_dim="4"),
    module_case("value_dim-zero", ValueError, "value_dim", query_dim=4, key_dim=4, value_dim=0),
    module_case("value_dim-float", TypeError, "value_dim", query_dim=4, key_dim=4, value_dim=2.5),
    module_case("attn_dim-zero", ValueError, "attn_dim", query_dim=4, key_dim=4, attn_dim=0),
    module_case("attn_dim-float", TypeError, "attn_dim", query_dim=4, key_dim=4, attn_dim=1.5),
    module_case("dot-query_dim-ne-key_dim", ValueError, "query_dim", query_dim=4, key_dim=3, score="dot"),
    module_case("cosine-query_dim-ne-key_dim", ValueError, "query_dim", query_dim=4, key_dim=3, score="cosine"),
    module_case("location-no-max_source_len", ValueError, "max_source_len", query_dim=4, key_dim=4, score="location"),
    module_case("location-max_source_len-zero", ValueError, "max_source_len", **LOCATION_MODULE, max_source_len=0),
    module_case("location-max_source_len-float", TypeError, "max_source_len", **LOCATION_MODULE, max_source_len=8.0),
    module_case("window-negative", ValueError, "window", query_dim=4, key_dim=4, window=-1),
    module_case("window-float", TypeError, "window", query_dim=4, key_dim=4, window=1.5),
    module_case("window-bool", TypeError, "window", query_dim=4, key_dim=4, window=True),
    module_case("local-m-without-window", ValueError, "window", query_dim=4, key_dim=4, local="m"),
    module_case("local-p-without-window", ValueError, "window", query_dim=4, key_dim=4, local="p"),
    module_case("local-p-window-0", ValueError, "window", query_dim=4, key_dim=4, window=0, local="p"),
    module_case("bias-string", TypeError, "bias", query_dim=4, key_dim=4, bias="yes"),
    # --------------------------------------------------- nn.Attention.forward
    forward_case("query-list", TypeError, "query", ADDITIVE_MODULE, [[0.0] * 4], F32_KEYS),
    forward_case("query-int", TypeError, "query", ADDITIVE_MODULE, F32_QUERY.long(), F32_KEYS),
    forward_case("keys-numpy", TypeError, "keys", ADDITIVE_MODULE, F32_QUERY, np.zeros((2, 5, 4), dtype=np.float32)),
    forward_case("keys-int", TypeError, "keys", ADDITIVE_MODULE, F32_QUERY, F32_KEYS.int()),
    forward_case("values-int", TypeError, "values", ADDITIVE_MODULE, F32_QUERY, F32_KEYS, F32_VALUES.long()),
    forward_case("no-keys-no-cache", ValueError, "keys", ADDITIVE_MODULE, F32_QUERY, None),
    forward_case("cache-wrong-type", TypeError, "cache", ADDITIVE_MODULE, F32_QUERY, None, cache=(F32_KEYS, F32_VALUES)),
    forward_case("query-1d", ValueError, "query", ADDITIVE_MODULE, F32_QUERY[0, 0], F32_KEYS),
    forward_case("query-Dq", ValueError, "query", ADDITIVE_MODULE, _f32(2, 3, 5), F32_KEYS),
    forward_case("keys-Dk", ValueError, "keys", ADDITIVE_MODULE, F32_QUERY, _f32(2, 5, 3)),
    forward_case("dot-query-Dq", ValueError, "query", dict(query_dim=4, key_dim=4, score="dot"), _f32(2, 3, 5), F32_KEYS),
    forward_case("general-keys-Dk", ValueError, "keys", dict(query_dim=4, key_dim=4, score="general"), F32_QUERY, _f32(2, 5, 3)),
    forward_case("query-float64", TypeError, "query", ADDITIVE_MODULE, QUERY, KEYS),
    forward_case("keys-float64", TypeError, "keys", ADDITIVE_MODULE, F32_QUERY, KEYS),
    forward_case("keys-meta", ValueError, "keys", ADDITIVE_MODULE, F32_QUERY, _f32(2, 5, 4, device="meta")),
    forward_case("query-meta", ValueError, "query", ADDITIVE_MODULE, _f32(2, 3, 4, device="meta"), F32_KEYS),
    forward_case("keys-batch", ValueError, "keys", ADDITIVE_MODULE, F32_QUERY, _f32(3, 5, 4)),
    forward_case("values-length", ValueError, "values", ADDITIVE_MODULE, F32_QUERY, F32_KEYS, _f32(2, 4, 6)),
    forward_case("values-missing-value_dim", ValueError, "values", {**ADDITIVE_MODULE, "value_dim": 6}, F32_QUERY, F32_KEYS),
    forward_case("location-S-over-max", ValueError, "keys", {**LOCATION_MODULE, "max_source_len": 4}),
    forward_case("lengths-float", TypeError, "lengths", ADDITIVE_MODULE, lengths=torch.tensor([1.0, 2.0])),
    forward_case("lengths-over-S", ValueError, "lengths", ADDITIVE_MODULE, lengths=torch.tensor([6, 2])),
    forward_case("lengths-batch", ValueError, "lengths", ADDITIVE_MODULE, lengths=torch.tensor([1, 2, 3])),
    forward_case("key_padding_mask-float", TypeError, "key_padding_mask", ADDITIVE_MODULE, key_padding_mask=torch.zeros(2, 5)),
    forward_case("key_padding_mask-S", ValueError, "key_padding_mask", ADDITIVE_MODULE, key_padding_mask=_mask(2, 4)),
    forward_case("return_weights-int", TypeError, "return_weights", ADDITIVE_MODULE, return_weights=1),
    forward_case("local-p-lengths-float", TypeError, "lengths", LOCAL_P_MODULE, lengths=torch.tensor([1.0, 2.0])),
    forward_case("local-p-lengths-batch", ValueError, "lengths", LOCAL_P_MODULE, lengths=torch.tensor([1, 2, 3])),
    forward_case("local-p-lengths-over-S", ValueError, "lengths", LOCAL_P_MODULE, lengths=torch.tensor([1, 9])),
    forward_case("local-p-lengths-meta", ValueError, "lengths", LOCAL_P_MODULE, lengths=torch.tensor([1, 2], device="meta")),
    forward_case("local-p-keys-batch", ValueError, "keys", LOCAL_P_MODULE, F32_QUERY, _f32(3, 5, 4)),
]


def _names(argument: str) -> str:
    """The argument's name as a whole word: "v" must not match "values"."""
    return rf"(?<!\w){re.escape(argument)}(?!\w)"


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("call, error, argument", CASES)
def test_bad_input_raises_naming_the_argument(backend_name, call, error, argument):
    with fastattn.backend(backend_name), pytest.raises(error, match=_names(argument)):
        call()


def test_case_ids_are_unique():
    ids = [param.id for param in CASES]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------- cases set up apart


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("window", [KEYS.shape[1] + 2, 2**31 - 1])
def test_a_window_past_every_key_is_global_attention(backend_name, window):
    """window >= S keeps every key, up to the largest window taken (2^31 - 1), whose
    p_t + window must not wrap around and mask keys."""
    with fastattn.backend(backend_name):
        expected = fastattn.attention(QUERY, KEYS, return_weights=True)
        got = fastattn.attention(QUERY, KEYS, window=window, return_weights=True)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("window", [2**31, 2**63 - 1, 2**63, 10**30])
def test_a_window_too_large_for_index_arithmetic_is_refused_by_name(backend_name, window):
    """A window past 2^31 - 1 is refused by name, never an OverflowError from int64."""
    with fastattn.backend(backend_name), pytest.raises(ValueError, match=_names("window")):
        fastattn.attention(QUERY, KEYS, window=window, return_weights=True)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_cache_from_a_module_with_another_score_is_refused(backend_name):
    """A cache without the projected keys this module needs names the cache."""
    dot_cache = Attention(4, 4, score="dot").precompute(F32_KEYS)
    module = Attention(4, 4)  # additive: needs W_k h in the cache
    with fastattn.backend(backend_name), pytest.raises(ValueError, match=_names("cache")):
        module(F32_QUERY, cache=dot_cache)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("score", ["general", "location", "additive", "dot"])
def test_cache_from_a_module_of_other_sizes_is_refused(backend_name, score):
    """A cache of another module with this score but other sizes names the cache: the
    general one had run on the other module's W_a h (a context of the other width), the
    location one returned the other values' width, the decoder step raised from a matmul."""

    def other_cache(query_dim, key_dim):  # other key features (dot: other value features)
        other_dim = key_dim if score == "dot" else key_dim + 2
        other = Attention(query_dim, other_dim, other_dim + 1, score=score, max_source_len=8, attn_dim=7)
        return other.precompute(_f32(2, 5, other_dim), _f32(2, 5, other_dim + 1))

    module = Attention(4, 4, score=score, max_source_len=8)
    decoder = AttentionDecoderCell(3, 6, 6, score=score, max_source_len=8)
    with fastattn.backend(backend_name):
        with pytest.raises(ValueError, match=_names("cache")):
            module(F32_QUERY, cache=other_cache(4, 4))
        with pytest.raises(ValueError, match=_names("cache")):
            decoder(torch.randn(2, 3), None, other_cache(6, 6))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_location_decoder_step_over_a_source_longer_than_its_weight_is_refused(backend_name):
    """As the location score is everywhere (the fused cpu step had raised from the
    kernel, blaming the values)."""
    decoder = AttentionDecoderCell(3, 6, 4, score="location", max_source_len=4)
    cache = decoder.precompute(F32_KEYS)  # S = 5
    with fastattn.backend(backend_name), pytest.raises(ValueError, match=r"S <= S_max.*S_max=4.*S=5"):
        decoder(torch.randn(2, 3), None, cache)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_cache_and_keys_together_are_refused(backend_name):
    module = Attention(4, 4)
    cache = module.precompute(F32_KEYS)
    with fastattn.backend(backend_name), pytest.raises(ValueError, match=_names("cache")):
        module(F32_QUERY, F32_KEYS, cache=cache)


@pytest.mark.parametrize("keys, error", [(np.zeros((2, 5, 4)), TypeError), (_f32(2, 5, 3), ValueError)])
def test_precompute_checks_the_keys(keys, error):
    with pytest.raises(error, match=_names("keys")):
        Attention(4, 4).precompute(keys)


@pytest.mark.parametrize(
    "values", [_f32(2, 5, 3), _f32(2, 4, 4), np.zeros((2, 5, 4))], ids=["features", "positions", "numpy"]
)
def test_precompute_checks_the_values(values):
    with pytest.raises((ValueError, TypeError), match=_names("values")):
        Attention(4, 4).precompute(F32_KEYS, values)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_decoder_step_checks_the_batch_of_its_cache(backend_name):
    decoder = AttentionDecoderCell(3, 6, 4)
    cache = decoder.precompute(F32_KEYS)  # batch 2
    with fastattn.backend(backend_name), pytest.raises(ValueError, match=_names("cache")):
        decoder(torch.randn(3, 3), None, cache)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    "case, error, argument",
    [("empty source", ValueError, "cache"), ("float64 step input", TypeError, "y_prev_embedded"),
     ("float64 keys", TypeError, "cache.keys")],
)
def test_a_decoder_step_refuses_what_the_reference_step_refuses_on_every_backend(backend_name, case, error, argument):
    """The fused cpu step had run an empty source (S = 0: a zero context where the
    reference refuses it) and raised RuntimeErrors from the ops for dtypes the reference
    refuses with TypeErrors."""
    decoder = AttentionDecoderCell(3, 6, 4)
    step_input, keys = torch.randn(2, 3), F32_KEYS
    if case == "empty source":
        keys = F32_KEYS[:, :0]
    elif case == "float64 step input":
        step_input = step_input.double()
    else:
        keys = F32_KEYS.double()
    cache = AttentionCache(keys, keys, keys @ decoder.attention.w_key.T.to(keys.dtype), "additive")
    with fastattn.backend(backend_name), pytest.raises(error, match=_names(argument)):
        decoder(step_input, None, cache)


def test_a_decoder_cell_of_an_unhashable_kind_is_refused_by_name():
    with pytest.raises(TypeError, match=_names("cell")):
        AttentionDecoderCell(3, 6, 4, cell=["lstm"])


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_failed_check_leaves_the_inputs_untouched(backend_name):
    query, keys = QUERY.clone(), KEYS.clone()
    with fastattn.backend(backend_name), pytest.raises(ValueError):
        fastattn.attention(query, keys, lengths=torch.tensor([6, 2]))
    assert torch.equal(query, QUERY) and torch.equal(keys, KEYS)


def test_an_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="reference"):
        with fastattn.backend("fast"):
            pass


class _ReductionCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the min / max reductions that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.name() in ("aten::min", "aten::max")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_lengths_passed_again_are_not_read_again_until_they_change(backend_name):
    """A decoder passes the same lengths at every step: their range is read at the first
    (two reductions, a synchronisation on a GPU), not again while the tensor is unchanged;
    changed in place, or against a shorter source, they are read, and refused, again."""
    lengths = torch.tensor([5, 2])
    with fastattn.backend(backend_name):
        first, again = _ReductionCount(), _ReductionCount()
        with first:
            fastattn.attention(QUERY, KEYS, lengths=lengths)
        with again:
            fastattn.attention(QUERY, KEYS, lengths=lengths)
        assert first.count == 2 and again.count == 0
        with pytest.raises(ValueError, match="lengths must lie in"):
            fastattn.attention(QUERY, KEYS[:, :4], lengths=lengths)
        lengths[0] = 6
        for _ in range(2):
            with pytest.raises(ValueError, match="lengths must lie in"):
                fastattn.attention(QUERY, KEYS, lengths=lengths)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_lengths_are_range_checked_under_inference_mode(backend_name):
    """Inference tensors have no version counter: valid lengths work (the check is not
    cached), and lengths changed in place inside inference mode are checked again."""
    expected = fastattn.attention(QUERY, KEYS, lengths=LENGTHS)
    with fastattn.backend(backend_name), torch.inference_mode():
        lengths = LENGTHS.clone()
        torch.testing.assert_close(fastattn.attention(QUERY, KEYS, lengths=lengths), expected)
        lengths.fill_(6)
        with pytest.raises(ValueError, match=_names("lengths")):
            fastattn.attention(QUERY, KEYS, lengths=lengths)


SPARSE_AND_NESTED = {
    "sparse_coo": lambda t: t.to_sparse(),
    "sparse_csr": lambda t: t.to_sparse_csr() if t.dim() == 2 else t.to_sparse(),
    "nested": lambda t: torch.nested.nested_tensor(list(t.unbind(0)), layout=torch.jagged) if t.dim() == 3 else t.to_sparse(),
    "_mkldnn": lambda t: t.float().to_mkldnn() if t.is_floating_point() else t.to_sparse(),
}
_X, _H, _W_IH, _W_HH = torch.randn(3, 4), torch.randn(3, 5), torch.randn(20, 4), torch.randn(20, 5)
LAYOUT_CASES = {
    "query": lambda make: fastattn.attention(make(QUERY), KEYS),
    "keys": lambda make: fastattn.attention(QUERY, make(KEYS)),
    "values": lambda make: fastattn.attention(QUERY, KEYS, make(KEYS)),
    "lengths": lambda make: fastattn.attention(QUERY, KEYS, lengths=make(LENGTHS)),
    "key_padding_mask": lambda make: fastattn.attention(QUERY, KEYS, key_padding_mask=make(torch.rand(2, 6) > 0.5)),
    "attn_mask": lambda make: fastattn.scaled_dot_product_attention(QUERY, KEYS, KEYS, attn_mask=make(torch.rand(3, 6) > 0.5)),
    "x": lambda make: fastattn.lstm_cell(make(_X), (_H, _H), _W_IH, _W_HH),
    "w_ih": lambda make: fastattn.lstm_cell(_X, (_H, _H), make(_W_IH), _W_HH),
    "hx[1]": lambda make: fastattn.lstm_cell(_X, (_H, make(_H)), _W_IH, _W_HH),
    "h": lambda make: fastattn.gru_cell(_X, make(_H), _W_IH[:15], _W_HH[:15]),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's "prototype" / "beta" notes on these layouts
@pytest.mark.parametrize("kind", SPARSE_AND_NESTED)
@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_sparse_nested_and_mkldnn_tensors_are_refused_by_name(name, kind):
    """The kernels and the reference index strided memory: other layouts fail at the
    argument, not deep inside torch (reshape of a sparse tensor, NestedIntNode, a
    dispatcher key dump) or with another argument's message (a sparse attn_mask's shape)."""
    make = SPARSE_AND_NESTED[kind]
    with pytest.raises(TypeError, match=rf"^{re.escape(name)} must be a dense \(strided\) tensor, got a \w+ tensor$"):
        LAYOUT_CASES[name](make)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fake_tensors_are_checked_for_shape_only(backend_name):
    """FakeTensorMode (shape propagation) has no values either: lengths and centers, in the
    functions and the modules, propagate shapes there as torch's own attention does (their
    range checks had read a value and raised DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with fastattn.backend(backend_name), FakeTensorMode():
        query, keys, lengths = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.tensor([2, 5])
        assert fastattn.attention(query, keys, lengths=lengths).shape == (2, 3, 4)
        assert fastattn.attention(query, keys, window=1, center=torch.rand(2, 3) * 4).shape == (2, 3, 4)
        assert Attention(4, 4)(query, keys, lengths=lengths)[0].shape == (2, 3, 4)
        assert fastattn.hard_attention(query, keys, lengths=lengths)[1].shape == (2, 3)
        with pytest.raises(ValueError, match=_names("lengths")):
            fastattn.attention(query, keys, lengths=lengths[:1])


def test_meta_lengths_and_center_are_checked_for_shape_only():
    """Meta tensors have no values to range-check: shapes and dtypes still are."""
    query, keys = QUERY.to("meta"), KEYS.to("meta")
    lengths, center = LENGTHS.to("meta"), torch.zeros(2, 3, dtype=F64, device="meta")
    assert fastattn.attention(query, keys, lengths=lengths).shape == (2, 3, 4)
    assert fastattn.attention(query, keys, window=1, center=center).shape == (2, 3, 4)
    assert Attention(4, 4, window=2, local="p").to("meta")(query.float(), keys.float())[0].shape == (2, 3, 4)
    with pytest.raises(ValueError, match=_names("lengths")):
        fastattn.attention(query, keys, lengths=LENGTHS.to("meta")[:1])
