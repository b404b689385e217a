"""fastattn: fused attention (score, softmax, context) and LSTM/GRU kernels for PyTorch.

    import fastattn
    context, weights = fastattn.attention(query, keys, score="additive", ..., return_weights=True)

See API.md for the contract; ``fastattn.info()`` says which backend runs each op.
"""

import fastattn.reference  # registers the reference backend  # noqa: F401
import fastattn._extension  # registers the compiled backends, when built  # noqa: F401
from fastattn import backends as _backends

if fastattn._extension.build_info() is not None:
    from fastattn.ops import triton_backend as _triton_backend  # fastattn.ops needs _C's op schemas

    _triton_backend.load()
else:
    _backends.mark_unavailable("triton", "the Triton backend reuses fastattn.ops, which needs fastattn._C's op schemas")
from fastattn import nn
from fastattn.backends import BackendUnavailableError, backend, set_backend
from fastattn.functional import (
    additive_attention,
    attention,
    gru_cell,
    hard_attention,
    lstm_cell,
    scaled_dot_product_attention,
)
from fastattn.info import info, version
from fastattn.optimize import optimize

__version__ = version()

__all__ = [
    "attention",
    "additive_attention",
    "hard_attention",
    "scaled_dot_product_attention",
    "lstm_cell",
    "gru_cell",
    "nn",
    "optimize",
    "set_backend",
    "backend",
    "BackendUnavailableError",
    "info",
    "__version__",
]
