"""scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), split by a seed.

Pixel values are scaled from 0..16 to [0, 1].  The split is a seeded permutation of the
images into train / valid / test, so the same seed always gives the same three sets and
no image is in two of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn import checks

SPLIT_FRACTIONS = {"train": 0.7, "valid": 0.15, "test": 0.15}


@dataclass
class Digits:
    images: torch.Tensor  # (N, 8, 8) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64, 0..9


def load_digits_splits(seed: int = 0) -> dict[str, Digits]:
    """-> {"train", "valid", "test"}: disjoint seeded subsets of sklearn's digits."""
    from sklearn.datasets import load_digits

    checks.positive_int("seed", seed, minimum=0)
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    splits, start = {}, 0
    for index, (name, fraction) in enumerate(SPLIT_FRACTIONS.items()):
        last = index == len(SPLIT_FRACTIONS) - 1
        stop = len(labels) if last else start + round(fraction * len(labels))
        chosen = order[start:stop]
        splits[name] = Digits(images[chosen], labels[chosen])
        start = stop
    return splits
