"""Figures of the zoo, drawn with matplotlib's Agg canvas (no display, no global pyplot state)."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def alignment_heatmap(weights: torch.Tensor, source: list[str], target: list[str], path: Path, title: str = "") -> Path:
    """Attention weights (len(target), len(source)) as a heatmap, source tokens across the
    top and output tokens down the side (the layout of Bahdanau 2015, Fig. 3), saved as PNG."""
    if tuple(weights.shape) != (len(target), len(source)):
        raise ValueError(f"weights must be (len(target)={len(target)}, len(source)={len(source)}), got {tuple(weights.shape)}")
    cell = 0.32
    figure = Figure(figsize=(max(3.0, 1.5 + cell * len(source)), max(3.0, 1.2 + cell * len(target))))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(weights.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="equal")
    axes.set_xticks(range(len(source)), source, rotation=90)
    axes.set_yticks(range(len(target)), target)
    axes.xaxis.tick_top()
    axes.set_xlabel("source")
    axes.set_ylabel("output")
    if title:
        axes.set_title(title, fontsize=9, pad=24)
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
