"""Greedy decoding with the steps captured in a CUDA graph (fastattn.zoo.graph_decoding).

On the CPU: the argument checks, and the static-buffer steps that the graph captures, run
eagerly, against Seq2Seq's eager greedy loop (same tokens, same weights), for every
attention that can be captured, ragged ends included; and those steps, run as during a
capture, read no tensor value on the host (no synchronisation of the capturing stream).  Marked ``gpu``: the captured graph
itself against the eager loop on the device, at batch 1, on a ragged batch with end
tokens, and replayed for a new source."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import checks
from fastattn.zoo import graph_decoding
from fastattn.zoo.seq2seq import ATTENTIONS, EOS, PAD, Seq2Seq, Seq2SeqConfig
from tests.test_cuda_kernels import gpu
from tests.zoo_helpers import one_thread  # noqa: F401 - autouse fixture

CAPTURABLE = [attention for attention in ATTENTIONS if attention not in graph_decoding.UNCAPTURABLE_ATTENTIONS]
SOURCE_VOCABULARY, TARGET_VOCABULARY = 13, 17
# Added to the end token's output bias of the model below: with 1.0 the rows of the batch end
# at different steps and some never do; with 1.4 every row has ended after two steps.
RAGGED_ENDS, EARLY_ENDS = 1.0, 1.4


def model_for(attention="additive", cell="lstm", *, end_bias=0.0, device="cpu", dtype=torch.float64, **fields):
    """A small Seq2Seq with logits spread wide enough (output weights x10) for token choices
    to depend on the source, and ``end_bias`` added to the end token's logit."""
    torch.manual_seed(0)
    config = Seq2SeqConfig(
        SOURCE_VOCABULARY, TARGET_VOCABULARY, attention=attention, cell=cell, embedding_size=16, hidden_size=32,
        window=2, max_source_length=9, **fields,
    )
    model = Seq2Seq(config).to(device, dtype)
    with torch.no_grad():
        model.output.weight.mul_(10)
        model.output.bias[EOS] += end_bias
        model.target_embedding.weight.mul_(3)
    return model


def source_batch(seed=3, device="cpu"):
    """Six sources of lengths 7, 4, 1, 6, 2, 5 (padded to 7)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 1, 6, 2, 5])
    source = torch.randint(4, SOURCE_VOCABULARY, (6, 7), generator=generator)
    source[torch.arange(7) >= lengths.unsqueeze(1)] = PAD
    return source.to(device), lengths.to(device)


def end_steps(tokens):
    """Each row's step of its end token, None for a row that has not ended."""
    return [int(row.eq(EOS).nonzero()[0]) if row.eq(EOS).any() else None for row in tokens]


def static_steps_greedy(model, source, lengths, max_length, buffers=None):
    """The graph's steps and host loop, run eagerly -> (tokens, weights, the buffers)."""
    encoded, state = model.encode(source, lengths)
    if buffers is None:
        buffers = graph_decoding.StaticGreedySteps(encoded, state, graph_decoding.steps_per_replay(max_length))
    buffers.load(encoded, state)
    with torch.no_grad():
        tokens, weights = graph_decoding.decode(buffers, lambda: buffers.run(model), max_length)
    return tokens, weights, buffers


def assert_same_decoding(tokens, weights, eager):
    assert torch.equal(tokens, eager.tokens)
    if eager.weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, eager.weights, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- CPU


VARIANTS = [(attention, "lstm", True) for attention in CAPTURABLE] + [
    ("none", "gru", True), ("additive", "gru", True), ("general", "lstm", False), ("local-p", "lstm", False),
]


@pytest.mark.parametrize("attention, cell, input_feeding", VARIANTS)
@pytest.mark.parametrize("max_length", [1, 11])
def test_static_steps_run_eagerly_give_the_eager_loop_s_tokens_and_weights(attention, cell, input_feeding, max_length):
    model = model_for(attention, cell, input_feeding=input_feeding)
    source, lengths = source_batch()
    tokens, weights, _ = static_steps_greedy(model, source, lengths, max_length)
    assert_same_decoding(tokens, weights, model.greedy(source, lengths, max_length, cuda_graph=False))


def test_ragged_ends_pad_the_ended_rows_and_decode_to_max_length():
    model = model_for(end_bias=RAGGED_ENDS)
    source, lengths = source_batch()
    eager = model.greedy(source, lengths, 12, cuda_graph=False)
    ends = end_steps(eager.tokens)
    assert None in ends and len({end for end in ends if end is not None}) > 1, ends  # the case this test is for
    tokens, weights, _ = static_steps_greedy(model, source, lengths, 12)
    assert_same_decoding(tokens, weights, eager)
    for row, end in zip(tokens, ends):
        if end is not None:
            assert (row[end + 1 :] == PAD).all()


def test_decoding_stops_inside_a_replay_where_the_eager_loop_stops():
    model = model_for(end_bias=EARLY_ENDS)
    source, lengths = source_batch()
    eager = model.greedy(source, lengths, 12, cuda_graph=False)
    assert None not in end_steps(eager.tokens) and eager.tokens.shape[1] < graph_decoding.steps_per_replay(12)
    tokens, weights, _ = static_steps_greedy(model, source, lengths, 12)
    assert_same_decoding(tokens, weights, eager)


def test_loaded_buffers_decode_a_new_source():
    model = model_for(end_bias=RAGGED_ENDS)
    first, lengths = source_batch(seed=3)
    second, _ = source_batch(seed=4)
    _, _, buffers = static_steps_greedy(model, first, lengths, 12)
    tokens, weights, _ = static_steps_greedy(model, second, lengths, 12, buffers)
    eager = model.greedy(second, lengths, 12, cuda_graph=False)
    assert not torch.equal(eager.tokens, model.greedy(first, lengths, 12, cuda_graph=False).tokens)
    assert_same_decoding(tokens, weights, eager)


class NoHostReads(TorchDispatchMode):
    """Raises on every op that would read a tensor's value on the host (a synchronisation
    of the capturing stream, or a result whose shape depends on the values)."""

    HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.HOST_READS:
            raise AssertionError(f"{func} reads a tensor's value on the host")
        return func(*args, **(kwargs or {}))


def loaded_buffers(model, steps=3):
    source, lengths = source_batch()
    encoded, state = model.encode(source, lengths)
    buffers = graph_decoding.StaticGreedySteps(encoded, state, steps)
    buffers.load(encoded, state)
    return buffers


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
@pytest.mark.parametrize("attention", CAPTURABLE)
def test_the_captured_steps_read_no_value_on_the_host(attention, backend_name, monkeypatch):
    """On the backend "auto" picks (its Python is the CUDA backend's) and on the reference
    (the bench's oracle captures it)."""
    model = model_for(attention)
    buffers = loaded_buffers(model)
    monkeypatch.setattr(checks, "_capturing_cuda_graph", lambda: True)
    with fastattn.backend(backend_name), torch.no_grad(), NoHostReads():
        buffers.run(model)


def test_outside_a_capture_the_steps_check_values_on_the_host():
    """The control of the test above: its mode does catch the eager value checks."""
    model = model_for("additive")
    buffers = loaded_buffers(model)
    with torch.no_grad(), NoHostReads(), pytest.raises(AssertionError, match="reads a tensor's value"):
        buffers.run(model)


def test_replays_cover_max_length_with_few_extra_steps():
    for max_length in range(1, 70):
        steps = graph_decoding.steps_per_replay(max_length)
        replays = -(-max_length // steps)
        assert 1 <= steps <= graph_decoding.MAX_STEPS_PER_REPLAY
        assert max_length <= replays * steps < max_length + replays, max_length


def test_cuda_graph_true_on_the_cpu_raises_naming_the_argument():
    model = model_for()
    source, lengths = source_batch()
    with pytest.raises(ValueError, match="cuda_graph=True needs .* CUDA device, got cpu"):
        model.greedy(source, lengths, 4, cuda_graph=True)


def test_cuda_graph_must_be_true_false_or_none():
    model = model_for()
    source, lengths = source_batch()
    with pytest.raises(TypeError, match="cuda_graph must be True, False or None"):
        model.greedy(source, lengths, 4, cuda_graph="yes")


def test_automatic_choice_captures_on_cuda_only_and_never_local_m():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graph_decoding.wants_graph(None, "additive", cuda)
    assert not graph_decoding.wants_graph(None, "additive", cpu)
    assert not graph_decoding.wants_graph(None, "local-m", cuda)
    assert not graph_decoding.wants_graph(False, "additive", cuda)
    with pytest.raises(ValueError, match="cuda_graph=True cannot capture attention 'local-m'"):
        graph_decoding.wants_graph(True, "local-m", cuda)


def test_max_length_must_be_positive():
    model = model_for()
    source, lengths = source_batch()
    with pytest.raises(ValueError, match="max_length must be in"):
        model.greedy(source, lengths, 0)


def test_a_new_source_s_lengths_are_checked_before_they_reach_the_buffers():
    model = model_for()
    source, lengths = source_batch()
    _, _, buffers = static_steps_greedy(model, source, lengths, 4)
    encoded, state = model.encode(source, lengths)
    with pytest.raises(ValueError, match="lengths must lie in"):
        buffers.load(encoded._replace(lengths=lengths + 1), state)


# --------------------------------------------------------------------------- GPU


@gpu
def test_captured_greedy_at_batch_one_gives_the_eager_tokens():
    model = model_for(device="cuda", dtype=torch.float32)
    source, lengths = source_batch(device="cuda")
    source, lengths = source[:1], lengths[:1]
    graphed = model.greedy(source, lengths, 20, cuda_graph=True)
    eager = model.greedy(source, lengths, 20, cuda_graph=False)
    assert torch.equal(graphed.tokens, eager.tokens)
    torch.testing.assert_close(graphed.weights, eager.weights)


@gpu
@pytest.mark.parametrize("attention, cell, end_bias", [("additive", "lstm", RAGGED_ENDS), ("additive", "lstm", EARLY_ENDS), ("none", "gru", 0.0)])
def test_captured_greedy_on_a_ragged_batch_gives_the_eager_tokens(attention, cell, end_bias):
    model = model_for(attention, cell, end_bias=end_bias, device="cuda")
    source, lengths = source_batch(device="cuda")
    eager = model.greedy(source, lengths, 12, cuda_graph=False)
    if attention == "additive":
        assert any(end is not None for end in end_steps(eager.tokens)), "the case this test is for: rows that end"
    graphed = model.greedy(source, lengths, 12, cuda_graph=True)
    assert_same_decoding(graphed.tokens, graphed.weights, eager)


@gpu
def test_the_graph_is_captured_once_and_replayed_for_a_new_source():
    model = model_for(end_bias=RAGGED_ENDS, device="cuda")
    first, lengths = source_batch(seed=3, device="cuda")
    second, _ = source_batch(seed=4, device="cuda")
    model.greedy(first, lengths, 12)  # cuda_graph=None: captured on a CUDA device
    (graph,) = graph_decoding._graphs[model].values()
    graphed = model.greedy(second, lengths, 12)
    assert list(graph_decoding._graphs[model].values()) == [graph]
    assert_same_decoding(graphed.tokens, graphed.weights, model.greedy(second, lengths, 12, cuda_graph=False))
