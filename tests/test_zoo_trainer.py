"""The trainer: checkpoints (round trip, crash safety, resume), the time budget, the report,
and a short run on ``copy`` that must really learn."""

import itertools
import json
import math
import os
import types

import pytest
import torch

from fastattn.zoo import checkpoint, trainer
from fastattn.zoo.checkpoint import CheckpointError
from fastattn.zoo.task import TaskError
from tests.zoo_helpers import TINY_COPY, one_thread, train_arguments  # noqa: F401 - autouse fixture


def test_checkpoint_round_trip(tmp_path):
    contents = {"model": {"w": torch.randn(3, 4)}, "progress": {"step": 7}, "args": {"lr": 0.1, "lengths": (1, 5)}}
    path = checkpoint.save(contents, tmp_path / "deep" / "checkpoint.pt")
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], contents["model"]["w"])
    assert loaded["progress"] == {"step": 7} and loaded["args"] == {"lr": 0.1, "lengths": (1, 5)}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~trainer_umask())


def trainer_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_crash_mid_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = checkpoint.save({"generation": 1, "weights": torch.arange(1000.0)}, tmp_path / "checkpoint.pt")
    real_save = torch.save

    def crash_halfway(obj, file):
        real_save(obj, file)
        file.truncate(file.tell() // 2)  # a torn file on disk ...
        raise KeyboardInterrupt  # ... and the process stops

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"generation": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    survived = checkpoint.load(path)
    assert survived["generation"] == 1 and torch.equal(survived["weights"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_loading_a_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoint.load(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a fastattn checkpoint"):
        checkpoint.load(tmp_path / "plain.pt")


@pytest.mark.parametrize("amp", [[], ["--amp", "float16"]], ids=["float32", "amp-float16"])
def test_resuming_gives_the_same_model_as_an_uninterrupted_run(tmp_path, amp):
    """Bit for bit; under --amp float16 the gradient scaler's state is resumed too."""
    straight = train_arguments("copy", *TINY_COPY, *amp, "--epochs", "2", "--out", str(tmp_path / "straight"))
    straight_metrics = trainer.train(straight)
    first_half = train_arguments("copy", *TINY_COPY, *amp, "--epochs", "1", "--out", str(tmp_path / "resumed"))
    trainer.train(first_half)
    after_one = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert after_one["progress"]["epoch"] == 1 and after_one["optimizer"]["state"]  # Adam moments saved
    assert bool(after_one["scaler"]) == bool(amp)
    second_half = train_arguments("copy", *TINY_COPY, *amp, "--epochs", "2", "--out", str(tmp_path / "resumed"),
                                  "--resume")
    metrics = trainer.train(second_half)
    assert metrics["steps"] == 12 and metrics["epochs_completed"] == 2  # 96 examples / 16 per batch, twice
    expected, resumed = (checkpoint.load(tmp_path / run / "checkpoint.pt") for run in ("straight", "resumed"))
    assert resumed["scaler"] == expected["scaler"]  # scale and steps since it last grew
    expected, resumed = expected["model"], resumed["model"]
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)
    assert metrics["loss_train"] == straight_metrics["loss_train"]  # its moving average is resumed too


def test_resuming_after_a_time_budget_stop_mid_epoch_finishes_the_planned_steps(tmp_path, monkeypatch):
    # The trainer's clock reads 10 ms later at each reading (three a step), so the 0.05 s
    # budget ends the run after a few steps however fast they really are.
    readings = itertools.count(0.0, 0.01)
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "time", types.SimpleNamespace(monotonic=lambda: next(readings)))
        stopped = trainer.train(train_arguments(
            "copy", *TINY_COPY, "--epochs", "2", "--time-budget", "0.05", "--out", str(tmp_path)
        ))
    assert stopped["stopped_by"] == "time_budget" and 0 < stopped["steps"] < 6  # stopped in the first epoch
    resumed = trainer.train(train_arguments("copy", *TINY_COPY, "--epochs", "2", "--out", str(tmp_path), "--resume"))
    progress = checkpoint.load(tmp_path / "checkpoint.pt")["progress"]
    assert resumed["steps"] == 12 and progress["steps_per_epoch"] == 6 and progress["epoch"] == 2


def test_a_resumed_run_counts_the_time_budget_its_earlier_runs_spent(tmp_path, monkeypatch):
    """The budget (and the learning rate's decay along it) restarted at every --resume."""
    readings = itertools.count(0.0, 0.01)  # as above: 10 ms a reading
    flags = ("copy", *TINY_COPY, "--epochs", "5", "--time-budget", "0.1", "--out", str(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "time", types.SimpleNamespace(monotonic=lambda: next(readings)))
        first = trainer.train(train_arguments(*flags))
        again = trainer.train(train_arguments(*flags, "--resume"))
        longer = trainer.train(train_arguments(*flags[:-4], "--time-budget", "0.2", "--out", str(tmp_path), "--resume"))
    assert first["stopped_by"] == again["stopped_by"] == longer["stopped_by"] == "time_budget"
    assert again["steps"] == first["steps"] > 0  # the same budget is spent already
    assert first["steps"] < longer["steps"] < 3 * first["steps"]  # the rest of a doubled budget


def test_resume_checks_the_checkpoint_task(tmp_path):
    trainer.train(train_arguments("copy", *TINY_COPY, "--epochs", "1", "--out", str(tmp_path)))
    with pytest.raises(TaskError, match="checkpoint of task 'copy', not 'reverse'"):
        trainer.train(train_arguments("reverse", *TINY_COPY, "--out", str(tmp_path), "--resume"))
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        trainer.train(train_arguments("copy", *TINY_COPY, "--out", str(tmp_path / "empty"), "--resume"))


def test_the_time_budget_stops_training_and_the_model_is_still_evaluated(tmp_path):
    args = train_arguments("copy", *TINY_COPY, "--epochs", "1000", "--time-budget", "1.5", "--out", str(tmp_path))
    metrics = trainer.train(args)
    assert metrics["stopped_by"] == "time_budget" and 0 < metrics["epochs_completed"] < 1000
    assert metrics["steps"] > 0 and metrics["train_seconds"] < 1.5 + 1.0  # stops within a step of the budget
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["exact_match"] == metrics["exact_match"] and written["steps"] == metrics["steps"]
    assert len((tmp_path / "hypotheses.txt").read_text().splitlines()) == 24
    assert all((tmp_path / os.path.basename(figure)).is_file() for figure in written["figures"])
    assert checkpoint.load(tmp_path / "checkpoint.pt")["progress"]["step"] == metrics["steps"]


def test_a_run_without_a_training_step_writes_strict_json(tmp_path, monkeypatch):
    """No step behind the training loss (a time budget spent before the first): NaN in
    the metrics, null in metrics.json (strict JSON has no NaN)."""
    monkeypatch.setattr(trainer.time, "monotonic", itertools.count(0, 1000).__next__)  # every step is over budget
    args = train_arguments("copy", *TINY_COPY, "--time-budget", "1", "--out", str(tmp_path))
    metrics = trainer.train(args)
    assert metrics["steps"] == 0 and math.isnan(metrics["loss_train"])
    written = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert written["loss_train"] is None


def test_bad_common_flags_are_task_errors(tmp_path):
    for flags, message in [(["--epochs", "0"], "--epochs must be >= 1"), (["--lr", "-1"], "--lr must be a positive"),
                           (["--time-budget", "nan"], "--time-budget must be a positive"),
                           (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
                           (["--device", "meta"], "--device must be cpu, cuda or cuda:N"),
                           (["--embedding-size", "0"], "--embedding-size must be >= 1"),
                           (["--attention", "local-m", "--window", "-1"], "--window must be >= 0"),
                           (["--attention", "local-p", "--window", "0"], "--window must be >= 1 with --attention local-p")]:
        with pytest.raises(TaskError, match=message):
            trainer.train(train_arguments("copy", *TINY_COPY, *flags, "--out", str(tmp_path)))


@pytest.mark.parametrize("amp", [None, "bfloat16", "float16"])
def test_copy_really_learns_in_a_few_seconds(tmp_path, amp):
    """Exact match far above chance (1 / 8^length) and a loss far below the uniform
    guess, log(vocabulary size), after about 10 s of training on two-to-four-symbol copies;
    in float32, and under --amp (torch.autocast; float16 with a gradient scaler)."""
    args = train_arguments(
        "copy", "--symbols", "8", "--lengths", "2", "4", "--train-size", "3000", "--test-size", "200",
        "--embedding-size", "16", "--hidden-size", "32", "--batch-size", "32", "--lr", "0.01",
        "--epochs", "4", "--time-budget", "12", "--quiet", "--out", str(tmp_path), *(["--amp", amp] if amp else []),
    )
    metrics = trainer.train(args)
    uniform_loss = math.log(8 + 4)  # symbols and the special tokens
    assert metrics["loss"] < 0.2 * uniform_loss, metrics
    assert metrics["exact_match"] > 0.5, metrics


def test_lstmn_refuses_an_empty_training_set(tmp_path):
    with pytest.raises(TaskError, match="--train-size must be >= 1, got 0"):
        trainer.train(train_arguments("lstmn", "--train-size", "0", "--epochs", "1", "--out", str(tmp_path)))


def test_resuming_draws_the_noise_the_uninterrupted_run_would(tmp_path):
    """The denoising autoencoder's noise comes from torch's global generator, whose state
    the checkpoint keeps: resumed at an epoch boundary, the model is bit for bit the same."""
    flags = ("--model", "denoising", "--epochs", "2", "--batch-size", "256")
    trainer.train(train_arguments("autoencoder", *flags, "--out", str(tmp_path / "straight")))
    trainer.train(train_arguments("autoencoder", *flags[:2], "--epochs", "1", *flags[4:], "--out", str(tmp_path / "resumed")))
    trainer.train(train_arguments("autoencoder", *flags, "--out", str(tmp_path / "resumed"), "--resume"))
    expected, resumed = (checkpoint.load(tmp_path / run / "checkpoint.pt")["model"] for run in ("straight", "resumed"))
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)


def test_resume_refuses_changed_model_flags_but_takes_more_epochs(tmp_path):
    trainer.train(train_arguments("copy", *TINY_COPY, "--epochs", "1", "--out", str(tmp_path)))
    with pytest.raises(TaskError, match=r"--hidden-size 16 \(the checkpoint's: 12\)"):
        trainer.train(train_arguments("copy", *TINY_COPY, "--hidden-size", "16", "--epochs", "2", "--out", str(tmp_path), "--resume"))
    assert trainer.train(train_arguments("copy", *TINY_COPY, "--epochs", "2", "--out", str(tmp_path), "--resume"))["epochs_completed"] == 2
