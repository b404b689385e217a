"""``fastattn train lstmn --model lstmn|lstm``: associative recall (:mod:`fastattn.data.recall`)
read by an LSTMN (:mod:`fastattn.zoo.lstmn`) or a plain LSTM of the same hidden size.

Loss: cross-entropy of the recalled value.  Metric: ``accuracy`` (the share of questions
answered right; chance is 0.1).  Hypotheses: "sequence -> answer" per test sequence.
Plot (LSTMN): the intra-attention of every step over the tape, for a few sequences.
The data comes from ``--seed``, which the checkpoint keeps; there is no ``--data`` file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from fastattn.data.recall import VALUES, load_recall_splits, render, vocabulary
from fastattn.zoo.lstmn import ENCODERS, SCORES, RecallClassifier
from fastattn.zoo.task import Task, TaskError, unwrapped

EVAL_BATCH = 500
PLOTTED_SEQUENCES = 3


class LSTMNTask(Task):
    name = "lstmn"
    headline_metric = "accuracy"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", choices=ENCODERS, default="lstmn", help="LSTMN or a plain LSTM of the same size")
        parser.add_argument("--score", choices=SCORES, default="additive",
                            help="LSTMN intra-attention score: additive (the paper's) or general (bilinear)")
        parser.add_argument("--read-next-token", action="store_true",
                            help="LSTMN: each tape entry also holds the embedding of the token after it (not in the paper)")
        parser.add_argument("--pairs", type=int, default=8, help="key-value pairs before the question")
        parser.add_argument("--keys", type=int, default=16, help="distinct keys (letters)")
        parser.add_argument("--hidden", type=int, default=64, help="hidden size of either model")
        parser.add_argument("--train-size", type=int, default=40000, help="training sequences")
        parser.set_defaults(lr=3e-3, batch_size=64, epochs=3)

    def __init__(self, args: argparse.Namespace, device: torch.device, saved: dict[str, Any] | None = None):
        super().__init__(args, device, saved)
        if getattr(args, "data", None):
            raise TaskError("--data: the lstmn task generates its sequences from --seed; it reads no data file")
        if getattr(args, "train_size", 40000) < 1:
            raise TaskError(f"--train-size must be >= 1, got {args.train_size}")
        if saved:
            self.settings = dict(saved["hyper_parameters"])
        else:
            self.settings = dict(
                model=args.model, score=args.score, pairs=args.pairs, keys=args.keys, hidden=args.hidden, data_seed=args.seed,
                read_next_token=args.read_next_token,
            )
        self.draws_attention = self.settings["model"] == "lstmn"  # the plain LSTM has no attention to draw
        try:
            self.data = load_recall_splits(
                self.settings["data_seed"], {"train": getattr(args, "train_size", 40000)},
                pairs=self.settings["pairs"], keys=self.settings["keys"],
            )
            self.model = RecallClassifier(
                len(vocabulary(self.settings["keys"])), len(VALUES),
                encoder=self.settings["model"], hidden_size=self.settings["hidden"], score=self.settings["score"],
                read_next_token=self.settings.get("read_next_token", False),  # checkpoints from before the flag
            ).to(device)
        except (TypeError, ValueError) as error:
            raise TaskError(str(error)) from None

    def batches(self, split: str, batch_size: int, generator: torch.Generator):
        data = self.data[split]
        order = torch.randperm(len(data.answers), generator=generator) if split == "train" else torch.arange(len(data.answers))
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield data.tokens[chosen].to(self.device), data.answers[chosen].to(self.device)

    def loss(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        tokens, answers = batch
        logits, _ = model(tokens)
        return torch.nn.functional.cross_entropy(logits, answers), len(answers)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str) -> tuple[dict[str, float], list[str]]:
        model = unwrapped(model)
        predictions = torch.cat([model(tokens)[0].argmax(-1).cpu() for tokens, _ in self.batches(split, EVAL_BATCH, torch.Generator())])
        data = self.data[split]
        lines = [f"{render(tokens, self.settings['keys'])} -> {VALUES[answer]}" for tokens, answer in zip(data.tokens, predictions.tolist())]
        return {"accuracy": float((predictions == data.answers).double().mean()), "sequences": float(len(lines))}, lines

    @torch.no_grad()
    def plot(self, model: torch.nn.Module, split: str, out_dir: Path) -> list[Path]:
        """The LSTMN's intra-attention: for each step (rows), its weights over the tape
        (columns: the initial zero state, then the states after each token)."""
        from matplotlib.figure import Figure

        model = unwrapped(model)
        if self.settings["model"] != "lstmn":
            return []
        tokens = self.data[split].tokens[:PLOTTED_SEQUENCES]
        _, weights = model(tokens.to(self.device))
        figure = Figure(figsize=(4.2 * len(tokens), 4.2), layout="constrained")
        axes = figure.subplots(1, len(tokens), squeeze=False)[0]
        for axis, row, sequence in zip(axes, weights.cpu(), tokens):
            words = render(sequence, self.settings["keys"]).split()
            axis.imshow(row.numpy(), cmap="viridis", vmin=0, vmax=1)
            axis.set_yticks(range(len(words)), words, fontsize=7)
            axis.set_xticks(range(len(words) + 1), ["(0)", *words], fontsize=7)
            axis.set_xlabel("tape: state after token")
            axis.set_ylabel("step reading")
        path = Path(out_dir) / f"lstmn_attention_{split}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        return [path]

    def state_dict(self) -> dict[str, Any]:
        return {"hyper_parameters": dict(self.settings)}
