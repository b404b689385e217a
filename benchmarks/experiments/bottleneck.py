"""The bottleneck (Bahdanau 2015, Fig. 2): without attention, quality falls as sources grow.

Trains the same encoder-decoder twice on ``copy`` with sources of 1-60 symbols, once with
``--attention none`` (the final encoder state is the only summary of the source) and once
with ``--attention additive`` (Bahdanau), each for the same time budget, through the
``fastattn train`` command line.  Then it buckets each model's greedy test hypotheses by
source length and plots exact match and BLEU (sacrebleu, on the symbol strings) per bucket.

    python benchmarks/experiments/bottleneck.py [--budget SECONDS] [--out DIR]

Writes DIR/bottleneck.json, DIR/bottleneck.png and each run's folder (metrics.json,
hypotheses.txt; the checkpoints are deleted, they are large and easy to remake).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sacrebleu
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fastattn.cli import main as fastattn_main
from fastattn.data import synthetic
from fastattn.zoo import checkpoint

ATTENTIONS = ("none", "additive")
BUCKET = 10  # source lengths 1-10, 11-20, ...
LONGEST = 60


def train(attention: str, budget: float, out: Path) -> None:
    status = fastattn_main([
        "train", "copy", "--attention", attention, "--lengths", "1", str(LONGEST), "--test-size", "1200",
        "--time-budget", str(budget), "--epochs", "100", "--quiet", "--out", str(out),
    ])
    if status != 0:
        raise SystemExit(f"fastattn train copy --attention {attention} failed with status {status}")


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
    figure.suptitle("copy, same model size and training time: the fixed-size summary is a bottleneck")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=360.0, help="training seconds per model (default 360)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bottleneck")
    args = parser.parse_args()
    results = {}
    for attention in ATTENTIONS:
        run = args.out / f"copy-{attention}"
        train(attention, args.budget, run)
        metrics = json.loads((run / "metrics.json").read_text())
        results[attention] = {
            "exact_match": metrics["exact_match"], "steps": metrics["steps"], "train_seconds": metrics["train_seconds"],
            "by_length": scores_by_length(run),
        }
        (run / checkpoint.FILE_NAME).unlink()
    (args.out / "bottleneck.json").write_text(json.dumps({"budget_seconds": args.budget, **results}, indent=2) + "\n")
    plot(results, args.out / "bottleneck.png")
    for attention in ATTENTIONS:
        cells = ", ".join(f"{row['lengths']}: {row['exact_match']:.2f}" for row in results[attention]["by_length"])
        print(f"attention {attention}: exact match by source length {cells}")


if __name__ == "__main__":
    main()
