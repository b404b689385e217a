"""The fused attention-decoder step (torch.ops.fastattn.attention_decoder_step, backend
"cpu") against the composed step on the reference backend: every score, LSTM and GRU,
with and without input feeding, lengths (with an empty source) and a key padding mask,
local-p windows and image-grid keys; outputs, state, weights and gradients; the
configurations it leaves to the composed step; opcheck; and the argument and state
checks every backend shares."""

import itertools

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.nn.decoder import DecoderState
from fastattn.ops import decoder_step
from tests.problems import SCORES

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

BATCH, SOURCE, INPUT, HIDDEN, KEY = 3, 7, 5, 6, 6
LENGTHS = torch.tensor([7, 0, 3])
PADDING = torch.tensor([[False] * 6 + [True], [False] * 7, [True, False, True, False, False, False, False]])
STEPS = 3


def make_decoder(score, cell, input_feeding, dtype=torch.float64, **options):
    torch.manual_seed(0)
    decoder = fastattn.nn.AttentionDecoderCell(
        INPUT, HIDDEN, KEY, score=score, cell=cell, input_feeding=input_feeding,
        max_source_len=SOURCE + 2 if score == "location" else None, **options,
    )
    return decoder.to(dtype)


def decode(decoder, backend_name, keys, inputs, **masks):
    """STEPS decoder steps on ``backend_name``; -> (every output, state and weights, the gradients)."""
    with fastattn.backend(backend_name):
        cache, state, results = decoder.precompute(keys), None, []
        for y in inputs:
            output, state, weights = decoder(y, state, cache, **masks)
            results += [output, state.hidden, weights] + ([state.cell] if state.cell is not None else [])
    generator = torch.Generator().manual_seed(1)
    projection = sum((r * torch.randn(r.shape, generator=generator, dtype=r.dtype)).sum() for r in results)
    leaves = [keys, *inputs, *decoder.parameters()]
    return results, torch.autograd.grad(projection, leaves, allow_unused=True)


@pytest.mark.parametrize("score, cell, input_feeding", list(itertools.product(SCORES, ("lstm", "gru"), (True, False))))
@pytest.mark.parametrize("masks", [{"lengths": LENGTHS}, {"key_padding_mask": PADDING}, {}], ids=["lengths", "padding", "none"])
def test_fused_step_matches_the_composed_reference(score, cell, input_feeding, masks):
    assert_fused_equals_composed(make_decoder(score, cell, input_feeding), (BATCH, SOURCE, KEY), masks)


def assert_fused_equals_composed(decoder, keys_shape, masks):
    """The fused op (it must be taken) equals the reference backend's composed step."""
    keys = torch.randn(keys_shape, dtype=torch.float64, requires_grad=True)
    inputs = [torch.randn(BATCH, INPUT, dtype=torch.float64, requires_grad=True) for _ in range(STEPS)]
    state = decoder.initial_state(BATCH, inputs[0])
    taken = decoder_step.attention_decoder_step(decoder, inputs[0], state, decoder.precompute(keys), **{
        "lengths": None, "key_padding_mask": None} | masks)
    assert taken is not None, "the fused op must cover this configuration"
    expected = decode(decoder, "reference", keys, inputs, **masks)
    fused = decode(decoder, "cpu", keys, inputs, **masks)
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)


# Windows that fit inside, straddle and miss parts of the 7 keys; centres come from the state.
@pytest.mark.parametrize("score, cell, input_feeding", [
    ("general", "lstm", True), ("dot", "gru", True), ("additive", "lstm", False), ("cosine", "gru", False),
    ("location", "lstm", True), ("scaled_dot", "gru", False),
])
@pytest.mark.parametrize("window", [1, 2, 9])
@pytest.mark.parametrize("masks", [{"lengths": LENGTHS}, {}], ids=["lengths", "none"])
def test_fused_step_with_a_local_p_window(score, cell, input_feeding, window, masks):
    decoder = make_decoder(score, cell, input_feeding, window=window, local="p")
    assert_fused_equals_composed(decoder, (BATCH, SOURCE, KEY), masks)


def test_local_p_with_a_key_padding_mask_is_composed():
    """p_t takes the source's length from its unmasked keys, which the op (lengths
    alone) does not: the module composes the step, the same on both backends."""
    decoder = make_decoder("dot", "lstm", True, window=2, local="p")
    keys = torch.randn(BATCH, SOURCE, KEY, dtype=torch.float64, requires_grad=True)
    inputs = [torch.randn(BATCH, INPUT, dtype=torch.float64, requires_grad=True) for _ in range(STEPS)]
    state = decoder.initial_state(BATCH, inputs[0])
    assert decoder_step.attention_decoder_step(
        decoder, inputs[0], state, decoder.precompute(keys), lengths=None, key_padding_mask=PADDING) is None
    torch.testing.assert_close(decode(decoder, "cpu", keys, inputs, key_padding_mask=PADDING),
                               decode(decoder, "reference", keys, inputs, key_padding_mask=PADDING), rtol=1e-10, atol=1e-10)


GRID = (2, 3)
GRID_PADDING = torch.tensor([[[False, True, False], [False, False, False]]] * BATCH)


@pytest.mark.parametrize("score", [s for s in SCORES if s != "location"])
@pytest.mark.parametrize("masks", [{"key_padding_mask": GRID_PADDING}, {}], ids=["padding", "none"])
def test_fused_step_over_image_grid_keys(score, masks):
    decoder = make_decoder(score, "lstm", True)
    assert_fused_equals_composed(decoder, (BATCH, *GRID, KEY), masks)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("input_feeding", [True, False])
def test_fused_step_in_float32_without_gradients(score, input_feeding):
    """Without gradients the step's GEMMs (the additive query's W_q, the combination W_c)
    run matmul_transposed_into's kernel for a few float32 rows, not at::linear."""
    decoder = make_decoder(score, "lstm", input_feeding, dtype=torch.float32)
    keys = torch.randn(BATCH, SOURCE, KEY)
    y = torch.randn(BATCH, INPUT)
    outputs = {}
    for backend_name in ("reference", "cpu"):
        with torch.no_grad(), fastattn.backend(backend_name):
            outputs[backend_name] = decoder(y, None, decoder.precompute(keys), lengths=LENGTHS)
    torch.testing.assert_close(outputs["cpu"], outputs["reference"], rtol=2e-5, atol=2e-5)


def test_a_step_compiled_without_gradients_matches_the_eager_step():
    """torch.compile traces the composite op with FakeTensors, whose memory its CPU GEMM
    kernel must not read (they go to at::linear)."""
    decoder = make_decoder("additive", "lstm", True, dtype=torch.float32)
    keys, y = torch.randn(BATCH, SOURCE, KEY), torch.randn(BATCH, INPUT)
    with torch.no_grad(), fastattn.backend("cpu"):
        cache = decoder.precompute(keys)
        eager = decoder(y, None, cache)
        compiled = torch.compile(lambda y: decoder(y, None, cache), backend="aot_eager")(y)
    torch.testing.assert_close(compiled, eager)


def test_the_cpu_backend_has_the_fused_step_and_the_reference_composes():
    with fastattn.backend("cpu"):
        fused = backends.fused("attention_decoder_step", "cpu")
    assert fused is decoder_step.attention_decoder_step
    with fastattn.backend("reference"):
        assert backends.fused("attention_decoder_step", "cpu") is None
    with fastattn.backend("cpu"):  # CUDA tensors: not this backend's kernel
        assert backends.fused("attention_decoder_step", "cuda") is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_step_takes_the_fused_op(dtype):
    """The ops the step composes take float16 and bfloat16 on the cpu backend, and so does
    the fused step: it answers the call and matches the reference run in that dtype."""
    decoder = make_decoder("dot", "lstm", True, dtype=dtype)
    keys, y = torch.randn(BATCH, SOURCE, KEY, dtype=dtype), torch.randn(BATCH, INPUT, dtype=dtype)
    cache = decoder.precompute(keys)
    state = decoder.initial_state(BATCH, y)
    with torch.no_grad():
        taken = decoder_step.attention_decoder_step(decoder, y, state, cache, lengths=None, key_padding_mask=None)
        assert taken is not None and all(t.dtype == dtype for t in taken if t is not None)
        results = {}
        for backend_name in ("reference", "cpu"):
            with fastattn.backend(backend_name):
                results[backend_name] = decoder(y, None, cache)
    torch.testing.assert_close(results["cpu"], results["reference"], rtol=2e-2, atol=2e-2)


def op_arguments(cell, input_feeding, masks, local_p=False):
    torch.manual_seed(2)
    gates = 4 if cell == "lstm" else 3
    fed = HIDDEN if input_feeding else KEY

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    return (
        leaf(BATCH, INPUT), leaf(BATCH, HIDDEN), leaf(BATCH, HIDDEN) if cell == "lstm" else None, leaf(BATCH, HIDDEN),
        leaf(BATCH, SOURCE, 4), leaf(BATCH, SOURCE, KEY), leaf(HIDDEN, 4), leaf(4), leaf(4), "additive", 1.0,
        masks.get("lengths"), masks.get("key_padding_mask"),
        leaf(gates * HIDDEN, INPUT + fed), leaf(gates * HIDDEN, HIDDEN), leaf(gates * HIDDEN), None,
        leaf(HIDDEN, KEY + HIDDEN), input_feeding, *((2, leaf(HIDDEN, 5), leaf(5)) if local_p else ()),
    )


@pytest.mark.parametrize("cell, input_feeding, local_p", [("lstm", True, False), ("gru", False, False),
                                                          ("lstm", True, True), ("gru", False, True)])
@pytest.mark.parametrize("masks", [{"lengths": LENGTHS}, {"key_padding_mask": PADDING}], ids=["lengths", "padding"])
def test_opcheck_attention_decoder_step(cell, input_feeding, local_p, masks):
    arguments = op_arguments(cell, input_feeding, masks, local_p)
    torch.library.opcheck(torch.ops.fastattn.attention_decoder_step.default, arguments)
    if local_p:  # without the op's gradients (CUDA routes these to the inference op)
        inference = [a.detach() if isinstance(a, torch.Tensor) else a for a in arguments]
        torch.library.opcheck(torch.ops.fastattn.attention_decoder_step_inference.default, inference)


@pytest.mark.parametrize("op", ["attention_decoder_step", "attention_decoder_step_inference"])
@pytest.mark.parametrize("local, message", [
    ((2, None, None), r"local-p attention needs window, position_weight and position_v together"),
    ((None, torch.ones(HIDDEN, 5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)), r"needs window"),
    ((0, torch.ones(HIDDEN, 5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)), r"window must be >= 1"),
])
def test_the_local_p_arguments_are_checked(op, local, message):
    arguments = [a.detach() if isinstance(a, torch.Tensor) else a for a in op_arguments("lstm", True, {})]
    with pytest.raises(ValueError, match=message):
        getattr(torch.ops.fastattn, op)(*arguments, *local)


@pytest.mark.parametrize("op", ["attention_decoder_step", "attention_decoder_step_inference"])
def test_a_scale_other_than_1_with_the_additive_score_is_refused(op):
    arguments = [a.detach() if isinstance(a, torch.Tensor) else a for a in op_arguments("lstm", True, {})]
    arguments[10] = 0.5
    with pytest.raises(ValueError, match=r"attention_decoder_step: scale must be 1 with score \"additive\".* got 0.5"):
        getattr(torch.ops.fastattn, op)(*arguments)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_a_malformed_state_is_named(backend_name):
    lstm, gru = make_decoder("dot", "lstm", True), make_decoder("dot", "gru", True)
    keys, y = torch.randn(BATCH, SOURCE, KEY, dtype=torch.float64), torch.randn(BATCH, INPUT, dtype=torch.float64)
    good = lstm.initial_state(BATCH, y)
    with fastattn.backend(backend_name):
        with pytest.raises(ValueError, match=r"state\.hidden must have shape \(B=3, hidden_size=6\)"):
            lstm(y, good._replace(hidden=torch.zeros(BATCH, HIDDEN + 1, dtype=torch.float64)), lstm.precompute(keys))
        with pytest.raises(TypeError, match=r"state\.attentional must have the same dtype"):
            lstm(y, good._replace(attentional=good.attentional.float()), lstm.precompute(keys))
        with pytest.raises(ValueError, match=r"state\.cell must be None for a GRU"):
            gru(y, good, gru.precompute(keys))
        with pytest.raises(TypeError, match=r"state must be a DecoderState"):
            lstm(y, good.hidden, lstm.precompute(keys))
        with pytest.raises(ValueError, match=r"cache was made by an Attention with score 'dot'"):
            make_decoder("general", "lstm", True)(y, None, lstm.precompute(keys))
        output, state, _ = lstm(y, tuple(good), lstm.precompute(keys))  # a plain 3-tuple is a state too
        assert isinstance(state, DecoderState) and output.shape == (BATCH, HIDDEN)


def test_local_m_needs_the_position_a_single_step_does_not_carry():
    decoder = make_decoder("dot", "lstm", True, window=2, local="m")
    keys, y = torch.randn(BATCH, SOURCE, KEY, dtype=torch.float64), torch.randn(BATCH, INPUT, dtype=torch.float64)
    for backend_name in ("reference", "cpu"):
        with fastattn.backend(backend_name), pytest.raises(ValueError, match=r"local='m' .* single decoder step"):
            decoder(y, None, decoder.precompute(keys))
