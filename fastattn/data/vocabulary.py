"""A token vocabulary: the special tokens, then the tokens seen often enough, each with an id.

Ids 0-3 are ``<pad>``, ``<s>`` (begin), ``</s>`` (end) and ``<unk>``; ``encode`` maps a
token it does not know to ``<unk>``.  Built from training data only, saved as its token list.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class Vocabulary:
    pad_id, bos_id, eos_id, unk_id = range(4)

    def __init__(self, tokens: Sequence[str]):
        """``tokens``: every token in id order, starting with the four specials."""
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"tokens must start with the special tokens {SPECIALS}, got {list(tokens[:4])}")
        self.tokens = list(tokens)
        self.ids = {token: index for index, token in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            raise ValueError("tokens must not repeat")

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_frequency: int = 1) -> "Vocabulary":
        """The tokens occurring at least ``min_frequency`` times, most frequent first
        (ties in order of first appearance, so the result is deterministic)."""
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        counts = Counter(token for sentence in sentences for token in sentence)
        kept = [token for token, count in counts.most_common() if count >= min_frequency and token not in SPECIALS]
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, sentence: Sequence[str]) -> list[int]:
        return [self.ids.get(token, self.unk_id) for token in sentence]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The tokens of ``ids`` up to the first end token, without begin/padding tokens."""
        tokens = []
        for index in ids:
            if index == self.eos_id:
                break
            if index not in (self.pad_id, self.bos_id):
                tokens.append(self.tokens[index])
        return tokens


def never_emitted(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` (..., V) over the vocabulary with ``<pad>`` and ``<s>`` ruled out (-inf): a
    decoder never emits them (``decode`` drops them, so the tokens would no longer line up
    with the steps and their attention rows).  Integer indices, no index tensor: it runs
    inside a CUDA graph too."""
    scores = scores.clone()
    scores[..., Vocabulary.pad_id] = float("-inf")
    scores[..., Vocabulary.bos_id] = float("-inf")
    return scores
