"""The algorithmic seq2seq tasks: copy, reverse and sort a sequence of symbols.

Generated in-process from a seed; no files.  Symbols are the strings "0".."V-1".  The
valid and test splits are held out: no training source equals one of theirs, for every
length with at least ``HELD_OUT_MINIMUM`` possible sources (V^L).  Shorter lengths have too
few sequences to hold any out (over 20 symbols, the test split alone would take all 20
of length 1 away from training), so they occur in every split.  The test split may use
other lengths than training (``test_lengths``), e.g. longer sources to measure
generalisation beyond the training range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASKS = {
    "copy": lambda source: list(source),
    "reverse": lambda source: source[::-1],
    "sort": lambda source: sorted(source, key=int),
}

Pair = tuple[list[str], list[str]]
HELD_OUT_MINIMUM = 1000


@dataclass(frozen=True)
class SyntheticConfig:
    task: str = "reverse"
    symbols: int = 20
    lengths: tuple[int, int] = (1, 20)  # inclusive range of training source lengths
    test_lengths: tuple[int, int] | None = None  # default: same as lengths
    train_size: int = 50_000
    valid_size: int = 500
    test_size: int = 1_000
    seed: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {tuple(TASKS)}, got {self.task!r}")
        if self.symbols < 2:
            raise ValueError(f"symbols must be >= 2, got {self.symbols}")
        for name in ("lengths", "test_lengths"):
            low_high = getattr(self, name)
            if low_high is not None and not (1 <= low_high[0] <= low_high[1]):
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {low_high}")
        for name in ("train_size", "valid_size", "test_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


    @classmethod
    def from_dict(cls, fields: dict) -> "SyntheticConfig":
        """The inverse of ``dataclasses.asdict`` (which may have turned the ranges into lists)."""
        ranges = {name: tuple(fields[name]) for name in ("lengths", "test_lengths") if fields.get(name) is not None}
        return cls(**{**fields, **ranges})


def symbols(count: int) -> list[str]:
    return [str(index) for index in range(count)]


def generate(config: SyntheticConfig) -> dict[str, list[Pair]]:
    """{"train", "valid", "test"} -> (source tokens, target tokens) pairs; the same
    config gives the same pairs."""
    random = np.random.default_rng(config.seed)
    test_lengths = config.test_lengths or config.lengths
    test = _sources(random, config.symbols, test_lengths, config.test_size, held_out=set())
    valid = _sources(random, config.symbols, config.lengths, config.valid_size, held_out=set())
    held_out = {tuple(source) for source in test + valid if config.symbols ** len(source) >= HELD_OUT_MINIMUM}
    train = _sources(random, config.symbols, config.lengths, config.train_size, held_out)
    target = TASKS[config.task]
    return {
        split: [(source, target(source)) for source in sources]
        for split, sources in (("train", train), ("valid", valid), ("test", test))
    }


def _sources(random: np.random.Generator, vocabulary: int, lengths: tuple[int, int], count: int,
             held_out: set[tuple[str, ...]]) -> list[list[str]]:
    """``count`` sources of uniform length in ``lengths`` and uniform symbols, none in ``held_out``."""
    names = np.array(symbols(vocabulary), dtype=object)
    sources: list[list[str]] = []
    for _attempt in range(100):
        missing = count - len(sources)
        if missing == 0:
            return sources
        drawn_lengths = random.integers(lengths[0], lengths[1] + 1, size=missing)
        drawn = names[random.integers(0, vocabulary, size=(missing, lengths[1]))]
        candidates = (row[:length].tolist() for row, length in zip(drawn, drawn_lengths))
        sources += [source for source in candidates if tuple(source) not in held_out]
    raise ValueError(f"cannot draw {count} sources of lengths {lengths} over {vocabulary} symbols that are not held out")
