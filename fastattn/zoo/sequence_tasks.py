"""The seq2seq tasks of ``fastattn train``: copy, reverse, sort (generated) and translate (a TSV corpus).

Each is a :class:`~fastattn.zoo.task.Task` around :class:`~fastattn.zoo.seq2seq.Seq2Seq`:
token-level cross-entropy with teacher forcing, and evaluation by decoding (greedy, or
beam search with ``--beam-width``).  Metrics: ``exact_match`` (whole hypothesis equals the
reference), ``token_accuracy`` (position by position, over the reference's tokens); the
synthetic tasks add exact match per source length, translate adds corpus ``bleu``
(sacrebleu, on detokenised text: the hypotheses' tokens against the references'; n-grams
up to 4, fewer when every reference is shorter, see :func:`fastattn.zoo.bleu.corpus_bleu`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch

from fastattn.data import synthetic, translation
from fastattn.data.vocabulary import Vocabulary
from fastattn.zoo import plots
from fastattn.zoo.bleu import corpus_bleu
from fastattn.zoo.seq2seq import ATTENTIONS, CELLS, PAD, Seq2Seq, Seq2SeqConfig, least_window
from fastattn.zoo.task import Task, TaskError

POOL_BATCHES = 50  # training batches are cut from pools of this many, sorted by length (less padding)
PLOTTED_EXAMPLES = 3
UNKNOWN_IN_BLEU = "\u2047"  # "⁇": how a hypothesis's <unk> reaches sacrebleu, one token under its 13a tokenizer


class Example(NamedTuple):
    source: list[str]
    target: list[str]


class Batch(NamedTuple):
    source: torch.Tensor  # (B, S) ids, padded
    source_lengths: torch.Tensor  # (B,)
    target_input: torch.Tensor  # (B, T): begin token, target
    target_output: torch.Tensor  # (B, T): target, end token
    indices: list[int]  # of the examples in their split


class SequenceTask(Task):
    """What every seq2seq task shares; subclasses say where the examples come from
    (:meth:`read_examples`) and how long the model's sources may be."""

    headline_metric = "exact_match"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        model = parser.add_argument_group("model")
        model.add_argument("--attention", choices=ATTENTIONS, default="additive", help="default: additive (Bahdanau)")
        model.add_argument("--cell", choices=CELLS, default="lstm")
        model.add_argument("--embedding-size", type=int, default=64, metavar="N")
        model.add_argument("--hidden-size", type=int, default=128, metavar="N", help="decoder state; even")
        model.add_argument("--no-input-feeding", dest="input_feeding", action="store_false",
                           help="attend with s_{t-1} and feed the context (Bahdanau) instead of feeding h~_{t-1} (Luong)")
        model.add_argument("--window", type=int, default=5, metavar="D", help="half-width of local-m/local-p windows")
        decoding = parser.add_argument_group("decoding")
        decoding.add_argument("--beam-width", type=int, default=1, metavar="K", help="1: greedy decoding (default)")
        decoding.add_argument("--length-penalty", type=float, default=1.0, metavar="ALPHA",
                              help="beam search ranks hypotheses by log p / length^ALPHA")
        parser.set_defaults(lr=3e-3, batch_size=64, epochs=30)

    def __init__(self, args: argparse.Namespace, device: torch.device, saved: dict | None = None):
        super().__init__(args, device, saved)
        if args.beam_width < 1:
            raise TaskError(f"--beam-width must be >= 1, got {args.beam_width}")
        if not math.isfinite(args.length_penalty):
            raise TaskError(f"--length-penalty must be a finite number, got {args.length_penalty}")
        self.examples = self.read_examples(args, saved)
        if saved is None:
            self.source_vocabulary, self.target_vocabulary = self.build_vocabularies(self.examples["train"])
            self.config = self.model_config(args)
        else:
            self.source_vocabulary = Vocabulary(saved["source_vocabulary"])
            self.target_vocabulary = Vocabulary(saved["target_vocabulary"])
            self.config = Seq2SeqConfig(**saved["model_config"])
        self.model = Seq2Seq(self.config).to(device)
        self.draws_attention = self.config.attention != "none"  # the encoder-decoder without attention has no maps

    # What subclasses provide.
    def read_examples(self, args: argparse.Namespace, saved: dict | None) -> dict[str, list[Example]]:
        raise NotImplementedError

    def build_vocabularies(self, train: list[Example]) -> tuple[Vocabulary, Vocabulary]:
        raise NotImplementedError

    def longest_source(self) -> int:
        raise NotImplementedError

    def model_config(self, args: argparse.Namespace) -> Seq2SeqConfig:
        if args.embedding_size < 1:
            raise TaskError(f"--embedding-size must be >= 1, got {args.embedding_size}")
        least = least_window(args.attention)
        if args.window < least:
            raise TaskError(f"--window must be >= {least} with --attention {args.attention}, got {args.window}")
        try:
            return Seq2SeqConfig(
                len(self.source_vocabulary), len(self.target_vocabulary), attention=args.attention, cell=args.cell,
                embedding_size=args.embedding_size, hidden_size=args.hidden_size, input_feeding=args.input_feeding,
                window=args.window, max_source_length=self.longest_source(),
            )
        except ValueError as error:
            raise TaskError(str(error)) from None

    def state_dict(self) -> dict:
        return {
            "source_vocabulary": self.source_vocabulary.tokens,
            "target_vocabulary": self.target_vocabulary.tokens,
            "model_config": dataclasses.asdict(self.config),
        }

    def batches(self, split: str, batch_size: int, generator: torch.Generator):
        examples = self.examples[split]
        if split != "train":
            order = list(range(len(examples)))
            chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        else:
            chunks = _length_bucketed(examples, batch_size, generator)
        for chunk in chunks:
            yield self._batch(examples, chunk)

    def _batch(self, examples: list[Example], indices: list[int]) -> Batch:
        sources = [self.source_vocabulary.encode(examples[index].source) for index in indices]
        targets = [self.target_vocabulary.encode(examples[index].target) for index in indices]
        bos, eos = Vocabulary.bos_id, Vocabulary.eos_id
        return Batch(
            _padded(sources, self.device),
            torch.tensor([len(source) for source in sources], device=self.device),
            _padded([[bos, *target] for target in targets], self.device),
            _padded([[*target, eos] for target in targets], self.device),
            indices,
        )

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = model(batch.source, batch.source_lengths, batch.target_input)
        tokens = int((batch.target_output != PAD).sum())
        total = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch.target_output.flatten(), ignore_index=PAD, reduction="sum"
        )
        return total / tokens, tokens

    @staticmethod
    def decode_limits(batch: Batch) -> torch.Tensor:
        """(B,): each example's longest hypothesis, from its own source length (not the batch's
        padded one, so that an example decodes the same in any batch): round(1.5 L) + 5."""
        return torch.round(1.5 * batch.source_lengths.double()).long() + 5

    def decode(self, model: Seq2Seq, batch: Batch):
        """-> (hypotheses as token lists, Decoded) under the decoding flags."""
        limits = self.decode_limits(batch)
        max_length = int(limits.max())
        if self.args.beam_width == 1:
            decoded = model.greedy(batch.source, batch.source_lengths, max_length)
            # Greedy rows are independent: a row cut at its own limit is what decoding it alone gives.
            steps = torch.arange(decoded.tokens.shape[1], device=decoded.tokens.device)
            decoded = decoded._replace(tokens=decoded.tokens.masked_fill(steps >= limits.to(steps.device)[:, None], PAD))
        else:
            decoded = model.beam_search(
                batch.source, batch.source_lengths, max_length, self.args.beam_width, self.args.length_penalty,
                max_lengths=limits,
            )
        return [self.target_vocabulary.decode(row) for row in decoded.tokens.tolist()], decoded

    def evaluate(self, model: torch.nn.Module, split: str) -> tuple[dict, list[str]]:
        examples = self.examples[split]
        hypotheses: list[list[str]] = [[] for _ in examples]
        for batch in self.batches(split, self.args.batch_size, torch.Generator()):
            decoded_tokens, _ = self.decode(model, batch)
            for index, tokens in zip(batch.indices, decoded_tokens):
                hypotheses[index] = tokens
        references = [self.target_vocabulary.decode(self.target_vocabulary.encode(e.target)) for e in examples]
        matches = [hypothesis == reference for hypothesis, reference in zip(hypotheses, references)]
        correct_tokens = sum(
            sum(h == r for h, r in zip(hypothesis, reference)) for hypothesis, reference in zip(hypotheses, references)
        )
        metrics = {
            "exact_match": sum(matches) / len(matches),
            "token_accuracy": correct_tokens / sum(len(reference) for reference in references),
            "examples": len(examples),
            "decoding": "greedy" if self.args.beam_width == 1 else f"beam search, width {self.args.beam_width}",
        }
        metrics.update(self.extra_metrics(examples, hypotheses, matches))
        return metrics, [" ".join(hypothesis) for hypothesis in hypotheses]

    def extra_metrics(self, examples: list[Example], hypotheses: list[list[str]], matches: list[bool]) -> dict:
        return {}

    def plot(self, model: torch.nn.Module, split: str, out_dir: Path) -> list[Path]:
        """The alignment of the first few examples: source tokens across, hypothesis down."""
        if self.config.attention == "none":
            return []
        examples = self.examples[split]
        batch = self._batch(examples, list(range(min(PLOTTED_EXAMPLES, len(examples)))))
        hypotheses, decoded = self.decode(model, batch)
        limits = self.decode_limits(batch).tolist()
        paths = []
        for row, (index, hypothesis) in enumerate(zip(batch.indices, hypotheses)):
            source = examples[index].source
            steps = min(len(hypothesis) + 1, limits[row])  # the end token's step too, when it came
            weights = decoded.weights[row, :steps, : len(source)].float().cpu()
            path = Path(out_dir) / f"attention-{split}-{index}.png"
            title = f"{self.name}, attention {self.config.attention}: {split} example {index}"
            plots.alignment_heatmap(weights, source, [*hypothesis, "</s>"][: weights.shape[0]], path, title)
            paths.append(path)
        return paths


class SyntheticTask(SequenceTask):
    """copy / reverse / sort of symbol sequences, generated from ``--seed``."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        data = parser.add_argument_group("data (generated)")
        data.add_argument("--symbols", type=int, default=20, metavar="N", help="vocabulary size (default 20)")
        data.add_argument("--lengths", type=int, nargs=2, default=(1, 20), metavar=("MIN", "MAX"),
                          help="source lengths of the train and valid splits (default 1 20)")
        data.add_argument("--test-lengths", type=int, nargs=2, metavar=("MIN", "MAX"),
                          help="source lengths of the test split (default: --lengths)")
        data.add_argument("--train-size", type=int, default=50_000, metavar="N")
        data.add_argument("--test-size", type=int, default=1_000, metavar="N")

    def read_examples(self, args: argparse.Namespace, saved: dict | None) -> dict[str, list[Example]]:
        if args.data is not None:
            raise TaskError(f"task {self.name!r} generates its data; --data is for translate")
        if saved is not None:
            self.data_config = synthetic.SyntheticConfig.from_dict(saved["data_config"])
        else:
            try:
                self.data_config = synthetic.SyntheticConfig(
                    task=self.name, symbols=args.symbols, lengths=tuple(args.lengths),
                    test_lengths=tuple(args.test_lengths) if args.test_lengths else None,
                    train_size=args.train_size, test_size=args.test_size, seed=args.seed,
                )
            except ValueError as error:
                raise TaskError(str(error)) from None
        try:
            generated = synthetic.generate(self.data_config)
        except ValueError as error:  # the valid and test sources leave too few to train on
            raise TaskError(f"{error}: lower --test-size, or raise --symbols or --lengths") from None
        return {split: [Example(source, target) for source, target in pairs] for split, pairs in generated.items()}

    def build_vocabularies(self, train: list[Example]) -> tuple[Vocabulary, Vocabulary]:
        vocabulary = Vocabulary.build([synthetic.symbols(self.data_config.symbols)])
        return vocabulary, vocabulary

    def longest_source(self) -> int:
        return max(self.data_config.lengths[1], (self.data_config.test_lengths or (0, 0))[1])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "data_config": dataclasses.asdict(self.data_config)}

    def extra_metrics(self, examples, hypotheses, matches) -> dict:
        by_length = defaultdict(list)
        for example, match in zip(examples, matches):
            by_length[len(example.source)].append(match)
        return {"exact_match_by_source_length": {length: sum(m) / len(m) for length, m in sorted(by_length.items())}}


class CopyTask(SyntheticTask):
    name = "copy"


class ReverseTask(SyntheticTask):
    name = "reverse"


class SortTask(SyntheticTask):
    name = "sort"


class TranslateTask(SequenceTask):
    """Any TSV parallel corpus (``--data FILE.tsv``); vocabularies from its train split."""

    name = "translate"
    headline_metric = "bleu"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        data = parser.add_argument_group("data (--data FILE.tsv: source<TAB>target[<TAB>ignored] per line)")
        data.add_argument("--min-frequency", type=int, default=1, metavar="N",
                          help="rarer training tokens become <unk> (default 1)")
        data.add_argument("--max-length", type=int, default=30, metavar="N",
                          help="drop pairs with a side longer than N tokens (default 30)")
        data.add_argument("--lowercase", action="store_true")
        data.add_argument("--valid-fraction", type=float, default=0.05)
        data.add_argument("--test-fraction", type=float, default=0.05)

    def read_examples(self, args: argparse.Namespace, saved: dict | None) -> dict[str, list[Example]]:
        if args.data is None:
            raise TaskError("task 'translate' needs --data FILE.tsv (source<TAB>target per line)")
        pairs = translation.read_pairs(args.data, args.lowercase)
        kept = translation.keep_short(pairs, args.max_length)
        self.dropped = len(pairs) - len(kept)
        if not kept:
            raise TaskError(f"{args.data}: no pair has both sides within --max-length {args.max_length} tokens")
        if args.mode == "eval" and args.evaluate_all_of_data:
            return {"test": _examples(kept)}
        for flag in ("valid_fraction", "test_fraction"):
            if not 0 < getattr(args, flag) < 0.5:
                raise TaskError(f"--{flag.replace('_', '-')} must lie in (0, 0.5), got {getattr(args, flag)}")
        splits = translation.split(kept, args.valid_fraction, args.test_fraction, args.seed)
        return {name: _examples(chosen) for name, chosen in splits.items()}

    def build_vocabularies(self, train: list[Example]) -> tuple[Vocabulary, Vocabulary]:
        minimum = self.args.min_frequency
        if minimum < 1:
            raise TaskError(f"--min-frequency must be >= 1, got {minimum}")
        return (
            Vocabulary.build([example.source for example in train], minimum),
            Vocabulary.build([example.target for example in train], minimum),
        )

    def longest_source(self) -> int:
        return self.args.max_length

    def extra_metrics(self, examples, hypotheses, matches) -> dict:
        # An unknown word is one wrong token: sacrebleu's 13a tokenizer would split "<unk>" into
        # three ("<", "unk", ">"), so it is written as one symbol no reference token is.
        unknown = self.target_vocabulary.tokens[Vocabulary.unk_id]
        detokenized = [
            translation.detokenize([UNKNOWN_IN_BLEU if token == unknown else token for token in hypothesis])
            for hypothesis in hypotheses
        ]
        # The references are detokenised tokens as the hypotheses are, not the file's text:
        # tokenize -> detokenize does not give back every text ("bien-aimé", "3.5", quotes),
        # and a hypothesis of the reference's very tokens must score 100.
        references = [translation.detokenize(example.target) for example in examples]
        bleu = corpus_bleu(detokenized, references)
        return {"bleu": bleu.score, "bleu_signature": str(bleu), "pairs_dropped_by_max_length": self.dropped}


def _examples(pairs: list[translation.Pair]) -> list[Example]:
    return [Example(source.tokens, target.tokens) for source, target in pairs]


def _padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [PAD] * (width - len(row)) for row in rows], dtype=torch.long, device=device)


def _length_bucketed(examples: list[Example], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar source length: a random order cut into pools of
    ``POOL_BATCHES`` batches, each pool sorted by length and cut, then the batches shuffled."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    pool_size = batch_size * POOL_BATCHES
    chunks = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start : start + pool_size], key=lambda index: len(examples[index].source))
        chunks += [pool[offset : offset + batch_size] for offset in range(0, len(pool), batch_size)]
    return [chunks[index] for index in torch.randperm(len(chunks), generator=generator).tolist()]
