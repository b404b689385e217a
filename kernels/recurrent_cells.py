"""LSTM and GRU cell kernels: a whole step in one launch (both GEMMs x @ W_ih^T and
h @ W_hh^T, the biases, the gate nonlinearities, the state update and the activations
saved for backward, one tile of every gate per program; the pre-activations never leave
float32), a layer's input projection for every time step at once (float32 out, which
the steps then read in place of x @ W_ih^T), and the pointwise part of the backward.
In a layer, a step kernel also keeps the state of a finished sequence (t >= its
length), and a backward step also adds the states' gradients from outside the
recurrence and passes a finished sequence's gradient on to its kept state.

The GEMMs of the backward run in torch; the gates come in torch's order (LSTM i, f, g,
o; GRU r, z, n) as (B, gates*H) rows.  Grid: (B blocks, H blocks) of BLOCK_B × BLOCK_H
states.  Saved activations: LSTM (i, f, g, o), GRU (r, z, n, W_hn h + b_hn), each
(B, 4H) float32.  Rows and columns are 64-bit, so every offset is (B·4H or 4H·H may
pass 2^31); these kernels are bound by memory or by their GEMMs, not by address
arithmetic.  The step number t is not specialized on (one compiled kernel serves every
step).  Not handled: an LSTM projection (w_hr), a persistent kernel over time.
"""

import triton
import triton.language as tl

from fastattn.kernels.attention_tiles import stable_tanh


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tile(b_block, h_block, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = b_block.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    columns = h_block.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    return rows, columns, (rows < B)[:, None] & (columns < H)[None, :]


@triton.jit
def _running(LENGTHS, t, rows, B):
    """(BLOCK_B, 1): whether each row's sequence still runs at step t (t < its length)."""
    return (tl.load(LENGTHS + rows, mask=rows < B, other=0) > t)[:, None]


@triton.jit
def _lstm_update(gate_i, gate_f, gate_g, gate_o, STATE_H, C, C_NEXT, H_NEXT, SAVED, LENGTHS, t, rows, columns, mask,
                 B, H, HAS_LENGTHS: tl.constexpr):
    """From the four pre-activations to (h', c'), storing the saved activations; with
    HAS_LENGTHS a finished sequence (t >= its length) keeps its (h, c)."""
    i = _sigmoid(gate_i)
    f = _sigmoid(gate_f)
    g = stable_tanh(gate_g)
    o = _sigmoid(gate_o)
    state = rows[:, None] * H + columns[None, :]
    c = tl.load(C + state, mask=mask, other=0.0).to(tl.float32)
    c_next = f * c + i * g
    h_next = o * stable_tanh(c_next)
    if HAS_LENGTHS:
        running = _running(LENGTHS, t, rows, B)
        h_next = tl.where(running, h_next, tl.load(STATE_H + state, mask=mask, other=0.0).to(tl.float32))
        c_next = tl.where(running, c_next, c)
    tl.store(C_NEXT + state, c_next, mask=mask)
    tl.store(H_NEXT + state, h_next, mask=mask)
    saved = rows[:, None] * 4 * H + columns[None, :]
    tl.store(SAVED + saved, i, mask=mask)
    tl.store(SAVED + saved + H, f, mask=mask)
    tl.store(SAVED + saved + 2 * H, g, mask=mask)
    tl.store(SAVED + saved + 3 * H, o, mask=mask)


@triton.jit
def _gate_part(A, W, BIAS, rows, columns, B, K, H, gate, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """A @ W^T (+ BIAS) for one gate's (BLOCK_B, BLOCK_H) tile, float32: A is (B, K), W is
    (gates*H, K), BIAS (gates*H,); x with W_ih or h with W_hh."""
    acc = tl.zeros((rows.shape[0], columns.shape[0]), dtype=tl.float32)
    column_in = columns < H
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        state = tl.load(A + rows[:, None] * K + offs_k[None, :], mask=(rows < B)[:, None] & k_in[None, :], other=0.0)
        weight = tl.load(  # the (BLOCK_K, BLOCK_H) tile of this gate's W^T
            W + (gate * H + columns[None, :]) * K + offs_k[:, None], mask=k_in[:, None] & column_in[None, :], other=0.0
        )
        acc += tl.dot(state, weight, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + gate * H + columns, mask=column_in, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def input_projection_kernel(
    X, W, BIAS, OUT, K, M, N, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT = X @ W^T + BIAS, float32 (M, N): a layer's x W_ih^T + b_ih for all its T·B rows."""
    rows, columns, mask = _tile(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    projection = _gate_part(X, W, BIAS, rows, columns, M, K, N, 0, HAS_BIAS, DOT_PRECISION, BLOCK_K)
    tl.store(OUT + rows[:, None] * N + columns[None, :], projection, mask=mask)


@triton.jit
def _input_part(X, W_IH, B_IH, rows, columns, B, I, H, gate, GATES: tl.constexpr, PROJECTED_INPUT: tl.constexpr,
                HAS_INPUT_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """One gate's x W_ih^T + b_ih, float32: from x (B, I), or read from X, the layer's
    projection (B, GATES*H) float32, when PROJECTED_INPUT."""
    if PROJECTED_INPUT:
        mask = (rows < B)[:, None] & (columns < H)[None, :]
        part = tl.load(X + rows[:, None] * GATES * H + gate * H + columns[None, :], mask=mask, other=0.0)
    else:
        part = _gate_part(X, W_IH, B_IH, rows, columns, B, I, H, gate, HAS_INPUT_BIAS, DOT_PRECISION, BLOCK_K)
    return part


@triton.jit
def _step_gate(X, STATE_H, W_IH, W_HH, B_IH, B_HH, rows, columns, B, I, H, gate, GATES: tl.constexpr,
               PROJECTED_INPUT: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HAS_HIDDEN_BIAS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """One gate's whole pre-activation x W_ih^T + b_ih + h W_hh^T + b_hh, float32."""
    return _input_part(
        X, W_IH, B_IH, rows, columns, B, I, H, gate, GATES, PROJECTED_INPUT, HAS_INPUT_BIAS, DOT_PRECISION, BLOCK_K
    ) + _gate_part(STATE_H, W_HH, B_HH, rows, columns, B, H, H, gate, HAS_HIDDEN_BIAS, DOT_PRECISION, BLOCK_K)


@triton.jit(do_not_specialize=["t"])
def lstm_step_kernel(
    X, STATE_H, C, W_IH, W_HH, B_IH, B_HH, H_NEXT, C_NEXT, SAVED, LENGTHS, t, I, B, H, PROJECTED_INPUT: tl.constexpr,
    HAS_INPUT_BIAS: tl.constexpr, HAS_HIDDEN_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One whole LSTM step: gates = x W_ih^T + b_ih + h W_hh^T + b_hh and the update, in
    one launch (X: x, or with PROJECTED_INPUT its projection, W_IH and B_IH unread; step
    t of a layer with HAS_LENGTHS)."""
    rows, columns, mask = _tile(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    _lstm_update(
        _step_gate(X, STATE_H, W_IH, W_HH, B_IH, B_HH, rows, columns, B, I, H, 0, 4, PROJECTED_INPUT, HAS_INPUT_BIAS,
                   HAS_HIDDEN_BIAS, DOT_PRECISION, BLOCK_K),
        _step_gate(X, STATE_H, W_IH, W_HH, B_IH, B_HH, rows, columns, B, I, H, 1, 4, PROJECTED_INPUT, HAS_INPUT_BIAS,
                   HAS_HIDDEN_BIAS, DOT_PRECISION, BLOCK_K),
        _step_gate(X, STATE_H, W_IH, W_HH, B_IH, B_HH, rows, columns, B, I, H, 2, 4, PROJECTED_INPUT, HAS_INPUT_BIAS,
                   HAS_HIDDEN_BIAS, DOT_PRECISION, BLOCK_K),
        _step_gate(X, STATE_H, W_IH, W_HH, B_IH, B_HH, rows, columns, B, I, H, 3, 4, PROJECTED_INPUT, HAS_INPUT_BIAS,
                   HAS_HIDDEN_BIAS, DOT_PRECISION, BLOCK_K),
        STATE_H, C, C_NEXT, H_NEXT, SAVED, LENGTHS, t, rows, columns, mask, B, H, HAS_LENGTHS,
    )


@triton.jit
def _store_gate(GRADS, ROUNDED, offsets, value, mask, ROUNDED_COPY: tl.constexpr):
    """A gate's gradient, and with ROUNDED_COPY also in ROUNDED's dtype (a float16/bfloat16
    layer's operand of h's GEMM through W_hh, while its weights' gradients sum GRADS)."""
    tl.store(GRADS + offsets, value, mask=mask)
    if ROUNDED_COPY:
        tl.store(ROUNDED + offsets, value, mask=mask)


@triton.jit(do_not_specialize=["t"])
def lstm_pointwise_backward_kernel(
    GRAD_H_NEXT, GRAD_C_NEXT, C, C_NEXT, SAVED, GRAD_GATES, GRAD_C, OUTSIDE_GRAD_H, OUTSIDE_GRAD_C, GRAD_H,
    GRAD_GATES_ROUNDED, LENGTHS, t, B, H, IN_LAYER: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ROUNDED_COPY: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """-> gradient of the pre-activation gates (B, 4H) and of c.  IN_LAYER, step t of a
    layer's backward: the gradients of the states before the step from outside the
    recurrence (OUTSIDE_GRAD_H, OUTSIDE_GRAD_C: the previous step's output, the initial
    state) are added, and GRAD_H receives the part of h's gradient that does not pass
    through W_hh (the outside one; with HAS_LENGTHS also all of a finished sequence's,
    whose state was kept and whose gates' gradients are zero)."""
    rows, columns, mask = _tile(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    state = rows[:, None] * H + columns[None, :]
    saved = rows[:, None] * 4 * H + columns[None, :]
    i = tl.load(SAVED + saved, mask=mask, other=0.0)
    f = tl.load(SAVED + saved + H, mask=mask, other=0.0)
    g = tl.load(SAVED + saved + 2 * H, mask=mask, other=0.0)
    o = tl.load(SAVED + saved + 3 * H, mask=mask, other=0.0)
    c = tl.load(C + state, mask=mask, other=0.0).to(tl.float32)
    cell = stable_tanh(tl.load(C_NEXT + state, mask=mask, other=0.0).to(tl.float32))
    grad_h = tl.load(GRAD_H_NEXT + state, mask=mask, other=0.0).to(tl.float32)
    grad_c_next = tl.load(GRAD_C_NEXT + state, mask=mask, other=0.0).to(tl.float32)
    grad_c = grad_c_next + grad_h * o * (1.0 - cell * cell)
    grad_i = grad_c * g * i * (1.0 - i)
    grad_f = grad_c * c * f * (1.0 - f)
    grad_g = grad_c * i * (1.0 - g * g)
    grad_o = grad_h * cell * o * (1.0 - o)
    grad_c = grad_c * f
    if HAS_LENGTHS:
        running = _running(LENGTHS, t, rows, B)
        grad_i, grad_f = tl.where(running, grad_i, 0.0), tl.where(running, grad_f, 0.0)
        grad_g, grad_o = tl.where(running, grad_g, 0.0), tl.where(running, grad_o, 0.0)
        grad_c = tl.where(running, grad_c, grad_c_next)
    if IN_LAYER:
        grad_c += tl.load(OUTSIDE_GRAD_C + state, mask=mask, other=0.0).to(tl.float32)
        kept = tl.load(OUTSIDE_GRAD_H + state, mask=mask, other=0.0).to(tl.float32)
        if HAS_LENGTHS:
            kept += tl.where(running, 0.0, grad_h)
        tl.store(GRAD_H + state, kept, mask=mask)
    tl.store(GRAD_C + state, grad_c, mask=mask)
    _store_gate(GRAD_GATES, GRAD_GATES_ROUNDED, saved, grad_i, mask, ROUNDED_COPY)
    _store_gate(GRAD_GATES, GRAD_GATES_ROUNDED, saved + H, grad_f, mask, ROUNDED_COPY)
    _store_gate(GRAD_GATES, GRAD_GATES_ROUNDED, saved + 2 * H, grad_g, mask, ROUNDED_COPY)
    _store_gate(GRAD_GATES, GRAD_GATES_ROUNDED, saved + 3 * H, grad_o, mask, ROUNDED_COPY)


@triton.jit
def _gru_update(gate_r, gate_z, input_n, hidden_n, STATE_H, H_NEXT, SAVED, LENGTHS, t, rows, columns, mask, B, H,
                HAS_LENGTHS: tl.constexpr):
    """From the pre-activations of r and z, x W_in^T + b_in and h W_hn^T + b_hn to h'; with
    HAS_LENGTHS a finished sequence (t >= its length) keeps its h."""
    r = _sigmoid(gate_r)
    z = _sigmoid(gate_z)
    n = stable_tanh(input_n + r * hidden_n)
    state = rows[:, None] * H + columns[None, :]
    h = tl.load(STATE_H + state, mask=mask, other=0.0).to(tl.float32)
    h_next = (1.0 - z) * n + z * h
    if HAS_LENGTHS:
        h_next = tl.where(_running(LENGTHS, t, rows, B), h_next, h)
    tl.store(H_NEXT + state, h_next, mask=mask)
    saved = rows[:, None] * 4 * H + columns[None, :]
    tl.store(SAVED + saved, r, mask=mask)
    tl.store(SAVED + saved + H, z, mask=mask)
    tl.store(SAVED + saved + 2 * H, n, mask=mask)
    tl.store(SAVED + saved + 3 * H, hidden_n, mask=mask)


@triton.jit(do_not_specialize=["t"])
def gru_step_kernel(
    X, STATE_H, W_IH, W_HH, B_IH, B_HH, H_NEXT, SAVED, LENGTHS, t, I, B, H, PROJECTED_INPUT: tl.constexpr,
    HAS_INPUT_BIAS: tl.constexpr, HAS_HIDDEN_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One whole GRU step: both GEMMs (or, with PROJECTED_INPUT, X's projection and the
    recurrent one), the biases and the update, in one launch (step t of a layer with
    HAS_LENGTHS)."""
    rows, columns, mask = _tile(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    _gru_update(
        _step_gate(X, STATE_H, W_IH, W_HH, B_IH, B_HH, rows, columns, B, I, H, 0, 3, PROJECTED_INPUT, HAS_INPUT_BIAS,
                   HAS_HIDDEN_BIAS, DOT_PRECISION, BLOCK_K),
        _step_gate(X, STATE_H, W_IH, W_HH, B_IH, B_HH, rows, columns, B, I, H, 1, 3, PROJECTED_INPUT, HAS_INPUT_BIAS,
                   HAS_HIDDEN_BIAS, DOT_PRECISION, BLOCK_K),
        _input_part(X, W_IH, B_IH, rows, columns, B, I, H, 2, 3, PROJECTED_INPUT, HAS_INPUT_BIAS, DOT_PRECISION,
                    BLOCK_K),
        _gate_part(STATE_H, W_HH, B_HH, rows, columns, B, H, H, 2, HAS_HIDDEN_BIAS, DOT_PRECISION, BLOCK_K),
        STATE_H, H_NEXT, SAVED, LENGTHS, t, rows, columns, mask, B, H, HAS_LENGTHS,
    )


@triton.jit(do_not_specialize=["t"])
def gru_pointwise_backward_kernel(
    GRAD_H_NEXT, STATE_H, SAVED, GRAD_GATES_X, GRAD_GATES_H, GRAD_H, OUTSIDE_GRAD_H, GRAD_GATES_H_ROUNDED, LENGTHS,
    t, B, H, IN_LAYER: tl.constexpr, HAS_LENGTHS: tl.constexpr, ROUNDED_COPY: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """-> gradients of GATES_X and GATES_H (B, 3H each) and the part of h's that does
    not pass through W_hh.  IN_LAYER, step t of a layer's backward: that part also has
    the gradient of h before the step from outside the recurrence (OUTSIDE_GRAD_H: the
    previous step's output, the initial state); with HAS_LENGTHS a finished sequence
    passes all of its gradient to the kept h and none to its gates."""
    rows, columns, mask = _tile(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    state = rows[:, None] * H + columns[None, :]
    saved = rows[:, None] * 4 * H + columns[None, :]
    r = tl.load(SAVED + saved, mask=mask, other=0.0)
    z = tl.load(SAVED + saved + H, mask=mask, other=0.0)
    n = tl.load(SAVED + saved + 2 * H, mask=mask, other=0.0)
    hidden_n = tl.load(SAVED + saved + 3 * H, mask=mask, other=0.0)
    h = tl.load(STATE_H + state, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(GRAD_H_NEXT + state, mask=mask, other=0.0).to(tl.float32)
    kept = grad * z
    grad_n = grad * (1.0 - z) * (1.0 - n * n)
    grad_r = grad_n * hidden_n * r * (1.0 - r)
    grad_z = grad * (h - n) * z * (1.0 - z)
    if HAS_LENGTHS:
        running = _running(LENGTHS, t, rows, B)
        kept = tl.where(running, kept, grad)
        grad_n = tl.where(running, grad_n, 0.0)
        grad_r = tl.where(running, grad_r, 0.0)
        grad_z = tl.where(running, grad_z, 0.0)
    if IN_LAYER:
        kept += tl.load(OUTSIDE_GRAD_H + state, mask=mask, other=0.0).to(tl.float32)
    tl.store(GRAD_H + state, kept, mask=mask)
    gate = rows[:, None] * 3 * H + columns[None, :]
    tl.store(GRAD_GATES_X + gate, grad_r, mask=mask)
    tl.store(GRAD_GATES_X + gate + H, grad_z, mask=mask)
    tl.store(GRAD_GATES_X + gate + 2 * H, grad_n, mask=mask)
    _store_gate(GRAD_GATES_H, GRAD_GATES_H_ROUNDED, gate, grad_r, mask, ROUNDED_COPY)
    _store_gate(GRAD_GATES_H, GRAD_GATES_H_ROUNDED, gate + H, grad_z, mask, ROUNDED_COPY)
    _store_gate(GRAD_GATES_H, GRAD_GATES_H_ROUNDED, gate + 2 * H, grad_n * r, mask, ROUNDED_COPY)
