"""Seq2Seq: every attention variant and cell at tiny, odd shapes; decoding (greedy, beam)."""

import itertools

import pytest
import torch

import fastattn
from fastattn.zoo.seq2seq import ATTENTIONS, BOS, CELLS, EOS, PAD, Seq2Seq, Seq2SeqConfig
from tests.zoo_helpers import one_thread  # noqa: F401 - autouse fixture

SOURCE_VOCABULARY, TARGET_VOCABULARY = 11, 9


def tiny_model(attention, cell="lstm", **fields):
    torch.manual_seed(0)
    config = Seq2SeqConfig(
        SOURCE_VOCABULARY, TARGET_VOCABULARY, attention=attention, cell=cell, embedding_size=5, hidden_size=6,
        window=2, max_source_length=9, **fields,
    )
    return Seq2Seq(config).double()


def tiny_batch():
    """Three sources of lengths 7, 4 and 1 (padded to 7), and targets of 5 steps."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 4, 1])
    source = torch.randint(4, SOURCE_VOCABULARY, (3, 7), generator=generator)
    source[torch.arange(7) >= lengths.unsqueeze(1)] = PAD
    target_input = torch.randint(4, TARGET_VOCABULARY, (3, 5), generator=generator)
    target_input[:, 0] = BOS
    return source, lengths, target_input


VARIANTS = [(attention, cell, True) for attention in ATTENTIONS for cell in CELLS] + [
    (attention, "lstm", False) for attention in ATTENTIONS if attention != "none"  # Bahdanau's order of steps
]


@pytest.mark.parametrize("attention, cell, input_feeding", VARIANTS)
def test_forward_and_backward_of_every_variant(attention, cell, input_feeding):
    model = tiny_model(attention, cell, input_feeding=input_feeding)
    source, lengths, target_input = tiny_batch()
    logits = model(source, lengths, target_input)
    assert logits.shape == (3, 5, TARGET_VOCABULARY) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    for name, parameter in model.named_parameters():
        if name in ("encoder.embedding.weight", "target_embedding.weight"):
            continue  # rows of unused tokens get no gradient
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padding_does_not_change_a_sequence_s_outputs(attention):
    """A source decoded alone and inside a padded batch gives the same logits."""
    model = tiny_model(attention)
    source, lengths, target_input = tiny_batch()
    batched = model(source, lengths, target_input)
    alone = model(source[1:2, :4], lengths[1:2], target_input[1:2])
    torch.testing.assert_close(batched[1:2], alone)


@pytest.mark.parametrize("attention, cell", [(attention, "lstm") for attention in ATTENTIONS] + [("additive", "gru")])
def test_greedy_equals_beam_search_of_width_one(attention, cell):
    model = tiny_model(attention, cell)
    source, lengths, _ = tiny_batch()
    greedy = model.greedy(source, lengths, max_length=6)
    beam = model.beam_search(source, lengths, max_length=6, width=1)
    assert torch.equal(greedy.tokens, beam.tokens)
    if attention == "none":
        assert greedy.weights is None and beam.weights is None
    else:
        assert greedy.weights.shape == (3, greedy.tokens.shape[1], 7)
        torch.testing.assert_close(greedy.weights, beam.weights)


@pytest.mark.parametrize("attention", ["dot", "general", "additive", "cosine", "location"])
def test_global_weights_are_a_distribution_over_the_valid_source(attention):
    model = tiny_model(attention)
    source, lengths, _ = tiny_batch()
    weights = model.greedy(source, lengths, max_length=4).weights
    padding = torch.arange(7) >= lengths.view(3, 1, 1)
    assert (weights.masked_select(padding) == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2], dtype=weights.dtype))


def test_local_m_attends_only_inside_the_window_around_each_step():
    model = tiny_model("local-m")
    source, lengths, _ = tiny_batch()
    weights = model.greedy(source, lengths, max_length=6).weights
    steps, positions = torch.arange(weights.shape[1]).view(-1, 1), torch.arange(7)
    outside = (positions - steps).abs() > model.config.window
    assert (weights[:, outside] == 0).all()
    assert (weights[0][~outside] > 0).all()  # the length-7 source: every window position is valid


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_local_m_steps_past_the_end_of_the_source_get_a_zero_context_on_every_backend(dtype):
    """Steps t > S - 1 + D see no encoder state: zero weights (a zero context), the same
    logits on the reference and the cpu backend (the reference had refused the empty
    window, as the cpu backend did in bfloat16, which its fused step does not take)."""
    model = tiny_model("local-m").to(dtype)
    source, lengths, _ = tiny_batch()
    target_input = torch.randint(4, TARGET_VOCABULARY, (3, 12), generator=torch.Generator().manual_seed(2))
    results = {}
    for backend_name in ("reference", "cpu"):
        with fastattn.backend(backend_name):
            results[backend_name] = model(source, lengths, target_input), model.greedy(source, lengths, max_length=12)
    for backend_name, (logits, decoded) in results.items():
        assert logits.shape == (3, 12, TARGET_VOCABULARY) and torch.isfinite(logits).all(), backend_name
        assert decoded.weights.shape[1] == 12, backend_name
        assert (decoded.weights[:, 7 + model.config.window :] == 0).all(), backend_name
    tolerance = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(results["cpu"][0], results["reference"][0], **tolerance)


def sequence_log_prob(model, source, lengths, tokens):
    """log p(tokens | source) by teacher forcing, tokens ending with the end token."""
    target_input = torch.tensor([[BOS, *tokens[:-1]]])
    log_probs = model(source, lengths, target_input).log_softmax(-1)[0]
    return sum(log_probs[t, token].item() for t, token in enumerate(tokens))


def test_beam_search_of_full_width_finds_the_most_likely_short_hypothesis():
    """With width = vocabulary size over two steps, beam search is exhaustive: its answer
    (no length normalisation) is the best of every 1- and 2-token hypothesis."""
    model = tiny_model("additive")
    source, lengths, _ = tiny_batch()
    source, lengths = source[:1], lengths[:1]
    found = model.beam_search(source, lengths, max_length=2, width=TARGET_VOCABULARY, length_penalty=0.0)
    found_tokens = [token for token in found.tokens[0].tolist() if token != PAD]
    candidates = [[EOS]] + [[first, second] for first, second in itertools.product(range(TARGET_VOCABULARY), repeat=2) if first != EOS]
    best = max(candidates, key=lambda tokens: sequence_log_prob(model, source, lengths, tokens))
    assert found_tokens == best


def test_length_normalisation_prefers_longer_hypotheses_than_raw_scores():
    model = tiny_model("additive")
    source, lengths, _ = tiny_batch()
    raw = model.beam_search(source, lengths, max_length=6, width=4, length_penalty=0.0)
    normalised = model.beam_search(source, lengths, max_length=6, width=4, length_penalty=1.0)
    assert ((normalised.tokens != PAD).sum(1) >= (raw.tokens != PAD).sum(1)).all()


def _bad_call(name):
    """The model's entry points with one bad argument (the sources have lengths 7, 4, 1)."""
    model = tiny_model("additive")
    source, lengths, target_input = tiny_batch()
    return {
        "lengths above S": lambda: model.greedy(source, torch.tensor([8, 4, 1]), 3),
        "zero length": lambda: model(source, torch.tensor([7, 0, 1]), target_input),
        "negative length": lambda: model.beam_search(source, torch.tensor([7, -1, 1]), 3),
        "lengths of another batch": lambda: model.greedy(source, torch.tensor([7, 4]), 3),
        "float lengths": lambda: model.greedy(source, lengths.double(), 3),
        "empty target": lambda: model(source, lengths, target_input[:, :0]),
        "beam max_length 0": lambda: model.beam_search(source, lengths, 0),
        "beam width 0": lambda: model.beam_search(source, lengths, 3, width=0),
        "beam length_penalty nan": lambda: model.beam_search(source, lengths, 3, length_penalty=float("nan")),
        "empty batch": lambda: model.greedy(source[:0], lengths[:0], 3),
    }[name]


@pytest.mark.parametrize(("case", "argument"), [
    ("lengths above S", "lengths"), ("zero length", "lengths"), ("negative length", "lengths"),
    ("lengths of another batch", "lengths"), ("float lengths", "lengths"), ("empty target", "target_input"),
    ("beam max_length 0", "max_length"), ("beam width 0", "width"),
    ("beam length_penalty nan", "length_penalty"), ("empty batch", "source"),
])
def test_bad_arguments_are_refused_by_name(case, argument):
    """Each had reached torch's packing (an error about `input.batch_sizes`) or a
    RuntimeError, or (beam_search's max_length 0) returned no weights."""
    with pytest.raises((ValueError, TypeError), match=rf"^{argument} must"):
        _bad_call(case)()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(attention="luong"), "attention must be one of"),
        (dict(cell="rnn"), "cell must be one of"),
        (dict(hidden_size=7), "hidden_size must be even"),
        (dict(window=-1), "window must be in"),  # local-m sliced an empty window (an error mid-decoding)
        (dict(window=2**40), "window must be in"),
        (dict(attention="local-p", window=0), r"window must be in \[1,"),  # its Gaussian has sigma D / 2
        (dict(embedding_size=0), "embedding_size must be in"),
        (dict(max_source_length=0), "max_source_length must be in"),
        (dict(target_vocab_size=3), "target_vocab_size must be in"),  # the four special tokens at least
    ],
)
def test_bad_configurations_are_value_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        Seq2SeqConfig(**{"source_vocab_size": 5, "target_vocab_size": 5, **fields})


def test_location_attention_rejects_sources_longer_than_it_was_built_for():
    model = tiny_model("location")
    with pytest.raises(ValueError, match="at most 9 tokens, got 12"):
        model.greedy(torch.full((1, 12), 5), torch.tensor([12]), max_length=3)


def test_decoding_never_emits_padding_or_the_begin_token():
    """An untrained model's argmax is often <pad> or <s>, which decode() drops: the tokens
    then no longer lined up with their attention rows, and beam search's length count
    (tokens != <pad>) was off."""
    source, lengths, _ = tiny_batch()
    raw_specials = 0
    for attention, cell in itertools.product(ATTENTIONS, CELLS):
        model = tiny_model(attention, cell)
        encoded, state = model.encode(source, lengths)
        with torch.no_grad():
            raw_specials += int((model.step(torch.full((3,), BOS), state, encoded, 0)[0].argmax(-1) <= BOS).sum())
        for decoded in (model.greedy(source, lengths, max_length=8), model.beam_search(source, lengths, 8, width=3)):
            tokens = decoded.tokens
            ended = (tokens == EOS).cumsum(1) - (tokens == EOS).int() > 0  # the steps after each end
            assert ((tokens > BOS) | (ended & (tokens == PAD))).all(), (attention, cell, tokens)
    assert raw_specials > 0  # the first steps' raw argmax would have emitted them


def test_beam_search_with_row_limits_equals_searching_each_row_alone():
    """``max_lengths``: each row of a batch ends its hypotheses at its own limit, as a
    search of that row alone with that ``max_length`` does (hypotheses that never end)."""
    model = tiny_model("dot").eval()
    with torch.no_grad():
        model.output.bias[EOS] = -1e4
    source, lengths, _ = tiny_batch()
    limits = torch.tensor([9, 3, 1])
    batched = model.beam_search(source, lengths, 9, 3, 1.0, max_lengths=limits)
    for row in range(3):
        alone = model.beam_search(source[row : row + 1, : lengths[row]], lengths[row : row + 1], int(limits[row]), 3, 1.0)
        assert alone.tokens.shape[1] == limits[row]
        assert torch.equal(batched.tokens[row, : limits[row]], alone.tokens[0])
        assert (batched.tokens[row, limits[row] :] == PAD).all()
    with pytest.raises(ValueError, match=r"max_lengths must be in \[1, max_length=9\]"):
        model.beam_search(source, lengths, 9, 3, max_lengths=torch.tensor([10, 3, 1]))
    with pytest.raises(ValueError, match="max_lengths"):
        model.beam_search(source, lengths, 9, 3, max_lengths=torch.tensor([3, 1]))
