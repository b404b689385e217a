"""Show-Attend-Tell: forward/backward of soft and hard attention on tiny shapes, greedy
decoding, the doubly stochastic regulariser against a hand-computed case, REINFORCE
reaching the attention parameters, the attention-in-box score, and the captions task
on a few steps (loss, metrics, plot, checkpoint state)."""

import argparse

import pytest
import torch

from fastattn.data.captions import load_caption_splits
from fastattn.data.vocabulary import Vocabulary, never_emitted
from fastattn.zoo.captions_task import CaptionsTask, attention_in_box
from fastattn.zoo.show_attend_tell import ShowAttendTell, attention_entropy, doubly_stochastic_penalty, reinforce_surrogate
from tests.zoo_helpers import train_arguments

VOCAB = 9


def _model(attention, **options):
    torch.manual_seed(0)
    return ShowAttendTell(VOCAB, (8, 12), attention=attention, feature_dim=6, embed_dim=5, hidden_dim=7, attn_dim=4, **options)


def _images(batch=3):
    images = torch.zeros(batch, 8, 12)
    images[:, 0:3, 1:4] = torch.rand(batch, 3, 3) + 0.1  # only in cell (0, 0) of the 2 x 3 grid
    images[:, 5:8, 9:12] = torch.rand(batch, 3, 3) + 0.1  # only in cell (1, 2)
    return images


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_forward_backward(attention):
    model = _model(attention)
    inputs = torch.randint(0, VOCAB, (3, 4))
    outputs = model(_images(), inputs)
    assert outputs.logits.shape == (3, 4, VOCAB) and outputs.weights.shape == (3, 4, 2, 3)
    torch.testing.assert_close(outputs.weights.sum((-2, -1)), torch.ones(3, 4))
    assert (outputs.location_log_probs is None) == (attention == "soft")
    loss = outputs.logits.logsumexp(-1).sum() + outputs.entropy.sum()
    if attention == "hard":
        loss = loss + outputs.location_log_probs.sum()
    loss.backward()
    assert model.encoder.layers[0].weight.grad.abs().sum() > 0
    assert model.attention.w_key.grad.abs().sum() > 0


def test_blank_cells_get_no_attention():
    model = _model("soft")
    images = _images()
    blank = model.blank_cells(images)
    assert blank.shape == (3, 2, 3) and blank.any() and not blank.all()
    weights = model(images, torch.randint(0, VOCAB, (3, 2))).weights
    assert (weights[blank.unsqueeze(1).expand_as(weights)] == 0).all()
    unmasked = _model("soft", mask_blank=False)
    assert unmasked.blank_cells(images) is None
    assert (unmasked(images, torch.randint(0, VOCAB, (3, 2))).weights > 0).all()


def test_hard_attention_samples_in_training_and_takes_the_argmax_in_eval():
    model = _model("hard", mask_blank=False)
    images, inputs = _images(), torch.randint(0, VOCAB, (3, 5))
    model.eval()
    first, second = model(images, inputs), model(images, inputs)
    torch.testing.assert_close(first.logits, second.logits)
    model.train()
    draws = {tuple(model(images, inputs, torch.Generator().manual_seed(seed)).logits.flatten()[:4].tolist()) for seed in range(6)}
    assert len(draws) > 1


def test_greedy_decoding_returns_words_and_attention_per_word():
    model, images = _model("soft"), _images()
    words, weights = model.greedy(images, bos=1, max_length=4)
    assert words.shape == (3, 4) and words.dtype == torch.int64 and weights.shape == (3, 4, 2, 3)
    model.eval()
    teacher_forced = model(images, torch.cat([torch.ones(3, 1, dtype=torch.int64), words[:, :-1]], 1))
    torch.testing.assert_close(never_emitted(teacher_forced.logits).argmax(-1), words)
    torch.testing.assert_close(teacher_forced.weights, weights)
    assert words.min() > Vocabulary.bos_id  # an untrained model's argmax is often <pad> or <s>
    assert (teacher_forced.logits.argmax(-1) <= Vocabulary.bos_id).any()


def test_doubly_stochastic_penalty_by_hand():
    # 2 steps over a 1x3 grid; the second caption has only its first step valid
    weights = torch.tensor([[[[0.5, 0.25, 0.25]], [[0.1, 0.2, 0.7]]], [[[1.0, 0.0, 0.0]], [[0.3, 0.3, 0.4]]]])
    mask = torch.tensor([[True, True], [True, False]])
    # caption 1: sums over t = 0.6, 0.45, 0.95 -> 0.16 + 0.3025 + 0.0025; caption 2: 1, 0, 0 -> 0 + 1 + 1
    torch.testing.assert_close(doubly_stochastic_penalty(weights, mask), torch.tensor([0.465, 2.0]))


def test_attention_entropy_by_hand():
    weights = torch.tensor([[[0.5, 0.5], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(attention_entropy(weights), torch.tensor([0.6931472, 0.0]))


def test_reinforce_gradient_reaches_the_attention_parameters():
    model = _model("hard", mask_blank=False)
    images, inputs = _images(), torch.randint(0, VOCAB, (3, 4))
    outputs = model(images, inputs, torch.Generator().manual_seed(0))
    mask = torch.ones(3, 4, dtype=torch.bool)
    reward = -torch.nn.functional.cross_entropy(outputs.logits.transpose(1, 2), inputs, reduction="none").sum(1)
    # only the policy term: detach the reward and the entropy so that the score function alone carries the gradient
    surrogate = reinforce_surrogate(reward.detach(), outputs.location_log_probs, outputs.entropy.detach(), mask, baseline=-5.0)
    surrogate.sum().backward()
    for name in ("w_query", "w_key", "v"):
        gradient = getattr(model.attention, name).grad
        assert gradient is not None and gradient.abs().sum() > 0, name
    # and the REINFORCE term is (reward - baseline) * log p(s): its gradient vanishes when the advantage does
    model.zero_grad()
    outputs = model(images, inputs, torch.Generator().manual_seed(0))
    policy_only = reinforce_surrogate(
        torch.zeros(3), outputs.location_log_probs, outputs.entropy.detach(), mask, baseline=0.0, entropy_weight=0.0
    )
    policy_only.sum().backward()
    assert model.attention.v.grad.abs().sum() == 0


def test_attention_in_box_scores_peaks_by_hand():
    data = load_caption_splits(0, {"train": 1, "valid": 1, "test": 4}, height=16, width=40)["test"]
    grid = (4, 10)
    peaks = torch.zeros(4, 4, dtype=torch.int64)
    for canvas in range(4):
        for slot in range(int(data.counts[canvas])):
            top, left, _, _ = data.boxes[canvas, slot].tolist()
            peaks[canvas, slot] = ((top + 4) // 4) * 10 + (left + 4) // 4  # a cell whose centre is inside
    assert attention_in_box(peaks, data, grid) == 1.0
    far = torch.zeros_like(peaks)
    for canvas in range(4):
        for slot in range(int(data.counts[canvas])):
            left = int(data.boxes[canvas, slot, 1])
            far[canvas, slot] = 9 if left < 20 else 0  # a corner cell far from the digit
    assert attention_in_box(far, data, grid) == 0.0


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: ShowAttendTell(VOCAB, (8, 10)), ValueError),
        (lambda: ShowAttendTell(VOCAB, (8, 12), attention="local"), ValueError),
        (lambda: _model("soft")(torch.rand(2, 8, 16), torch.zeros(2, 3, dtype=torch.int64)), ValueError),
        (lambda: _model("soft")(_images(2), torch.zeros(2, 3)), TypeError),
        (lambda: doubly_stochastic_penalty(torch.rand(2, 3, 1, 2), torch.ones(2, 2, dtype=torch.bool)), ValueError),
    ],
)
def test_bad_input(call, error):
    with pytest.raises(error):
        call()


@pytest.mark.parametrize(
    "call, message",
    [
        # torch.stack's "stack expects a non-empty TensorList", and the attention's "query_dim"
        (lambda: _model("soft")(_images(2), torch.zeros(2, 0, dtype=torch.int64)), r"^inputs must have shape \(B, T >= 1\)"),
        (lambda: ShowAttendTell(VOCAB, (8, 12), hidden_dim=0), r"^hidden_dim must be in \[1,"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _task(*flags):
    return CaptionsTask(train_arguments("captions", "--train-size", "64", "--test-size", "20", *flags), torch.device("cpu"))


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_task_loss_metrics_plot_and_state(attention, tmp_path):
    task = _task("--attention", attention, "--feature-dim", "8", "--hidden-dim", "16")
    batch = next(iter(task.batches("train", 16, torch.Generator().manual_seed(0))))
    loss, tokens = task.loss(task.model, batch)
    loss.backward()
    assert tokens == int((batch["targets"] != 0).sum()) and torch.isfinite(loss)
    assert task.model.attention.w_key.grad.abs().sum() > 0
    if attention == "hard":
        assert task.reward_baseline < 0  # moved towards the (negative) caption log-likelihood
    with torch.no_grad():
        metrics, hypotheses = task.evaluate(task.model, "test")
        paths = task.plot(task.model, "test", tmp_path)
    assert set(metrics) >= {"exact_match", "bleu", "attention_in_box"} and len(hypotheses) == 20
    assert 0 <= metrics["exact_match"] <= 1 and paths[0].stat().st_size > 0
    state = task.state_dict()
    restored = CaptionsTask(argparse.Namespace(data=None, train_size=8), torch.device("cpu"), state)
    assert restored.data["test"].captions() == task.data["test"].captions()
    assert restored.settings == task.settings and restored.vocabulary.tokens == task.vocabulary.tokens


def test_hard_attention_test_loss_is_the_soft_model_s_whatever_the_baseline():
    """The trainer's test loss (eval mode) was the REINFORCE surrogate: it moved with the
    training baseline (and the entropy bonus) and was often negative."""
    task = _task("--attention", "hard", "--feature-dim", "8", "--hidden-dim", "16")
    task.model.eval()
    batch = next(iter(task.batches("test", 20, torch.Generator())))
    with torch.no_grad():
        outputs = task.model(batch["images"], batch["inputs"])
        step_mask = batch["targets"] != Vocabulary.pad_id
        word_nll = torch.nn.functional.cross_entropy(
            outputs.logits.transpose(1, 2), batch["targets"], ignore_index=Vocabulary.pad_id, reduction="sum"
        )
        expected = word_nll / step_mask.sum() + 0.01 * doubly_stochastic_penalty(outputs.weights, step_mask).mean()
        for baseline in (0.0, -5.0, -20.0):
            task.reward_baseline = baseline
            loss, tokens = task.loss(task.model, batch)
            torch.testing.assert_close(loss, expected)
            assert tokens == int(step_mask.sum()) and task.reward_baseline == baseline


def test_task_refuses_a_data_file():
    with pytest.raises(Exception, match="--data"):
        _task("--data", "x.tsv")


def test_trainer_and_eval_round_trip(tmp_path):
    """``fastattn train captions`` for a few steps, then ``fastattn eval`` of its checkpoint
    scores the same held-out canvases the same way."""
    from fastattn.zoo.trainer import evaluate_checkpoint, train

    args = train_arguments(
        "captions", "--train-size", "64", "--test-size", "40", "--epochs", "1", "--feature-dim", "8",
        "--hidden-dim", "16", "--out", str(tmp_path / "run"), "--quiet",
    )
    trained = train(args)
    evaluated = evaluate_checkpoint(tmp_path / "run" / "checkpoint.pt", data=None, out=tmp_path / "eval",
                                    plot_attention=None, device=None, batch_size=None)
    assert trained["steps"] == 2 and trained["captions"] == 40
    for key in ("exact_match", "bleu", "attention_in_box"):
        assert evaluated[key] == trained[key]
    assert (tmp_path / "eval" / "hypotheses.txt").read_text().count("\n") == 40
