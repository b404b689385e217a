"""The bottleneck (Bahdanau 2015, Fig. 2): without attention, quality falls as sources grow.

Trains the same encoder-decoder twice on ``copy`` with sources of 1-60 symbols, once with
``--attention none`` (the final encoder state is the only summary of the source) and once
with ``--attention additive`` (Bahdanau), on the same examples for the same number of
steps (``--epochs`` over ``--train-size`` examples, not a time budget, so that the load of
a shared machine cannot favour either), as two ``fastattn train`` processes side by side.
Then it buckets each model's greedy test hypotheses by source length and plots exact
match and BLEU (sacrebleu, on the symbol strings) per bucket.

    python benchmarks/experiments/bottleneck.py [--epochs N] [--train-size N] [--out DIR]

Writes DIR/bottleneck.json, DIR/bottleneck.png and each run's folder (metrics.json,
hypotheses.txt; the checkpoints are deleted, they are large and easy to remake).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import sacrebleu
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fastattn.data import synthetic
from fastattn.zoo import checkpoint

ATTENTIONS = ("none", "additive")
BUCKET = 10  # source lengths 1-10, 11-20, ...
LONGEST = 60


def train_side_by_side(epochs: int, train_size: int, out: Path) -> None:
    """One ``fastattn train copy`` process per attention, at the same time."""
    processes = {
        attention: subprocess.Popen([
            sys.executable, "-m", "fastattn", "train", "copy", "--attention", attention,
            "--lengths", "1", str(LONGEST), "--train-size", str(train_size), "--test-size", "1200",
            "--epochs", str(epochs), "--quiet", "--out", str(out / f"copy-{attention}"),
        ])
        for attention in ATTENTIONS
    }
    for attention, process in processes.items():
        if process.wait() != 0:
            raise SystemExit(f"fastattn train copy --attention {attention} failed with status {process.returncode}")


def scores_by_length(run: Path) -> list[dict]:
    """Exact match and BLEU of the run's test hypotheses, per source-length bucket."""
    saved = checkpoint.load(run / checkpoint.FILE_NAME)
    test = synthetic.generate(synthetic.SyntheticConfig.from_dict(saved["task_state"]["data_config"]))["test"]
    hypotheses = (run / "hypotheses.txt").read_text().splitlines()
    rows = []
    for first in range(1, LONGEST + 1, BUCKET):
        last = first + BUCKET - 1
        chosen = [(h, " ".join(target)) for h, (source, target) in zip(hypotheses, test) if first <= len(source) <= last]
        rows.append({
            "lengths": f"{first}-{last}",
            "examples": len(chosen),
            "exact_match": sum(h == r for h, r in chosen) / len(chosen),
            "bleu": sacrebleu.corpus_bleu([h for h, _ in chosen], [[r for _, r in chosen]]).score,
        })
    return rows


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(figure)
    for column, (metric, label) in enumerate((("exact_match", "exact match"), ("bleu", "BLEU"))):
        axes = figure.add_subplot(1, 2, column + 1)
        for attention, style in zip(ATTENTIONS, ("o--", "s-")):
            rows = results[attention]["by_length"]
            axes.plot([row["lengths"] for row in rows], [row[metric] for row in rows], style, label=f"attention {attention}")
        axes.set_xlabel("source length (symbols)")
        axes.set_ylabel(label)
        axes.set_ylim(0, 1.02 if metric == "exact_match" else 102)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("copy, same model size, examples and steps: the fixed-size summary is a bottleneck")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="default 2")
    parser.add_argument("--train-size", type=int, default=50_000, help="training examples (default 50000)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bottleneck")
    args = parser.parse_args()
    train_side_by_side(args.epochs, args.train_size, args.out)
    results = {}
    for attention in ATTENTIONS:
        run = args.out / f"copy-{attention}"
        metrics = json.loads((run / "metrics.json").read_text())
        results[attention] = {
            "exact_match": metrics["exact_match"], "steps": metrics["steps"], "train_seconds": metrics["train_seconds"],
            "by_length": scores_by_length(run),
        }
        (run / checkpoint.FILE_NAME).unlink()
    settings = {"epochs": args.epochs, "train_size": args.train_size}
    (args.out / "bottleneck.json").write_text(json.dumps({**settings, **results}, indent=2) + "\n")
    plot(results, args.out / "bottleneck.png")
    for attention in ATTENTIONS:
        cells = ", ".join(f"{row['lengths']}: {row['exact_match']:.2f}" for row in results[attention]["by_length"])
        print(f"attention {attention}: exact match by source length {cells}")


if __name__ == "__main__":
    main()
