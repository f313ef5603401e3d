"""Figures of a training run. Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
# Text is drawn as it is: a class or file name with '$' is not read as mathematics.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cifar_ray.files import save_figure  # noqa: E402

CURVE_PANELS = [("train/loss", "Training loss"), ("train/acc", "Training accuracy"),
                ("val/loss", "Validation loss"), ("val/acc", "Validation accuracy")]


def curve_panels(history: list[dict[str, float]]) -> list[tuple[str, str]]:
    """The panels of CURVE_PANELS that `history` has values for (a run trained on train +
    validation, like the search's retrain, has no validation panels)."""
    return [panel for panel in CURVE_PANELS if any(panel[0] in row for row in history)]


def plot_curves(history: list[dict[str, float]], target: str | Path) -> None:
    """The plots of the reference: training (and validation) loss and accuracy against epoch."""
    panels = curve_panels(history) or CURVE_PANELS[:2]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), constrained_layout=True,
                             squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    save_figure(fig, target, dpi=100)


def _grid_with_colour_bar(width: float, height: float, rows: int, cols: int, title: str,
                          label: str):
    """A figure of rows x cols sub-figures, with the heat map's scale in a strip on the right
    (grad-cam overlays use the JET colour map on [0, 1])."""
    fig = plt.figure(figsize=(width + 1.2, height), layout="constrained")
    fig.suptitle(title, fontsize=14)
    grid, strip = fig.subfigures(1, 2, width_ratios=[width, 1.2])
    bar = plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap="jet")
    strip.colorbar(bar, cax=strip.add_axes((0.2, 0.25, 0.25, 0.5)), label=label)
    return fig, grid.subfigures(rows, cols, squeeze=False).flat


def _hide_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_cam_grid(images, overlays, titles, target: str | Path, per_row: int = 4) -> None:
    """Each image beside its CAM overlay, titled 'true / predicted (probability)'."""
    rows = -(-len(images) // per_row)
    fig, cells = _grid_with_colour_bar(
        4.4 * per_row, 2.6 * rows + 0.6, rows, per_row,
        "Most confident mistakes: image | GradCAM for the predicted class", "GradCAM")
    for image, over, title, cell in zip(images, overlays, titles, cells):
        left, right = cell.subplots(1, 2)
        left.imshow(image, interpolation="bicubic")
        right.imshow(over)
        for ax in (left, right):
            _hide_ticks(ax)
        cell.suptitle(title, fontsize=11)
    save_figure(fig, target, dpi=90)


def plot_true_vs_pred(images, true_overlays, pred_overlays, mistakes, target: str | Path,
                      per_row: int = 2) -> None:
    """Where the model looked for the true class vs for the class it predicted."""
    rows = -(-len(images) // per_row)
    fig, cells = _grid_with_colour_bar(
        6.6 * per_row, 2.6 * rows + 0.6, rows, per_row,
        "GradCAM for the true class vs for the predicted class", "GradCAM")
    for image, true_o, pred_o, m, cell in zip(images, true_overlays, pred_overlays, mistakes, cells):
        axes = cell.subplots(1, 3)
        for ax, picture, title in zip(axes, (image, true_o, pred_o),
                                      ("image", f"true: {m.true}", f"predicted: {m.predicted}")):
            ax.imshow(picture, interpolation="bicubic" if picture is image else None)
            ax.set_title(title, fontsize=10)
            _hide_ticks(ax)
        cell.suptitle(f"#{m.index}: p({m.predicted}) = {m.probability:.2f}", fontsize=11)
    save_figure(fig, target, dpi=90)


def plot_confusion_matrix(matrix, classes: list[str], target: str | Path) -> None:
    n = len(classes)
    size = min(max(6, 0.6 * n), 30)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), layout="constrained")
    shown = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=9 if n <= 20 else 5)
    ax.set_yticks(range(n), classes, fontsize=9 if n <= 20 else 5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    if n <= 20:
        threshold = matrix.max() / 2
        for t in range(n):
            for p in range(n):
                ax.text(p, t, int(matrix[t, p]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[t, p] > threshold else "black")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="images")
    save_figure(fig, target, dpi=100)


def plot_per_class_accuracy(accuracies: list[float], classes: list[str], target: str | Path) -> None:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(8, max(3, 0.35 * n + 1)), layout="constrained")
    ax.barh(range(n), accuracies, color="tab:blue")
    ax.set_yticks(range(n), classes, fontsize=9 if n <= 20 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("accuracy")
    ax.set_title("Per-class accuracy")
    if n <= 20:
        for i, acc in enumerate(accuracies):
            ax.text(acc + 0.01, i, f"{acc:.2f}", va="center", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, target, dpi=100)
