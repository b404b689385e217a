"""Associative recall, generated from a seed: a task where reading back helps.

A sequence lists ``pairs`` key-value pairs (distinct keys drawn from ``keys`` letters,
values from the digits 0-9), then the marker ``?`` and one of the keys; the answer is
the value that followed that key.  "c 7 a 2 f 9 ? a" -> 2.  A model must keep every pair
until the question comes: an LSTM squeezes them into one state vector, a model that can
attend back over its earlier states only has to find the key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn import checks

VALUES = tuple(str(digit) for digit in range(10))
QUERY = "?"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DEFAULT_SIZES = {"train": 40000, "valid": 1000, "test": 1000}


@dataclass
class RecallData:
    tokens: torch.Tensor  # (N, 2 * pairs + 2) int64 ids into ``vocabulary(keys)``
    answers: torch.Tensor  # (N,) int64, the value (0..9) that followed the queried key


def vocabulary(keys: int) -> list[str]:
    """Token ids: the ``keys`` letters, then the ten values, then ``?``."""
    return [*LETTERS[:keys], *VALUES, QUERY]


def generate_recall(count: int, generator: torch.Generator, *, pairs: int = 8, keys: int = 16) -> RecallData:
    checks.positive_int("count", count, minimum=0)
    checks.positive_int("pairs", pairs)
    if not pairs <= checks.positive_int("keys", keys) <= len(LETTERS):
        raise ValueError(f"keys must be in [pairs={pairs}, {len(LETTERS)}] (the keys of a sequence are distinct), got {keys}")
    chosen_keys = torch.rand(count, keys, generator=generator).argsort(-1)[:, :pairs]
    values = torch.randint(0, len(VALUES), (count, pairs), generator=generator)
    asked = torch.randint(0, pairs, (count,), generator=generator)
    rows = torch.arange(count)
    tokens = torch.empty(count, 2 * pairs + 2, dtype=torch.int64)
    tokens[:, 0 : 2 * pairs : 2] = chosen_keys
    tokens[:, 1 : 2 * pairs : 2] = keys + values
    tokens[:, -2] = keys + len(VALUES)
    tokens[:, -1] = chosen_keys[rows, asked]
    return RecallData(tokens, values[rows, asked])


def load_recall_splits(
    seed: int = 0, sizes: dict[str, int] | None = None, *, pairs: int = 8, keys: int = 16
) -> dict[str, RecallData]:
    """-> {"train", "valid", "test"}, each from its own generator seeded by ``seed``."""
    unknown = set(sizes or {}) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"sizes must name splits among {tuple(DEFAULT_SIZES)}, got {sorted(unknown)}")
    sizes = dict(DEFAULT_SIZES, **(sizes or {}))
    checks.positive_int("seed", seed, minimum=0)
    return {
        split: generate_recall(size, torch.Generator().manual_seed(seed * len(sizes) + index), pairs=pairs, keys=keys)
        for index, (split, size) in enumerate(sizes.items())
    }


def render(tokens: torch.Tensor, keys: int) -> str:
    """One sequence of ids as text, "c 7 a 2 ? a"."""
    words = vocabulary(keys)
    return " ".join(words[index] for index in tokens.tolist())
