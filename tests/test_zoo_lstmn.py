"""LSTMN: forward/backward on tiny shapes, causality (a step never reads later tokens),
the intra-attention rows being distributions over the states written so far, the recall
data, and the lstmn task end to end on a few steps."""

import argparse

import pytest
import torch

from fastattn.data.recall import QUERY, VALUES, generate_recall, load_recall_splits, render, vocabulary
from fastattn.zoo.lstmn import LSTMN, RecallClassifier
from fastattn.zoo.lstmn_task import LSTMNTask
from tests.zoo_helpers import train_arguments


def test_lstmn_forward_backward_and_attention_rows():
    torch.manual_seed(0)
    model = LSTMN(input_size=5, hidden_size=7, attn_dim=3)
    inputs = torch.randn(3, 6, 5, requires_grad=True)
    hidden, weights = model(inputs)
    assert hidden.shape == (3, 6, 7) and weights.shape == (3, 6, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 6))
    assert (weights.triu(diagonal=1) == 0).all(), "step t may read only the zero state and h_1..h_t-1"
    (hidden.sum() + weights[:, -1].pow(2).sum()).backward()
    assert inputs.grad.abs().sum() > 0
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in model.parameters())


@pytest.mark.parametrize("read_next_token", [False, True])
def test_lstmn_is_causal(read_next_token):
    torch.manual_seed(1)
    model = LSTMN(input_size=4, hidden_size=6, read_next_token=read_next_token)
    inputs = torch.randn(2, 7, 4)
    changed = inputs.clone()
    changed[:, 4:] = torch.randn(2, 3, 4)
    first, _ = model(inputs)
    second, _ = model(changed)
    torch.testing.assert_close(first[:, :4], second[:, :4])
    assert not torch.allclose(first[:, 4:], second[:, 4:])


def test_first_step_reads_the_zero_state_so_it_is_an_lstm_step_from_zero():
    torch.manual_seed(2)
    model = LSTMN(input_size=3, hidden_size=4)
    inputs = torch.randn(2, 1, 3)
    hidden, _ = model(inputs)
    cell = torch.nn.LSTMCell(3, 4)
    cell.load_state_dict(model.cell.state_dict())
    torch.testing.assert_close(hidden[:, 0], cell(inputs[:, 0])[0])


def test_read_next_token_tape_holds_the_token_after_each_state():
    """Tape entry i (0: the zero state, i: the state after token i) is read with token i + 1,
    so the last step's values end with the whole input; without the flag they do not."""
    torch.manual_seed(3)
    inputs = torch.randn(2, 5, 3)
    for read_next_token, value_size in [(True, 2 * 4 + 3), (False, 2 * 4)]:
        model = LSTMN(input_size=3, hidden_size=4, read_next_token=read_next_token)
        values_read = []
        model.attention.register_forward_hook(lambda module, args, output: values_read.append(args[2]))
        _, weights = model(inputs)
        assert weights.shape == (2, 5, 6) and len(values_read) == 5
        assert values_read[-1].shape == (2, 5, value_size)
        if read_next_token:
            torch.testing.assert_close(values_read[-1][..., 8:], inputs)


def test_read_next_token_solves_recall_quickly():
    """The point of the flag: with the token after each key on the tape, matching the key
    reads its value; 60 steps suffice (the paper's LSTMN: about 0.4 after as many)."""
    torch.manual_seed(0)
    data = load_recall_splits(0, {"train": 4000}, pairs=3, keys=6)
    model = RecallClassifier(len(vocabulary(6)), len(VALUES), hidden_size=24, score="general", read_next_token=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        chosen = torch.randint(0, 4000, (64,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(data["train"].tokens[chosen])[0], data["train"].answers[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(data["test"].tokens)[0].argmax(-1) == data["test"].answers).double().mean()
    assert accuracy > 0.9, accuracy  # chance is 0.1


@pytest.mark.parametrize("encoder, score", [("lstmn", "additive"), ("lstmn", "general"), ("lstm", "additive")])
def test_classifier_forward_backward(encoder, score):
    model = RecallClassifier(vocab_size=11, classes=4, encoder=encoder, embed_dim=5, hidden_size=6, score=score)
    logits, weights = model(torch.randint(0, 11, (3, 9)))
    assert logits.shape == (3, 4)
    assert (weights is None) == (encoder == "lstm")
    logits.sum().backward()
    assert model.embedding.weight.grad.abs().sum() > 0


def test_same_hidden_size_for_both_models():
    lstmn = RecallClassifier(10, 10, encoder="lstmn", hidden_size=12)
    lstm = RecallClassifier(10, 10, encoder="lstm", hidden_size=12)
    assert lstmn.encoder.cell.hidden_size == lstm.encoder.hidden_size == 12


def test_recall_data_answers_are_the_values_after_the_queried_key():
    data = generate_recall(200, torch.Generator().manual_seed(0), pairs=5, keys=9)
    words = vocabulary(9)
    for tokens, answer in zip(data.tokens, data.answers):
        text = render(tokens, 9).split()
        keys, values = text[0:10:2], text[1:10:2]
        assert len(set(keys)) == 5 and text[-2] == QUERY
        assert values[keys.index(text[-1])] == VALUES[answer]
        assert all(word in words for word in text)
    splits = load_recall_splits(4, {"train": 30})
    assert torch.equal(splits["test"].tokens, load_recall_splits(4, {"train": 50})["test"].tokens)


@pytest.mark.parametrize(
    "call",
    [
        lambda: generate_recall(3, torch.Generator(), pairs=6, keys=5),
        lambda: LSTMN(0, 4),
        lambda: LSTMN(3, 4)(torch.randn(2, 5, 4)),
        lambda: RecallClassifier(5, 3, encoder="gru"),
        lambda: LSTMN(3, 4, score="dot"),
    ],
)
def test_bad_input(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: LSTMN(4, 8)(torch.zeros(2, 0, 4)), "inputs"),
        (lambda: RecallClassifier(10, 3)(torch.zeros(2, 0, dtype=torch.int64)), "tokens"),
        (lambda: RecallClassifier(10, 3, encoder="lstm")(torch.zeros(2, 0, dtype=torch.int64)), "tokens"),
    ],
)
def test_zero_steps_are_refused_by_name(call, argument):
    """They failed inside torch.stack ("stack expects a non-empty TensorList")."""
    with pytest.raises(ValueError, match=rf"^{argument} must have shape \(B, T >= 1"):
        call()


def test_read_next_token_must_be_a_flag():
    with pytest.raises(TypeError, match="read_next_token"):
        LSTMN(3, 4, read_next_token="yes")


def test_task_learns_something_and_restores(tmp_path):
    torch.manual_seed(0)
    args = train_arguments("lstmn", "--pairs", "2", "--keys", "3", "--hidden", "16", "--train-size", "2000")
    task = LSTMNTask(args, torch.device("cpu"))
    optimizer = torch.optim.Adam(task.model.parameters(), lr=1e-2)
    for _ in range(2):
        for batch in task.batches("train", 50, torch.Generator().manual_seed(0)):
            loss, count = task.loss(task.model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        metrics, lines = task.evaluate(task.model, "test")
        paths = task.plot(task.model, "test", tmp_path)
    assert metrics["accuracy"] > 0.3, metrics  # chance is 0.1
    assert len(lines) == 1000 and " -> " in lines[0]
    assert paths and paths[0].stat().st_size > 0
    restored = LSTMNTask(argparse.Namespace(data=None), torch.device("cpu"), task.state_dict())
    restored.model.load_state_dict(task.model.state_dict())
    with torch.no_grad():
        assert restored.evaluate(restored.model, "test")[0] == metrics
