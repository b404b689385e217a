"""A parallel corpus from a tab-separated file: ``source<TAB>target[<TAB>anything]`` per line.

The layout of the Tatoeba / ManyThings exports.  Blank lines are skipped; any other line
without a tab, or with an empty side, is a :class:`DataError` naming the file and line.
Tokens are words (an inner apostrophe kept: "don't") and single punctuation marks;
:func:`detokenize` undoes that spacing (for most text: "bien-aimé" comes back as
"bien - aimé") so BLEU can be computed on plain text.  Pairs
with a side longer than ``max_length`` tokens are dropped; the rest are split into
train/valid/test by a permutation drawn from ``seed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastattn.data import DataError

TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
NO_SPACE_BEFORE = re.compile(r" ([.,!?;:%)\]}»”])")
NO_SPACE_AFTER = re.compile(r"([(\[{¿¡«“]) ")


@dataclass(frozen=True)
class Sentence:
    text: str  # as in the file, stripped (and lowercased if asked)
    tokens: list[str]


Pair = tuple[Sentence, Sentence]


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text)


def detokenize(tokens: list[str]) -> str:
    """Tokens back to text: no space before closing punctuation or after opening marks."""
    return NO_SPACE_AFTER.sub(r"\1", NO_SPACE_BEFORE.sub(r"\1", " ".join(tokens)))


def read_pairs(path: str | Path, lowercase: bool = False) -> list[Pair]:
    """Every (source, target) of the file, in file order."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, expected a tab-separated text file of sentence pairs")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a leading byte-order mark is dropped, not a token
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{path}:{number}: expected source<TAB>target, found no tab in {_shown(line)}")
        source, target = (field.strip().lower() if lowercase else field.strip() for field in fields[:2])
        if not source or not target:
            side = "source" if not source else "target"
            raise DataError(f"{path}:{number}: the {side} is empty in {_shown(line)}")
        pairs.append((Sentence(source, tokenize(source)), Sentence(target, tokenize(target))))
    if not pairs:
        raise DataError(f"{path}: no sentence pairs in the file")
    return pairs


def keep_short(pairs: list[Pair], max_length: int) -> list[Pair]:
    """The pairs whose source and target both have 1..max_length tokens."""
    return [pair for pair in pairs if all(0 < len(side.tokens) <= max_length for side in pair)]


def split(pairs: list[Pair], valid_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Pair]]:
    """A seeded permutation cut into test, valid and train (each non-empty when there are >= 3 pairs)."""
    for name, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 < fraction < 0.5:
            raise ValueError(f"{name} must lie in (0, 0.5), got {fraction}")
    if len(pairs) < 3:
        raise DataError(f"a corpus needs at least 3 sentence pairs (train, valid, test), got {len(pairs)}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    test_count = max(1, round(test_fraction * len(pairs)))
    # Both rounded up could take every pair (4 pairs, 0.4 and 0.4): valid gives train its one.
    valid_count = min(max(1, round(valid_fraction * len(pairs))), len(pairs) - test_count - 1)
    chosen = [pairs[index] for index in order]
    return {
        "test": chosen[:test_count],
        "valid": chosen[test_count : test_count + valid_count],
        "train": chosen[test_count + valid_count :],
    }


def _shown(line: str) -> str:
    return repr(line if len(line) <= 60 else line[:57] + "...")
