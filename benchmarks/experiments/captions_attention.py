"""Experiment: does Show-Attend-Tell look at the digit it names? (issue 7, claim 2, captions)

For every digit word of the test captions, the peak of the soft attention at that word
(teacher forcing on the reference caption) must fall inside that digit's box for >= 80%
of words.  Also reported: the same share using the greedy decoder's own attention, over
the words it got right, and the share by word position.  Chance level: the share of
non-blank grid cells whose centre lies in the box.

    python benchmarks/experiments/captions_attention.py --checkpoint runs/captions/checkpoint.pt
    python benchmarks/experiments/captions_attention.py             # trains one first (fastattn train captions)

Writes captions_attention.json and captions_attention.png beside this file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from fastattn.data.vocabulary import Vocabulary
from fastattn.zoo.captions_task import CaptionsTask, attention_in_box, plot_caption_attention
from fastattn.zoo.checkpoint import load
from fastattn.zoo.cli import task_parser
from fastattn.zoo.trainer import train

HERE = Path(__file__).resolve().parent
SHOWN = 6
TARGET = 0.80


def trained_checkpoint(path: Path | None) -> Path:
    if path is not None:
        return path
    out = Path(tempfile.mkdtemp(prefix="captions_attention_"))
    args = task_parser("captions", argparse.ArgumentParser).parse_args(["--out", str(out), "--quiet"])
    args.task = "captions"
    train(args)
    return out / "checkpoint.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="of `fastattn train captions` (default: train one now)")
    parser.add_argument("--out", type=Path, default=HERE)
    options = parser.parse_args()
    checkpoint_path = trained_checkpoint(options.checkpoint)
    saved = load(checkpoint_path)
    task = CaptionsTask(argparse.Namespace(data=None), torch.device("cpu"), saved["task_state"])
    task.model.load_state_dict(saved["model"])
    model = task.model.eval()
    data, tensors = task.data["test"], task.tensors["test"]
    steps = task.settings["max_digits"] + 1
    with torch.no_grad():
        forced = model(tensors["images"], tensors["inputs"]).weights.flatten(2).argmax(-1)
        words, greedy_weights = model.greedy(tensors["images"], Vocabulary.bos_id, steps)
        metrics, hypotheses = task.evaluate(model, "test")
    slots = data.boxes.shape[1]
    correct_word = (words[:, :slots] == tensors["targets"][:, :slots]) & (tensors["targets"][:, :slots] > Vocabulary.eos_id)
    by_position = {}
    for position in range(slots):
        has_word = data.counts > position
        inside = _inside(forced[has_word, position], data.boxes[has_word, position], data.images.shape[1:], model.grid_size)
        by_position[f"word {position + 1}"] = float(inside.double().mean())
    greedy_peaks = greedy_weights.flatten(2).argmax(-1)
    results = {
        "checkpoint": str(checkpoint_path),
        "test_captions": len(data),
        "digit_words": int(data.counts.sum()),
        "exact_match": metrics["exact_match"],
        "bleu": metrics["bleu"],
        "peak_in_box_teacher_forced": attention_in_box(forced, data, model.grid_size),
        "peak_in_box_greedy_correct_words": _share_greedy(greedy_peaks, correct_word, data, model.grid_size),
        "peak_in_box_by_position": by_position,
        "chance_non_blank_cell_in_box": _chance(model, data),
        "target": TARGET,
    }
    results["met"] = results["peak_in_box_teacher_forced"] >= TARGET
    (options.out / "captions_attention.json").write_text(json.dumps(results, indent=2) + "\n")
    captions = [Vocabulary(task.vocabulary.tokens).decode(row) for row in words[:SHOWN].tolist()]
    plot_caption_attention(data.images[:SHOWN], captions, greedy_weights[:SHOWN], data.boxes[:SHOWN],
                           options.out / "captions_attention.png")
    print(json.dumps(results, indent=2))


def _inside(peaks: torch.Tensor, boxes: torch.Tensor, image_size, grid_size) -> torch.Tensor:
    """Whether each flat grid index in ``peaks`` (...) has its cell centre inside ``boxes`` (..., 4)."""
    (height, width), (grid_height, grid_width) = image_size, grid_size
    y = ((peaks // grid_width).double() + 0.5) * height / grid_height
    x = ((peaks % grid_width).double() + 0.5) * width / grid_width
    top, left, bottom, right = boxes.double().unbind(-1)
    return (top <= y) & (y < bottom) & (left <= x) & (x < right)


def _share_greedy(peaks, correct_word, data, grid_size) -> float:
    slots = data.boxes.shape[1]
    inside = _inside(peaks[:, :slots], data.boxes, data.images.shape[1:], grid_size)
    return float(inside[correct_word].double().mean())


def _chance(model, data) -> float:
    """Expected share for a peak drawn uniformly from the canvas's non-blank cells."""
    blank = model.blank_cells(data.images).flatten(1)
    cells = torch.arange(blank.shape[1])
    shares = []
    for canvas in range(len(data)):
        open_cells = cells[~blank[canvas]]
        for slot in range(int(data.counts[canvas])):
            box = data.boxes[canvas, slot].expand(len(open_cells), 4)
            shares.append(_inside(open_cells, box, data.images.shape[1:], model.grid_size).double().mean())
    return float(torch.stack(shares).mean())


if __name__ == "__main__":
    main()
