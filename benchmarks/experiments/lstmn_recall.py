"""Experiment: LSTMN vs a plain LSTM of the same hidden size on associative recall
(issue 7, LSTMN; Cheng et al. 2016).

Sequences of key-value pairs, then "? key"; the answer is that key's value
(:mod:`fastattn.data.recall`).  An LSTMN with the paper's additive intra-attention, one with
a bilinear ("general") score, one whose tape also holds the token after each state
(``--read-next-token``, not in the paper), and an LSTM read the same sequences with the same hidden
size, optimiser, schedule and number of epochs through the zoo's trainer
(``fastattn train lstmn --model lstmn|lstm``); the test accuracy of each is reported with
the training time, and the better LSTMN's intra-attention is plotted: at the question's key it
should read the tape where that key was written.

    python benchmarks/experiments/lstmn_recall.py [--pairs 8] [--epochs 3]

Writes lstmn_recall.json and lstmn_recall.png beside this file (lstmn_recall_4pairs.* are the
same files from ``--pairs 4 --epochs 8 --out DIR``, renamed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from matplotlib.figure import Figure

from fastattn.data.recall import render
from fastattn.zoo.checkpoint import load
from fastattn.zoo.cli import task_parser
from fastattn.zoo.lstmn_task import LSTMNTask
from fastattn.zoo.trainer import train

HERE = Path(__file__).resolve().parent


MODELS = {  # name -> flags of `fastattn train lstmn`
    "lstmn (additive, the paper's)": ["--model", "lstmn", "--score", "additive"],
    "lstmn (general)": ["--model", "lstmn", "--score", "general"],
    "lstmn (general, reads next token)": ["--model", "lstmn", "--score", "general", "--read-next-token"],
    "lstm": ["--model", "lstm"],
}


def train_model(out: Path, flags: list[str]) -> tuple[LSTMNTask, dict]:
    args = task_parser("lstmn", argparse.ArgumentParser).parse_args([*flags, "--out", str(out), "--quiet"])
    args.task = "lstmn"
    metrics = train(args)
    saved = load(out / "checkpoint.pt")
    task = LSTMNTask(argparse.Namespace(data=None, train_size=1), torch.device("cpu"), saved["task_state"])
    task.model.load_state_dict(saved["model"])
    task.model.eval()
    return task, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE)
    options = parser.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="lstmn_recall_"))
    common = ["--pairs", str(options.pairs), "--hidden", str(options.hidden), "--epochs", str(options.epochs)]
    results = {"pairs": options.pairs, "hidden": options.hidden, "epochs": options.epochs, "chance": 0.1, "models": {}}
    attention = {}
    for index, (name, flags) in enumerate(MODELS.items()):
        task, metrics = train_model(runs / str(index), [*flags, *common])
        entry = {
            "test_accuracy": metrics["accuracy"],
            "parameters": sum(parameter.numel() for parameter in task.model.parameters()),
            "steps": metrics["steps"],
            "train_seconds": round(metrics["train_seconds"], 1),
        }
        if task.settings["model"] == "lstmn":
            with torch.no_grad():
                _, weights = task.model(task.data["test"].tokens)
            attention[name] = weights
            entry["last_step_attention_peak_at"] = retrieval_peaks(weights, task.data["test"].tokens, options.pairs)
        results["models"][name] = entry
        print(name, json.dumps(entry), flush=True)
    (options.out / "lstmn_recall.json").write_text(json.dumps(results, indent=2) + "\n")
    best = max(attention, key=lambda name: results["models"][name]["test_accuracy"])
    words = render(task.data["test"].tokens[0], task.settings["keys"]).split()
    plot(results, best, attention[best][0], words, options.out / "lstmn_recall.png")
    print(json.dumps(results, indent=2))


def retrieval_peaks(weights: torch.Tensor, tokens: torch.Tensor, pairs: int) -> dict[str, float]:
    """Where the last step (reading the queried key) puts its attention peak: the tape
    column holding the state written after the matching key, or after its value.  With
    --read-next-token the key's column is the one that also holds its value's token."""
    peak = weights[:, -1].argmax(-1)
    key_positions = (tokens[:, : 2 * pairs : 2] == tokens[:, -1:]).float().argmax(-1) * 2
    columns = {"the queried key": key_positions + 1, "the value after it": key_positions + 2}
    return {name: float((peak == column).double().mean()) for name, column in columns.items()}


def plot(results: dict, best: str, weights: torch.Tensor, words: list[str], path: Path) -> None:
    figure = Figure(figsize=(12, 4.6), layout="constrained")
    bars, heatmap = figure.subplots(1, 2, width_ratios=[1, 1.6])
    names = list(results["models"])
    bars.bar(range(len(names)), [results["models"][name]["test_accuracy"] for name in names],
             color=["tab:blue", "tab:cyan", "tab:green", "tab:gray"][: len(names)])
    bars.set_xticks(range(len(names)), [name.replace(" (", "\n(") for name in names], fontsize=8)
    bars.axhline(results["chance"], color="tab:red", linestyle="--", label="chance")
    bars.set_ylim(0, 1)
    bars.set_ylabel("test accuracy")
    bars.set_title(f"associative recall, {results['pairs']} pairs, hidden {results['hidden']}", fontsize=9)
    bars.legend(fontsize=8)
    heatmap.imshow(weights.numpy(), cmap="viridis", vmin=0, vmax=1)
    heatmap.set_yticks(range(len(words)), words, fontsize=8)
    heatmap.set_xticks(range(len(words) + 1), ["(0)", *words], fontsize=8)
    heatmap.set_xlabel("tape: state written after token")
    heatmap.set_ylabel("step reading the tape")
    heatmap.set_title(f"{best}: intra-attention, one test sequence", fontsize=9)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
