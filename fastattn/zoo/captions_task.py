"""``fastattn train captions``: Show-Attend-Tell (soft or hard attention) on canvases of
sklearn digits (:mod:`fastattn.data.captions`), captioned with the digits' names.

Loss: the mean word negative log-likelihood under teacher forcing plus lambda times the
doubly stochastic penalty averaged over captions; with ``--attention hard`` the word
log-likelihood term of training becomes the REINFORCE surrogate (moving-average baseline
of the caption log-likelihood, decay 0.9, and an entropy bonus), while the test loss (eval
mode: argmax locations) stays the soft model's.  Metrics: caption exact match and corpus
BLEU (:func:`fastattn.zoo.bleu.corpus_bleu`: n-grams up to the longest reference caption,
``--max-digits`` words, at most 4) of greedy captions, and ``attention_in_box``: the
share of reference words whose attention peak (teacher forcing) lies inside that
digit's box.  The data is generated from the seed, which the checkpoint keeps, so
``fastattn eval`` scores the same held-out canvases; there is no ``--data`` file.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from fastattn.data.captions import WORDS, CaptionedImages, load_caption_splits
from fastattn.data.vocabulary import SPECIALS, Vocabulary
from fastattn.zoo.bleu import corpus_bleu
from fastattn.zoo.show_attend_tell import (
    ATTENTION_KINDS,
    ShowAttendTell,
    doubly_stochastic_penalty,
    reinforce_surrogate,
)
from fastattn.zoo.task import Task, TaskError, unwrapped

BASELINE_DECAY = 0.9  # b <- 0.9 b + 0.1 log p(y|s,a), as in Xu 2015
EVAL_BATCH = 500
PLOTTED_CANVASES = 4


class CaptionsTask(Task):
    name = "captions"
    headline_metric = "exact_match"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--attention", choices=ATTENTION_KINDS, default="soft", help="soft or hard (REINFORCE) attention")
        parser.add_argument("--train-size", type=int, default=20000, help="training canvases")
        parser.add_argument("--test-size", type=int, default=1000, help="held-out canvases (validation: half as many)")
        parser.add_argument("--max-digits", type=int, default=3, help="digits per canvas: 1 to this")
        parser.add_argument("--height", type=int, default=16, help="canvas height in pixels (multiple of 4)")
        parser.add_argument("--width", type=int, default=40, help="canvas width in pixels (multiple of 4)")
        parser.add_argument("--feature-dim", type=int, default=64, help="size of the CNN's annotation vectors")
        parser.add_argument("--hidden-dim", type=int, default=128, help="LSTM decoder size")
        parser.add_argument("--doubly-stochastic", type=float, default=0.01, help="lambda of the attention penalty")
        parser.add_argument("--entropy-weight", type=float, default=0.01, help="hard attention: entropy bonus")
        parser.add_argument("--reinforce-weight", type=float, default=1.0, help="hard attention: lambda_r")
        parser.set_defaults(lr=2e-3, batch_size=32, epochs=4, time_budget=780)

    def __init__(self, args: argparse.Namespace, device: torch.device, saved: dict[str, Any] | None = None):
        super().__init__(args, device, saved)
        if getattr(args, "data", None):
            raise TaskError("--data: the captions task generates its canvases from --seed; it reads no data file")
        settings = dict(saved["hyper_parameters"]) if saved else self._settings_from(args)
        self.settings = settings
        self.vocabulary = Vocabulary(saved["vocabulary"] if saved else [*SPECIALS, *WORDS])
        self.reward_baseline = float(saved.get("reward_baseline", 0.0)) if saved else 0.0
        try:
            self.data = load_caption_splits(
                settings["data_seed"],
                {"train": getattr(args, "train_size", 20000), "valid": max(1, settings["test_size"] // 2),
                 "test": settings["test_size"]},
                height=settings["height"],
                width=settings["width"],
                max_digits=settings["max_digits"],
            )
            self.model = ShowAttendTell(
                len(self.vocabulary),
                (settings["height"], settings["width"]),
                attention=settings["attention"],
                feature_dim=settings["feature_dim"],
                hidden_dim=settings["hidden_dim"],
            ).to(device)
        except (TypeError, ValueError) as error:
            raise TaskError(str(error)) from None
        self.tensors = {split: self._tensors(data) for split, data in self.data.items()}

    @staticmethod
    def _settings_from(args: argparse.Namespace) -> dict[str, Any]:
        for flag in ("doubly_stochastic", "entropy_weight", "reinforce_weight"):
            if not 0 <= getattr(args, flag) < math.inf:
                raise TaskError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(args, flag)}")
        for flag in ("train_size", "test_size"):
            if getattr(args, flag) < 1:
                raise TaskError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        return dict(
            attention=args.attention, height=args.height, width=args.width, max_digits=args.max_digits,
            feature_dim=args.feature_dim, hidden_dim=args.hidden_dim, data_seed=args.seed, test_size=args.test_size,
        )

    def _tensors(self, data: CaptionedImages) -> dict[str, torch.Tensor]:
        """Images and teacher-forcing words: inputs <s> w_1..w_n, targets w_1..w_n </s>, padded."""
        steps = self.settings["max_digits"] + 1
        words = data.digits + len(SPECIALS)  # word ids follow the specials, in digit order
        positions = torch.arange(steps)
        targets = torch.where(positions < data.counts[:, None], torch.cat([words, words[:, :1]], 1), Vocabulary.pad_id)
        targets[torch.arange(len(data)), data.counts] = Vocabulary.eos_id
        inputs = torch.cat([torch.full((len(data), 1), Vocabulary.bos_id), targets[:, :-1]], 1)
        inputs = inputs.masked_fill(inputs == Vocabulary.eos_id, Vocabulary.pad_id)
        return {"images": data.images, "inputs": inputs, "targets": targets}

    def batches(self, split: str, batch_size: int, generator: torch.Generator):
        tensors = self.tensors[split]
        count = len(tensors["images"])
        order = torch.randperm(count, generator=generator) if split == "train" else torch.arange(count)
        for start in range(0, count, batch_size):
            chosen = order[start : start + batch_size]
            yield {name: tensor[chosen].to(self.device) for name, tensor in tensors.items()}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        outputs = model(batch["images"], batch["inputs"])
        step_mask = batch["targets"] != Vocabulary.pad_id
        tokens = int(step_mask.sum())
        word_nll = torch.nn.functional.cross_entropy(
            outputs.logits.transpose(1, 2), batch["targets"], ignore_index=Vocabulary.pad_id, reduction="none"
        )
        penalty = self.settings_value("doubly_stochastic") * doubly_stochastic_penalty(outputs.weights, step_mask).mean()
        if outputs.location_log_probs is None or not model.training:
            # Soft attention, and hard attention's test loss (eval mode): the word NLL as the soft
            # model's, not the surrogate, which depends on the baseline (moved in training only).
            return word_nll.sum() / tokens + penalty, tokens
        caption_log_likelihood = -word_nll.sum(1)
        surrogate = reinforce_surrogate(
            caption_log_likelihood, outputs.location_log_probs, outputs.entropy, step_mask, self.reward_baseline,
            reinforce_weight=self.settings_value("reinforce_weight"),
            entropy_weight=self.settings_value("entropy_weight"),
        )
        reward = float(caption_log_likelihood.detach().mean())
        self.reward_baseline = BASELINE_DECAY * self.reward_baseline + (1 - BASELINE_DECAY) * reward
        return surrogate.sum() / tokens + penalty, tokens

    def settings_value(self, flag: str) -> float:
        """A loss weight: from the command line (they may change on --resume)."""
        return float(getattr(self.args, flag))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str) -> tuple[dict[str, float], list[str]]:
        model = unwrapped(model)
        references = self.data[split].captions()
        hypotheses, peaks = [], []
        with _eval_mode(model):
            for batch in self.batches(split, EVAL_BATCH, torch.Generator()):
                words, _ = model.greedy(batch["images"], Vocabulary.bos_id, self.settings["max_digits"] + 1)
                hypotheses += [" ".join(self.vocabulary.decode(row)) for row in words.tolist()]
                peaks.append(model(batch["images"], batch["inputs"]).weights.flatten(2).argmax(-1).cpu())
        exact = sum(h == r for h, r in zip(hypotheses, references)) / len(references)
        metrics = {
            "exact_match": exact,
            "bleu": corpus_bleu(hypotheses, references).score,
            "attention_in_box": attention_in_box(torch.cat(peaks), self.data[split], model.grid_size),
            "captions": float(len(references)),
        }
        return metrics, hypotheses

    @torch.no_grad()
    def plot(self, model: torch.nn.Module, split: str, out_dir: Path) -> list[Path]:
        model = unwrapped(model)
        data = self.data[split]
        images = data.images[:PLOTTED_CANVASES].to(self.device)
        with _eval_mode(model):
            words, weights = model.greedy(images, Vocabulary.bos_id, self.settings["max_digits"] + 1)
        captions = [self.vocabulary.decode(row) for row in words.tolist()]
        path = Path(out_dir) / f"captions_attention_{split}.png"
        plot_caption_attention(images.cpu(), captions, weights.cpu(), data.boxes[:PLOTTED_CANVASES], path)
        return [path]

    def state_dict(self) -> dict[str, Any]:
        return {
            "vocabulary": list(self.vocabulary.tokens),
            "hyper_parameters": dict(self.settings),
            "reward_baseline": self.reward_baseline,
        }


class _eval_mode:
    """``with _eval_mode(model):`` eval mode inside (hard attention takes its argmax), the old mode after."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exception):
        self.model.train(self.was_training)


def attention_in_box(peaks: torch.Tensor, data: CaptionedImages, grid_size: tuple[int, int]) -> float:
    """Share of reference words whose attention peak lies in their digit's box.

    ``peaks`` (N, T): the flat grid index of each step's largest weight, step k being
    the k-th digit word; a grid cell's point is its centre in pixels (continuous
    coordinates, pixel p spanning [p, p + 1)), inside when top <= y < bottom and
    left <= x < right."""
    height, width = data.images.shape[1:]
    grid_height, grid_width = grid_size
    rows, columns = peaks // grid_width, peaks % grid_width
    y = (rows.double() + 0.5) * height / grid_height
    x = (columns.double() + 0.5) * width / grid_width
    slots = data.boxes.shape[1]
    y, x = y[:, :slots], x[:, :slots]
    top, left, bottom, right = data.boxes.double().unbind(-1)
    inside = (top <= y) & (y < bottom) & (left <= x) & (x < right)
    words = torch.arange(slots) < data.counts[:, None]
    return float(inside[words].double().mean())


def plot_caption_attention(
    images: torch.Tensor, captions: list[list[str]], weights: torch.Tensor, boxes: torch.Tensor, path: Path
) -> None:
    """One row per canvas: the canvas with its digit boxes, then each word's attention
    over the canvas (nearest-cell upsampling, so the grid cells stay visible)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    columns = 1 + weights.shape[1]
    height, width = images.shape[1:]
    figure = Figure(figsize=(2.2 * columns, 1.2 * len(images)), layout="constrained")
    axes = figure.subplots(len(images), columns, squeeze=False)
    for row, (image, caption) in enumerate(zip(images, captions)):
        axes[row, 0].imshow(image.numpy(), cmap="gray_r")
        for top, left, bottom, right in boxes[row].tolist():
            if top >= 0:
                axes[row, 0].add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, color="tab:green"))
        axes[row, 0].set_title(" ".join(caption) or "(empty)", fontsize=8)
        for step in range(weights.shape[1]):
            axis = axes[row, 1 + step]
            if step <= len(caption):
                axis.imshow(image.numpy(), cmap="gray_r")
                axis.imshow(weights[row, step].numpy(), cmap="inferno", alpha=0.6, interpolation="nearest",
                            extent=(-0.5, width - 0.5, height - 0.5, -0.5))
                axis.set_title(caption[step] if step < len(caption) else "</s>", fontsize=8)
        for axis in axes[row]:
            axis.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
