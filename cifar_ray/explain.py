"""What the model gets wrong, and where it looks (the `gradcam` command, the search's analyse
stage, the app): predicts a split, ranks the mistakes by confidence, and draws GradCAM maps
(for the predicted and the true class) of the first N, into the output dir (README.md,
"Outputs")."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam.utils.image import show_cam_on_image
from torch.utils.data import DataLoader

from cifar_ray.config import DataConfig
from cifar_ray.data.arrays import ImageArrays, resized
from cifar_ray.data.augment import denormalize, eval_transform
from cifar_ray.data.datamodule import ImageArrayDataset, split_arrays
from cifar_ray.data.sources import load_dataset
from cifar_ray.errors import ConfigError, UserError
from cifar_ray.files import write_json, write_text
from cifar_ray.module import LitResNet9, load_module
from cifar_ray.names import CAM_BATCH, CAM_IMAGES, DEFAULT_CAM_LAYER, GRADCAM_FIGURES, shown_name
from cifar_ray.plots import (
    plot_cam_grid,
    plot_confusion_matrix,
    plot_per_class_accuracy,
    plot_true_vs_pred,
)
from cifar_ray.runtime import resolve_device

UPSCALE = 128  # figures show images at least this wide (CIFAR's 32x32 at 4x)


@dataclass
class Mistake:
    index: int  # position in the split
    true: str
    predicted: str
    probability: float  # the model's probability for its (wrong) prediction
    true_id: int
    predicted_id: int


def target_layer(module: LitResNet9, name: str) -> torch.nn.Module:
    layers = dict(module.model.named_modules())
    if name not in layers or not name:
        top = [n for n in layers if n and "." not in n]
        raise ConfigError(f"unknown target layer '{name}'; valid: {', '.join(top)} "
                          "(or a submodule such as layer3_R.conv2)")
    return layers[name]


@torch.no_grad()
def predict(module: LitResNet9, loader: DataLoader, device: torch.device) -> np.ndarray:
    """Class probabilities (N, classes) for a whole split, one batch at a time."""
    probs = [module(x.to(device)).exp().cpu() for x, _ in loader]
    return torch.cat(probs).numpy()


def find_mistakes(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> list[Mistake]:
    """Every misclassified image, most confident mistakes first."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")]
    return [Mistake(int(i), classes[labels[i]], classes[predicted[i]],
                    float(probs[i, predicted[i]]), int(labels[i]), int(predicted[i]))
            for i in order]


def compute_cams(module: LitResNet9, images: torch.Tensor, class_ids: list[int], layer: str,
                 device: torch.device) -> np.ndarray:
    """GradCAM maps (B, s, s) in [0, 1] of `images` (B, 3, s, s) for `class_ids`: grad-cam's
    computation in a few batched ops, autograd back to the layer only (equal maps: tested)."""
    was_training = module.training
    saved: list[torch.Tensor] = []
    hook = target_layer(module, layer).register_forward_hook(lambda _m, _i, out: saved.append(out))
    try:
        module.eval()
        with torch.inference_mode(False), torch.enable_grad():
            # Requiring the input's gradient makes the layer's output require one too.
            x = images.to(device).clone().requires_grad_(True)  # (B, 3, H, W)
            log_probs = module.model(x)  # (B, classes): the image as it is, not eval.tta's views
            ids = torch.as_tensor(class_ids, device=device).view(-1, 1)
            score = log_probs.gather(1, ids).sum()  # each image's own class: grad-cam's target
            (grads,) = torch.autograd.grad(score, saved[0])  # (B, C, h, w)
        acts = saved[0].detach()
        weights = grads.mean((2, 3), keepdim=True)  # (B, C, 1, 1): GradCAM's channel weights
        cam = (weights * acts).sum(1, keepdim=True).clamp_min(0)  # (B, 1, h, w)
        # As grad-cam: scale each map to [0, 1], resize (bilinear), then scale again.
        cam = F.interpolate(_unit_range(cam), size=x.shape[-2:], mode="bilinear",
                            align_corners=False)
        return _unit_range(cam)[:, 0].float().clamp(0, 1).cpu().numpy()  # (B, H, W)
    finally:
        hook.remove()
        module.train(was_training)


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) maps shifted and scaled to [0, 1] each, as grad-cam's scale_cam_image."""
    low = maps.amin((2, 3), keepdim=True)
    maps = maps - low
    return maps / (1e-7 + maps.amax((2, 3), keepdim=True))


def heatmap_over(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """An (s, s, 3) image in [0, 1] and its (s, s) CAM -> an RGB overlay, upscaled when small."""
    side = max(UPSCALE, image.shape[0])
    big = cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    mask = cv2.resize(cam, (side, side), interpolation=cv2.INTER_LINEAR).clip(0, 1)
    return show_cam_on_image(big.astype(np.float32), mask, use_rgb=True, image_weight=image_weight)


def analyse(checkpoint: str | Path, data_dir: str | Path, output_dir: str | Path | None = None,
            num_images: int = CAM_IMAGES, layer: str = DEFAULT_CAM_LAYER, split: str = "test",
            device: str = "auto", batch_size: int = CAM_BATCH,
            arrays: ImageArrays | None = None) -> dict[str, Any]:
    """The whole stage as a function (the search calls it); returns the summary numbers."""
    checkpoint = Path(checkpoint).expanduser().resolve()
    out = Path(output_dir).expanduser().resolve() if output_dir else checkpoint.parent / "gradcam"
    dev = torch.device(resolve_device(device))
    module = load_module(checkpoint).to(dev)
    target_layer(module, layer)  # fail on a bad name before any heavy work
    dataset = split_of(module, checkpoint, data_dir, split, arrays)
    labels = dataset.labels
    probs = predict(module, DataLoader(dataset, batch_size=batch_size), dev)
    names = [shown_name(c) for c in module.class_names]  # as drawn, written and shown
    mistakes = find_mistakes(probs, labels, names)
    shown = mistakes[:num_images]

    # torch.tensor copies: `labels` may be a read-only view of Ray's object store.
    module.test_confusion.update(torch.from_numpy(probs).to(dev), torch.tensor(labels, device=dev))
    classes = module.class_report(module.test_confusion.compute().cpu())
    module.test_confusion.reset()
    confusion = np.asarray(classes["confusion_matrix"])
    accuracy = float(np.trace(confusion) / max(len(labels), 1))

    plot_confusion_matrix(confusion, names, out / "confusion_matrix.png")
    plot_per_class_accuracy(list(classes["per_class_acc"].values()), names,
                            out / "per_class_accuracy.png")
    if shown:
        plot_mistakes(module, dataset, shown, layer, dev, out)

    summary = {"checkpoint": str(checkpoint), "split": split, "images": int(len(labels)),
               "accuracy": accuracy, "mistakes": len(mistakes), "shown": len(shown),
               "target_layer": layer, "output_dir": str(out),
               "figures": [name for name in GRADCAM_FIGURES if (out / name).is_file()]}
    write_json(out / "misclassified.json",
               {**summary, "misclassified": [m.__dict__ for m in mistakes]})
    write_text(out / "index.html", render_html(summary, confusion, names))
    return summary


def split_of(module: LitResNet9, checkpoint: Path, data_dir: str | Path, split: str,
             arrays: ImageArrays | None) -> ImageArrayDataset:
    """The split the model was trained with, at its size, normalised as it was trained."""
    trained = module.data_config
    if arrays is None:
        arrays = load_dataset(DataConfig(dataset=trained.dataset, data_dir=str(data_dir),
                                         image_size=module.image_size))
    arrays = resized(arrays, module.image_size)  # a search's arrays are at its largest size
    if len(arrays.classes) != module.num_classes:
        raise UserError(f"{checkpoint}: trained for {module.num_classes} classes, but the data "
                        f"set in {data_dir} has {len(arrays.classes)}")
    if split == "val" and trained.val_size == 0:
        raise ConfigError("this checkpoint was trained without a validation split; use --split test")
    if split == "val" and not module.hparams.get("eval"):
        raise UserError(f"{checkpoint}: written by an earlier version of cifar_ray, whose "
                        "validation split was not stratified: its validation images are not "
                        "known now; use --split test")
    images, labels = split_arrays(arrays, split, trained.val_size, module.hparams.seed)
    return ImageArrayDataset(images, labels, eval_transform(module.normalization))


def plot_mistakes(module: LitResNet9, dataset: ImageArrayDataset, shown: list, layer: str,
                  dev: torch.device, out: Path) -> None:
    """misclassified.png and gradcam_true_vs_pred.png of the `shown` mistakes."""
    batch = torch.stack([dataset[m.index][0] for m in shown])  # (N, 3, s, s)
    pictures = list(denormalize(batch, module.normalization).numpy())  # (s, s, 3) in [0, 1]
    pred_cams = compute_cams(module, batch, [m.predicted_id for m in shown], layer, dev)
    true_cams = compute_cams(module, batch, [m.true_id for m in shown], layer, dev)
    titles = [f"{m.true} / {m.predicted} ({m.probability:.2f})" for m in shown]
    on_pred = [heatmap_over(p, c) for p, c in zip(pictures, pred_cams)]
    plot_cam_grid(pictures, on_pred, titles, out / "misclassified.png")
    plot_true_vs_pred(pictures, [heatmap_over(p, c) for p, c in zip(pictures, true_cams)],
                      on_pred, shown, out / "gradcam_true_vs_pred.png")


def render_html(summary: dict[str, Any], confusion: np.ndarray, classes: list[str]) -> str:
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    pairs = np.dstack(np.unravel_index(np.argsort(-off_diagonal, axis=None), confusion.shape))[0]
    confused = "".join(f"<li>{html.escape(classes[t])} taken for {html.escape(classes[p])}: "
                       f"{off_diagonal[t, p]}</li>" for t, p in pairs[:5] if off_diagonal[t, p])
    figures = "".join(f'<figure><img src="{f}" alt="{f}"><figcaption>'
                      f'{html.escape(GRADCAM_FIGURES[f])} (<code>{f}</code>)</figcaption></figure>'
                      for f in summary["figures"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cifar_ray GradCAM report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}img{{max-width:100%}}
figure{{margin:2em 0}}td{{padding:0 1em}}</style></head><body>
<h1>Misclassification analysis</h1>
<table>
<tr><td>checkpoint</td><td>{html.escape(summary['checkpoint'])}</td></tr>
<tr><td>split</td><td>{summary['split']} ({summary['images']} images)</td></tr>
<tr><td>accuracy</td><td>{summary['accuracy']:.4f}</td></tr>
<tr><td>mistakes</td><td>{summary['mistakes']} (the {summary['shown']} most confident shown)</td></tr>
<tr><td>GradCAM layer</td><td>{html.escape(summary['target_layer'])}</td></tr>
</table>
<h2>Most confused pairs</h2><ul>{confused or '<li>none</li>'}</ul>
{figures}
<p>Every mistake is listed in <a href="misclassified.json">misclassified.json</a>.</p>
</body></html>
"""
