"""Figures of a training run. Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cifar_ray.files import save_figure  # noqa: E402


def plot_curves(history: list[dict[str, float]], target: str | Path) -> None:
    """The four plots of the reference: training/validation loss and accuracy against epoch."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    panels = [("train/loss", "Training loss"), ("train/acc", "Training accuracy"),
              ("val/loss", "Validation loss"), ("val/acc", "Validation accuracy")]
    for ax, (key, title) in zip(axes.flat, panels):
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker="o")
        else:
            ax.text(0.5, 0.5, "no validation set", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    save_figure(fig, target, dpi=100)
