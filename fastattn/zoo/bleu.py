"""Corpus BLEU of the zoo's text tasks (translate, captions): sacrebleu on plain text."""

from __future__ import annotations

from sacrebleu.metrics import BLEU
from sacrebleu.metrics.bleu import BLEUScore
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

MAX_NGRAM_ORDER = 4


def corpus_bleu(hypotheses: list[str], references: list[str]) -> BLEUScore:
    """BLEU of each hypothesis against its one reference (sacrebleu's defaults: 13a tokens,
    exponential smoothing), with n-grams up to 4, or up to the longest reference's length in
    13a tokens when every reference is shorter: 4-gram BLEU of references under 4 tokens is 0
    whatever the hypotheses, the references themselves included."""
    tokenize = Tokenizer13a()
    longest = max((len(tokenize(reference).split()) for reference in references), default=0)
    return BLEU(max_ngram_order=min(MAX_NGRAM_ORDER, max(1, longest))).corpus_score(hypotheses, [references])
