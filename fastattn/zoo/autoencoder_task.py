"""``fastattn train autoencoder --model undercomplete|deep|denoising|linear``: autoencoders
(:mod:`fastattn.zoo.autoencoders`) on sklearn's 8x8 digits, flattened to 64 pixels in [0, 1].

Loss: the mean squared error of the reconstruction against the clean image.  Metrics on a
split: ``mse`` (clean inputs) and ``noisy_input_mse`` (inputs corrupted with Gaussian
noise of std ``--noise``, drawn from a fixed seed, scored against the clean images: how
well the model denoises).  Hypotheses: one line per image, its label and its error.
The split comes from ``--seed``, which the checkpoint keeps; there is no ``--data`` file.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from fastattn.data.digits import load_digits_splits
from fastattn.zoo.autoencoders import KINDS, build_autoencoder
from fastattn.zoo.task import Task, TaskError, unwrapped

PIXELS = 64
NOISE_SEED = 1234  # the corruption of noisy_input_mse, the same for every model
PLOTTED_IMAGES = 10


class AutoencoderTask(Task):
    name = "autoencoder"
    headline_metric = "mse"
    higher_is_better = False
    draws_attention = False  # plot() draws reconstructions

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", choices=KINDS, default="undercomplete", help="which autoencoder")
        parser.add_argument("--hidden", type=int, default=16, help="code size")
        parser.add_argument("--noise", type=float, default=0.3,
                            help="std of the Gaussian input noise (denoising training; noisy_input_mse)")
        parser.set_defaults(lr=3e-3, batch_size=64, epochs=300)

    def __init__(self, args: argparse.Namespace, device: torch.device, saved: dict[str, Any] | None = None):
        super().__init__(args, device, saved)
        if getattr(args, "data", None):
            raise TaskError("--data: the autoencoder task uses sklearn's digits, split by --seed; it reads no data file")
        if saved:
            self.settings = dict(saved["hyper_parameters"])
        else:
            if args.hidden < 1:
                raise TaskError(f"--hidden must be >= 1, got {args.hidden}")
            if not 0 <= args.noise < math.inf:
                raise TaskError(f"--noise must be a finite number >= 0, got {args.noise}")
            self.settings = dict(model=args.model, hidden=args.hidden, noise=args.noise, data_seed=args.seed)
        splits = load_digits_splits(self.settings["data_seed"])
        self.images = {split: digits.images.reshape(-1, PIXELS) for split, digits in splits.items()}
        self.labels = {split: digits.labels for split, digits in splits.items()}
        self.model = build_autoencoder(
            self.settings["model"], PIXELS, self.settings["hidden"], self.settings["noise"]
        ).to(device)

    def batches(self, split: str, batch_size: int, generator: torch.Generator):
        images = self.images[split]
        order = torch.randperm(len(images), generator=generator) if split == "train" else torch.arange(len(images))
        for start in range(0, len(images), batch_size):
            yield images[order[start : start + batch_size]].to(self.device)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        return torch.nn.functional.mse_loss(model(batch), batch), len(batch)

    def noisy(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` plus Gaussian noise of std ``noise``, the same draw on every call."""
        generator = torch.Generator().manual_seed(NOISE_SEED)
        return images + self.settings["noise"] * torch.randn(images.shape, generator=generator)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str) -> tuple[dict[str, float], list[str]]:
        model = unwrapped(model)
        clean = self.images[split]
        was_training = model.training
        model.eval()
        reconstruction = model(clean.to(self.device)).cpu()
        denoised = model(self.noisy(clean).to(self.device)).cpu()
        model.train(was_training)
        errors = ((reconstruction - clean) ** 2).mean(1)
        metrics = {
            "mse": float(errors.mean()),
            "noisy_input_mse": float(((denoised - clean) ** 2).mean()),
            "images": float(len(clean)),
        }
        lines = [f"label={label} mse={error:.6f}" for label, error in zip(self.labels[split].tolist(), errors.tolist())]
        return metrics, lines

    @torch.no_grad()
    def plot(self, model: torch.nn.Module, split: str, out_dir: Path) -> list[Path]:
        """Rows: the originals, (for the denoising model, the noisy inputs,) the reconstructions."""
        from matplotlib.figure import Figure

        model = unwrapped(model)
        clean = self.images[split][:PLOTTED_IMAGES]
        shown_input = self.noisy(clean) if self.settings["model"] == "denoising" else clean
        was_training = model.training
        model.eval()
        reconstruction = model(shown_input.to(self.device)).cpu()
        model.train(was_training)
        rows = [("original", clean)]
        if shown_input is not clean:
            rows.append((f"noisy (std {self.settings['noise']})", shown_input))
        rows.append(("reconstruction", reconstruction))
        figure = Figure(figsize=(PLOTTED_IMAGES * 0.9, 1.1 * len(rows)), layout="constrained")
        axes = figure.subplots(len(rows), len(clean), squeeze=False)
        for row, (title, images) in enumerate(rows):
            for column, image in enumerate(images):
                axes[row, column].imshow(image.reshape(8, 8).clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1)
                axes[row, column].set_axis_off()
            axes[row, 0].set_title(title, fontsize=8, loc="left")
        path = Path(out_dir) / f"autoencoder_{self.settings['model']}_{split}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        return [path]

    def state_dict(self) -> dict[str, Any]:
        return {"hyper_parameters": dict(self.settings)}
