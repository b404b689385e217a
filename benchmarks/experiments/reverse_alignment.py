"""Explainability (Bahdanau 2015, Fig. 3): on ``reverse``, attention finds the mirrored source token.

For every target token t of every test sequence of length L, the argmax of the greedy
decoder's attention weights should be the source position L - 1 - t (the token being
copied).  The script trains ``fastattn train reverse --attention additive`` for
``--budget`` seconds (the README's headline command), or reads ``--checkpoint``, and reports
the fraction of target tokens whose attention peak is the mirrored position, overall and
per source length, with alignment heatmaps of a short and a long test sequence.

    python benchmarks/experiments/reverse_alignment.py [--checkpoint FILE | --budget SECONDS] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from fastattn.cli import main as fastattn_main
from fastattn.zoo import checkpoint, plots
from fastattn.zoo.trainer import load_task


def mirrored_peaks(task) -> tuple[dict[int, list[int]], list]:
    """-> ({source length: [target tokens, of them peaked on the mirrored position]}, per-example records)."""
    counts = defaultdict(lambda: [0, 0])
    records = []
    for batch in task.batches("test", 200, torch.Generator()):
        hypotheses, decoded = task.decode(task.model, batch)
        for row, index in enumerate(batch.indices):
            length = int(batch.source_lengths[row])
            peaks = decoded.weights[row, :length].argmax(dim=-1)  # steps beyond the hypothesis still attend
            hits = int((peaks == torch.arange(length - 1, -1, -1)).sum())
            counts[length][0] += length
            counts[length][1] += hits
            records.append((index, length, hypotheses[row], decoded.weights[row]))
    return dict(sorted(counts.items())), records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a reverse checkpoint (default: train one)")
    parser.add_argument("--budget", type=float, default=420.0, help="training seconds when training (default 420)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reverse_alignment")
    args = parser.parse_args()
    trained_here = args.checkpoint is None
    if trained_here:
        run = args.out / "reverse-additive"
        if fastattn_main(["train", "reverse", "--attention", "additive", "--time-budget", str(args.budget),
                          "--quiet", "--out", str(run)]) != 0:
            raise SystemExit("training failed")
        args.checkpoint = run / checkpoint.FILE_NAME
    task = load_task(args.checkpoint)
    if task.name != "reverse" or task.config.attention == "none":
        raise SystemExit(f"{args.checkpoint}: needs a reverse model with attention")
    with torch.no_grad():
        counts, records = mirrored_peaks(task)
    tokens, hits = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    result = {
        "checkpoint": str(args.checkpoint), "attention": task.config.attention, "target_tokens": tokens,
        "peak_on_mirrored_position": hits / tokens,
        "by_source_length": {length: hit / total for length, (total, hit) in counts.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reverse_alignment.json").write_text(json.dumps(result, indent=2) + "\n")
    examples = task.examples["test"]
    for name, wanted in (("short", 8), ("long", max(counts))):
        index, length, hypothesis, weights = next(r for r in records if r[1] == wanted)
        steps = min(len(hypothesis) + 1, weights.shape[0])
        plots.alignment_heatmap(
            weights[:steps, :length], examples[index].source, [*hypothesis, "</s>"][:steps],
            args.out / f"alignment-{name}.png", f"reverse, additive attention: test sequence of {length} symbols",
        )
    if trained_here:
        args.checkpoint.unlink()
    print(f"attention peak on the mirrored source position for {hits} of {tokens} target tokens ({hits / tokens:.1%})")


if __name__ == "__main__":
    main()
