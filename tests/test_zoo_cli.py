"""``fastattn train`` / ``fastattn eval`` end to end, and bad input giving one clear line."""

import argparse
import errno
import json
import math
import os

import pytest
import torch

from fastattn.cli import main
from fastattn.data.vocabulary import Vocabulary
from fastattn.zoo import trainer
from fastattn.zoo.seq2seq import EOS
from fastattn.zoo.sequence_tasks import Example, TranslateTask
from tests.zoo_helpers import TINY_COPY, one_thread  # noqa: F401 - autouse fixture

WORDS = ["the cat", "a dog", "my bird", "the dog", "a cat", "my cat", "the bird", "a bird"]
FRENCH = {"the": "le", "a": "un", "my": "mon", "cat": "chat", "dog": "chien", "bird": "oiseau"}


def corpus(tmp_path, name="corpus.tsv", count=80):
    """A tiny English -> French TSV with a third (attribution) column, as the Tatoeba exports."""
    lines = []
    for index in range(count):
        english = f"{WORDS[index % len(WORDS)]} sleeps."
        french = " ".join(FRENCH.get(word, word) for word in english.rstrip(".").split()).replace("sleeps", "dort")
        lines.append(f"{english.capitalize()}\t{french.capitalize()}.\tCC-BY 2.0 #{index}\n")
    path = tmp_path / name
    path.write_text("".join(lines), encoding="utf-8")
    return path


def one_error_line(capsys, code, expected_status=1):
    assert code == expected_status
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_translate_trains_reports_bleu_and_evaluates_on_unseen_data(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code = main(["train", "translate", "--data", str(corpus(tmp_path)), "--epochs", "2", "--hidden-size", "16",
                 "--embedding-size", "8", "--batch-size", "8", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["headline_metric"] == "bleu" and 0 <= metrics["bleu"] <= 100
    assert metrics["bleu_signature"].startswith("BLEU")
    for key in ("loss", "steps", "tokens_per_second", "wall_seconds", "exact_match"):
        assert key in metrics
    assert (out / "checkpoint.pt").is_file() and metrics["figures"]

    unseen = tmp_path / "unseen.tsv"
    unseen.write_text("The zebra sleeps.\tLe zèbre dort.\nMy dog sleeps.\tMon chien dort.\n", encoding="utf-8")
    figure = tmp_path / "figures" / "alignment.png"

    def across_file_systems(*paths):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", across_file_systems)  # the figure moves to another file system
    monkeypatch.setattr(os, "replace", across_file_systems)
    code = main(["eval", str(out / "checkpoint.pt"), "--data", str(unseen), "--out", str(tmp_path / "eval"),
                 "--plot-attention", str(figure)])
    assert code == 0, capsys.readouterr().err
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["examples"] == 2 and "bleu" in evaluated and evaluated["data"] == str(unseen)
    assert len((tmp_path / "eval" / "hypotheses.txt").read_text().splitlines()) == 2
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("lines", [
    ["He is well loved.\tIl est bien-aimé.", "It is 3.5 degrees.\tIl fait 3.5 degrés.",
     'She said "yes".\tElle a dit « oui ».', "It costs $5,000.\tÇa coûte 5,000 $."],
    ["Go.\tVa !", "Hi.\tSalut !", "I see.\tJe vois.", "We eat.\tNous mangeons."],
], ids=["detokenising", "under-4-tokens"])
def test_translate_bleu_of_the_references_own_tokens_is_100(tmp_path, lines):
    """BLEU compared the detokenised hypotheses with the file's text, which detokenising
    does not give back ("bien - aimé", "3. 5"): perfect output scored 26 to 41.  And it
    counted 4-grams where no reference has 4 tokens: perfect output scored 0."""
    import torch

    from fastattn.zoo.sequence_tasks import TranslateTask
    from tests.zoo_helpers import train_arguments

    lines = lines * 5
    data = tmp_path / "corpus.tsv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = train_arguments("translate", "--data", str(data), "--test-fraction", "0.4")
    args.mode = "train"
    task = TranslateTask(args, torch.device("cpu"), None)
    examples = task.examples["test"]
    metrics = task.extra_metrics(examples, [example.target for example in examples], [True] * len(examples))
    assert metrics["bleu"] == pytest.approx(100.0)


def test_translate_evaluates_its_own_test_split_without_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "translate", "--data", str(corpus(tmp_path)), "--epochs", "1", "--hidden-size", "16",
                 "--embedding-size", "8", "--batch-size", "8", "--out", str(out), "--quiet"]) == 0
    assert main(["eval", str(out / "checkpoint.pt")]) == 0, capsys.readouterr().err
    trained = json.loads((out / "metrics.json").read_text())
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluated["examples"] == trained["examples"] and evaluated["bleu"] == trained["bleu"]


def test_synthetic_task_evaluates_its_own_test_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "reverse", *TINY_COPY, "--epochs", "1", "--out", str(out)]) == 0
    assert main(["eval", str(out / "checkpoint.pt")]) == 0
    trained = json.loads((out / "metrics.json").read_text())
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())  # the default --out
    assert evaluated["exact_match"] == trained["exact_match"] and evaluated["examples"] == 24
    assert "reverse: exact_match " in capsys.readouterr().out


def test_every_score_of_the_api_is_an_attention_that_trains(tmp_path):
    """API.md gives ``--attention SCORE|none``; scaled_dot, one of the scores, was an invalid choice."""
    from fastattn.functional.attention_inputs import SCORES
    from fastattn.zoo.seq2seq import ATTENTIONS

    assert {*SCORES, "none"} <= set(ATTENTIONS)
    out = tmp_path / "run"
    assert main(["train", "copy", *TINY_COPY, "--attention", "scaled_dot", "--epochs", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] > 0 and math.isfinite(metrics["loss_train"])


def test_unknown_task_and_attention_are_usage_errors(capsys):
    line = one_error_line(capsys, main(["train", "parrot"]), expected_status=2)
    assert "invalid choice: 'parrot'" in line and "reverse" in line
    line = one_error_line(capsys, main(["train", "copy", "--attention", "telepathy"]), expected_status=2)
    assert "--attention: invalid choice: 'telepathy'" in line


def test_missing_data_file(tmp_path, capsys):
    line = one_error_line(capsys, main(["train", "translate", "--data", str(tmp_path / "nope.tsv"), "--out", str(tmp_path)]))
    assert line == f"fastattn: error: {tmp_path / 'nope.tsv'}: no such file"
    line = one_error_line(capsys, main(["train", "translate", "--out", str(tmp_path)]))
    assert "needs --data FILE.tsv" in line


def test_malformed_tsv_line_names_the_file_and_line(tmp_path, capsys):
    path = corpus(tmp_path)
    path.write_text(path.read_text() + "this line has no tab\n", encoding="utf-8")
    line = one_error_line(capsys, main(["train", "translate", "--data", str(path), "--out", str(tmp_path)]))
    assert f"{path}:81: expected source<TAB>target" in line


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["train", "copy", "--data", "x.tsv"], "generates its data; --data is for translate"),
        (["train", "copy", "--hidden-size", "7"], "hidden_size must be even"),
        (["train", "copy", "--lengths", "5", "2"], "lengths must be (min, max)"),
        (["train", "copy", "--beam-width", "0"], "--beam-width must be >= 1"),
        (["train", "copy", "--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
        (["train", "translate", "--data", "."], ".: a folder, expected a tab-separated text file"),
        # The three below were tracebacks, or named an internal argument (query_dim).
        (["train", "copy", "--attention", "local-p", "--window", "0"], "--window must be >= 1 with --attention local-p"),
        (["train", "reverse", "--symbols", "10", "--lengths", "3", "3", "--test-size", "20000", "--train-size", "100"],
         "not held out: lower --test-size, or raise --symbols or --lengths"),
        (["train", "captions", "--train-size", "8", "--test-size", "2", "--hidden-dim", "0"], "hidden_dim must be in [1,"),
        (["eval", "missing.pt"], "missing.pt: no such checkpoint file"),
    ],
)
def test_bad_values_give_one_line(tmp_path, capsys, arguments, message):
    line = one_error_line(capsys, main([*arguments, "--out", str(tmp_path)]))
    assert line.startswith("fastattn: error: ") and message in line


def test_eval_of_a_missing_checkpoint_makes_no_output_folder(tmp_path, capsys):
    out = tmp_path / "report"
    line = one_error_line(capsys, main(["eval", str(tmp_path / "missing.pt"), "--out", str(out)]))
    assert "missing.pt: no such checkpoint file" in line and not out.exists()


def a_json_report(path):
    path.write_text(json.dumps({"bleu": 12.5}), encoding="utf-8")


def a_pickled_object(path):
    import torch

    torch.save(argparse.Namespace(lr=0.1), path)  # weights_only loading refuses the class


@pytest.mark.parametrize("name, save", [("metrics.json", a_json_report), ("args.pt", a_pickled_object)])
def test_eval_of_a_file_that_is_no_checkpoint_gives_one_line(tmp_path, capsys, name, save):
    """torch.load's weights_only refusal runs over a dozen lines; the CLI names the file and what it expected."""
    path = tmp_path / name
    save(path)
    out = tmp_path / "report"
    line = one_error_line(capsys, main(["eval", str(path), "--out", str(out)]))
    assert line.startswith(f"fastattn: error: {path}: not a readable checkpoint (")
    assert line.endswith("; expected a checkpoint.pt written by fastattn train)") and not out.exists()


@pytest.mark.parametrize("arguments, message", [
    (["train", "reverse", "--beam-width", "0"], "--beam-width must be >= 1"),
    (["train", "translate"], "needs --data FILE.tsv"),
    (["train", "reverse", *TINY_COPY, "--resume"], "checkpoint.pt: no such checkpoint file"),
])
@pytest.mark.parametrize("out", [["--out", "report"], []], ids=["out", "default-out"])
def test_a_failed_train_makes_no_output_folder(tmp_path, capsys, monkeypatch, arguments, message, out):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, main([*arguments, *out]))
    assert message in line and list(tmp_path.iterdir()) == []


def test_plot_attention_of_a_model_without_attention_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "autoencoder", "--hidden", "4", "--epochs", "1", "--quiet", "--out", str(run)]) == 0
    figure, out = tmp_path / "attention.png", tmp_path / "report"
    line = one_error_line(capsys, main(["eval", str(run / "checkpoint.pt"), "--out", str(out),
                                        "--plot-attention", str(figure)]))
    assert line == "fastattn: error: --plot-attention: this autoencoder model draws no attention figure"
    assert not figure.exists() and not out.exists()


@pytest.mark.parametrize("task, flags", [
    ("reverse", TINY_COPY),
    ("captions", ["--train-size", "64", "--test-size", "20"]),
    ("autoencoder", []),
    ("lstmn", ["--pairs", "2", "--keys", "3", "--hidden", "16", "--train-size", "200"]),
])
def test_every_task_trains_under_amp(tmp_path, task, flags):
    """--amp bfloat16: each model's training forward under torch.autocast, a finite loss."""
    out = tmp_path / task
    assert main(["train", task, *flags, "--epochs", "1", "--amp", "bfloat16", "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] > 0 and math.isfinite(metrics["loss_train"])


@pytest.mark.parametrize("flag", ["--valid-fraction", "--test-fraction"])
@pytest.mark.parametrize("value", ["0.6", "0"])
def test_translate_split_fractions_out_of_range_are_one_line_errors(tmp_path, capsys, flag, value):
    line = one_error_line(capsys, main(["train", "translate", "--data", str(corpus(tmp_path)), flag, value,
                                        "--out", str(tmp_path / "run")]))
    assert f"{flag} must lie in (0, 0.5), got {float(value)}" in line


def test_an_out_that_cannot_be_a_folder_fails_before_training(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "text.pt"
    a_file.write_text("not a folder")
    monkeypatch.setattr("fastattn.zoo.trainer._TrainingRun.epochs", lambda run: pytest.fail("it trained"))
    line = one_error_line(capsys, main(["train", "reverse", *TINY_COPY, "--out", str(a_file)]))
    assert line.startswith(f"fastattn: error: --out {a_file}: cannot make the folder")


@pytest.mark.parametrize("task, flags", [
    ("reverse", ["--seed", "-1"]),
    ("reverse", ["--seed", str(2**62)]),
    ("autoencoder", ["--seed", "-1"]),
    ("autoencoder", ["--seed", str(2**31)]),
])
def test_a_seed_out_of_range_is_a_one_line_error(tmp_path, capsys, task, flags):
    """numpy's generators refuse negative seeds and torch's overflow past 2**64 (the trainer
    multiplies the seed); the digit splits take [0, 2**31 - 1]: all were tracebacks."""
    line = one_error_line(capsys, main(["train", task, *flags, "--out", str(tmp_path / "run")]))
    assert line == f"fastattn: error: --seed must be in [0, {2**31 - 1}], got {flags[1]}"


@pytest.mark.parametrize("task, flag", [
    ("autoencoder", ["--model", "denoising", "--noise", "inf"]),
    ("autoencoder", ["--noise", "inf"]),
    ("captions", ["--doubly-stochastic", "nan"]),
    ("captions", ["--entropy-weight", "inf"]),
])
def test_loss_and_noise_weights_must_be_finite(tmp_path, capsys, task, flag):
    """--noise inf was a traceback (denoising) or a null noisy_input_mse; a NaN or infinite
    loss weight blamed --lr ("the training loss became nan at step 1")."""
    line = one_error_line(capsys, main(["train", task, *flag, "--out", str(tmp_path / "run")]))
    assert line == f"fastattn: error: {flag[-2]} must be a finite number >= 0, got {float(flag[-1])}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("task, flags", [
    ("copy", [*TINY_COPY, "--attention", "none"]),
    ("lstmn", ["--model", "lstm", "--pairs", "2", "--keys", "3", "--hidden", "8", "--train-size", "64"]),
])
def test_plot_attention_of_a_zoo_model_without_attention_is_refused_before_any_work(tmp_path, capsys, task, flags):
    run = tmp_path / "run"
    assert main(["train", task, *flags, "--epochs", "1", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    figure, out = tmp_path / "attention.png", tmp_path / "report"
    line = one_error_line(capsys, main(["eval", str(run / "checkpoint.pt"), "--out", str(out),
                                        "--plot-attention", str(figure)]))
    assert line == f"fastattn: error: --plot-attention: this {task} model draws no attention figure"
    assert not figure.exists() and not out.exists()


def test_a_plot_attention_path_that_cannot_be_written_fails_before_evaluating(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "reverse", *TINY_COPY, "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    monkeypatch.setattr("fastattn.zoo.trainer.evaluate_and_report", lambda *a, **k: pytest.fail("it evaluated"))
    for figure, message in [(a_file / "attention.png", f"--plot-attention {a_file}: cannot make the folder"),
                            (tmp_path, f"--plot-attention {tmp_path}: a folder, expected the path of a PNG file")]:
        line = one_error_line(capsys, main(["eval", str(run / "checkpoint.pt"), "--out", str(tmp_path / "report"),
                                            "--plot-attention", str(figure)]))
        assert line.startswith(f"fastattn: error: {message}")


@pytest.mark.parametrize("beam", [[], ["--beam-width", "3"]], ids=["greedy", "beam"])
def test_eval_hypotheses_do_not_depend_on_the_batch_size(tmp_path, beam):
    """Decoding stopped at round(1.5 S) + 5 with S the batch's padded source length, so an
    example that never emits the end token got a longer hypothesis in a batch with a longer
    source (and BLEU changed with --batch-size); each example now stops at its own limit."""
    run = tmp_path / "run"
    assert main(["train", "reverse", *TINY_COPY, *beam, "--epochs", "1", "--out", str(run)]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["model"]["output.bias"][EOS] = -1e4  # no hypothesis ends: each runs to its limit
    torch.save(state, run / "checkpoint.pt")
    hypotheses = {}
    for size in ("1", "24"):
        assert main(["eval", str(run / "checkpoint.pt"), "--batch-size", size, "--out", str(tmp_path / size)]) == 0
        hypotheses[size] = (tmp_path / size / "hypotheses.txt").read_text().splitlines()
    sources = [len(line.split()) for line in hypotheses["1"]]
    assert hypotheses["1"] == hypotheses["24"] and len(set(sources)) > 1


def test_translate_bleu_counts_an_unknown_word_as_one_wrong_token():
    """sacrebleu's 13a tokenizer split a hypothesis's "<unk>" into "<", "unk", ">": three
    wrong tokens, which scored 51.7 where any other wrong word scores 76.0."""
    task = argparse.Namespace(dropped=0, target_vocabulary=Vocabulary.build([["a"]]))
    examples = [Example(["x"], "a b c d e f".split())]

    def bleu(hypothesis):
        return TranslateTask.extra_metrics(task, examples, [hypothesis.split()], [False])["bleu"]

    assert bleu("a b c d e <unk>") == pytest.approx(bleu("a b c d e q")) == pytest.approx(100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25)


def test_the_cosine_schedule_runs_the_first_epoch_at_lr_then_follows_the_cosine_over_the_epochs(tmp_path, monkeypatch):
    """What --lr-schedule's help and the README say: the epochs' steps count once the first
    epoch has given their length; without a time budget, that first epoch runs at --lr."""
    rates = []
    original = trainer._TrainingRun._step

    def recorded_step(run, batch, budget_used):
        original(run, batch, budget_used)
        rates.append(run.optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(trainer._TrainingRun, "_step", recorded_step)
    assert main(["train", "reverse", *TINY_COPY, "--epochs", "3", "--lr", "0.01", "--out", str(tmp_path / "run")]) == 0
    per_epoch = len(rates) // 3
    assert per_epoch > 1 and len(rates) == 3 * per_epoch
    assert rates[:per_epoch] == [0.01] * per_epoch
    final = trainer.FINAL_LEARNING_RATE
    expected = [
        0.01 * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / (3 * per_epoch))))
        for step in range(per_epoch, 3 * per_epoch)
    ]
    assert rates[per_epoch:] == pytest.approx(expected, rel=1e-12)
