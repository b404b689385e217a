"""The captioning data of Show-Attend-Tell in miniature: canvases holding 1 to ``max_digits``
of sklearn's 8x8 digits side by side, captioned with the digits' names left to right
("three one four").

Digits never overlap: each canvas splits its free width at random into gaps between
them, and each digit gets its own random row, so the left-to-right order is the order
of the boxes.  The boxes (top, left, bottom, right; bottom and right exclusive) are
kept, so a model's attention can be checked against where each named digit lies.
Each split composes its canvases from its own split of the digit images
(:func:`fastattn.data.digits.load_digits_splits`), so test canvases show handwriting
the model has never seen.  Everything is drawn from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn import checks
from fastattn.data.digits import Digits, load_digits_splits

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_SIZE = 8
DEFAULT_SIZES = {"train": 20000, "valid": 500, "test": 1000}


@dataclass
class CaptionedImages:
    images: torch.Tensor  # (N, height, width) float32 in [0, 1]
    digits: torch.Tensor  # (N, max_digits) int64 labels left to right, -1 after the last
    boxes: torch.Tensor  # (N, max_digits, 4) int64 (top, left, bottom, right), -1 after the last
    counts: torch.Tensor  # (N,) int64, digits on each canvas

    def __len__(self) -> int:
        return len(self.counts)

    def caption(self, index: int) -> str:
        """The reference caption of canvas ``index``: the digits' names, left to right."""
        return " ".join(WORDS[label] for label in self.digits[index, : self.counts[index]].tolist())

    def captions(self) -> list[str]:
        return [self.caption(index) for index in range(len(self))]


def compose_canvases(
    digits: Digits,
    count: int,
    generator: torch.Generator,
    *,
    height: int = 16,
    width: int = 40,
    max_digits: int = 3,
) -> CaptionedImages:
    """``count`` canvases of ``height`` x ``width`` pixels, each holding 1..``max_digits``
    digit images drawn from ``digits`` at non-overlapping places."""
    checks.positive_int("count", count, minimum=0)
    checks.positive_int("max_digits", max_digits)
    checks.positive_int("height", height, minimum=DIGIT_SIZE)
    if checks.positive_int("width", width) < DIGIT_SIZE * max_digits:
        raise ValueError(f"width must be at least {DIGIT_SIZE} * max_digits = {DIGIT_SIZE * max_digits}, got {width}")
    if len(digits.labels) == 0:
        raise ValueError("digits must hold at least one image to compose canvases from")
    images = torch.zeros(count, height, width)
    labels = torch.full((count, max_digits), -1, dtype=torch.int64)
    boxes = torch.full((count, max_digits, 4), -1, dtype=torch.int64)
    counts = torch.randint(1, max_digits + 1, (count,), generator=generator)
    for canvas in range(count):
        placed = int(counts[canvas])
        free = width - DIGIT_SIZE * placed
        # Sorted cut points in [0, free] split the free width into placed + 1 gaps.
        cuts = torch.randint(0, free + 1, (placed,), generator=generator).sort().values
        lefts = cuts + DIGIT_SIZE * torch.arange(placed)
        tops = torch.randint(0, height - DIGIT_SIZE + 1, (placed,), generator=generator)
        chosen = torch.randint(0, len(digits.labels), (placed,), generator=generator)
        for slot, (top, left, image) in enumerate(zip(tops.tolist(), lefts.tolist(), chosen.tolist())):
            images[canvas, top : top + DIGIT_SIZE, left : left + DIGIT_SIZE] = digits.images[image]
            labels[canvas, slot] = digits.labels[image]
            boxes[canvas, slot] = torch.tensor([top, left, top + DIGIT_SIZE, left + DIGIT_SIZE])
    return CaptionedImages(images, labels, boxes, counts)


def load_caption_splits(
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    *,
    height: int = 16,
    width: int = 40,
    max_digits: int = 3,
) -> dict[str, CaptionedImages]:
    """-> {"train", "valid", "test"}: canvases of ``sizes[split]`` (default
    ``DEFAULT_SIZES``), each split composed from its own split of the digit images
    with its own generator, so one split's size does not change another's canvases."""
    unknown = set(sizes or {}) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"sizes must name splits among {tuple(DEFAULT_SIZES)}, got {sorted(unknown)}")
    sizes = dict(DEFAULT_SIZES, **(sizes or {}))
    checks.positive_int("seed", seed, minimum=0)
    pools = load_digits_splits(seed)
    return {
        split: compose_canvases(
            pools[split], sizes[split], torch.Generator().manual_seed(seed * len(pools) + index),
            height=height, width=width, max_digits=max_digits,
        )
        for index, split in enumerate(pools)
    }
