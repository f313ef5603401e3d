"""Classify image files with a checkpoint:
`python -m cifar_ray.predict --checkpoint C IMAGE... [--top-k K] [--json]`. Each file is read
as training read its data (image_folders.read_image) and normalised with the checkpoint's
statistics; `classify` is the demo app's too."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from cifar_ray import cli
from cifar_ray.data.augment import normalize
from cifar_ray.data.image_folders import read_image
from cifar_ray.errors import UserError, cli_entry
from cifar_ray.module import LitResNet9, load_module
from cifar_ray.names import shown_name


def prepare(module: LitResNet9, images: np.ndarray) -> torch.Tensor:
    """(N, s, s, 3) uint8 -> the (N, 3, s, s) float batch the model was trained on."""
    return normalize(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2),  # a writable copy
                     module.normalization)


def probabilities(module: LitResNet9, batch: torch.Tensor) -> np.ndarray:
    """A prepared (N, 3, s, s) batch -> (N, classes) probabilities."""
    with torch.no_grad():
        return module(batch).exp().numpy()


def classify(module: LitResNet9, images: np.ndarray) -> np.ndarray:
    """(N, s, s, 3) uint8 images at the model's size -> (N, classes) probabilities."""
    return probabilities(module, prepare(module, images))


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """For each image, its k most probable (class, probability), most probable first."""
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[(classes[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("predict",
                        "Classify image files (any size, any common format) with a checkpoint.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint this project wrote")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show per image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    module = load_module(args.checkpoint)
    images = np.stack([read_image(path, module.image_size) for path in args.images])
    ranked = top_k(classify(module, images), module.class_names, args.top_k)
    if args.json:
        print(json.dumps([{"image": path, "top": [{"class": c, "probability": p} for c, p in top]}
                          for path, top in zip(args.images, ranked)], indent=2))
        return 0
    width = max(len(shown_name(c)) for c in module.class_names)
    for path, top in zip(args.images, ranked):
        print(shown_name(path, 4096))
        for rank, (name, p) in enumerate(top, 1):
            print(f"  {rank}. {shown_name(name):<{width}}  {p:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
