"""The augmentation recipe, in two engines (`augment.engine`): normalise -> pad to `pad_to`
with 0 (the mean) -> random crop back to the image's size -> flip with `flip_p` -> with
`cutout_p`, one `cutout_size` hole filled with 0; pad and hole grow with the image (`scaled`).
albumentations: per image, in DataLoader workers; tensors: a whole batch in a few ops on the
device; auto: tensors on CUDA."""

from __future__ import annotations

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2

from cifar_ray.config import AugmentConfig
from cifar_ray.data.arrays import Normalization


def scaled(aug: AugmentConfig, size: int) -> tuple[int, int]:
    """(the padded side, the cutout's side) for `size`-pixel images: `pad_to` and
    `cutout_size` are written for 32 pixels and grow with the image."""
    pad_to = size + round((aug.pad_to - 32) * size / 32)
    return pad_to, min(size, max(1, round(aug.cutout_size * size / 32)))


def train_transform(aug: AugmentConfig, norm: Normalization, seed: int | None = None,
                    size: int = 32) -> A.Compose:
    """The reference recipe. Normalising first makes 0 the data set's mean, so the padding and
    the cutout hole, both filled with 0, are filled with the mean."""
    pad_to, cutout = scaled(aug, size)
    hole = (cutout, cutout)
    return A.Compose([
        A.Normalize(mean=norm.mean, std=norm.std, max_pixel_value=255.0),
        A.PadIfNeeded(min_height=pad_to, min_width=pad_to,
                      border_mode=cv2.BORDER_CONSTANT, fill=0),
        A.RandomCrop(height=size, width=size),
        A.HorizontalFlip(p=aug.flip_p),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=hole, hole_width_range=hole,
                        fill=0, p=aug.cutout_p),
        ToTensorV2(),
    ], strict=True, seed=seed)


def eval_transform(norm: Normalization) -> A.Compose:
    return A.Compose([A.Normalize(mean=norm.mean, std=norm.std, max_pixel_value=255.0),
                      ToTensorV2()], strict=True)


class Standardize(torch.nn.Module):
    """(B, 3, H, W) pixels in [0, 1] -> per channel (x - mean) / std: the one normalisation of
    the tensor engine, predict, GradCAM's pictures and export (Albumentations' is the same)."""

    def __init__(self, norm: Normalization):
        super().__init__()
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def inverse(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.std + self.mean


def denormalize(images: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, H, W, 3) floats in [0, 1], for plotting."""
    return Standardize(norm).inverse(images.cpu().float()).clamp(0, 1).permute(0, 2, 3, 1)


def reseed_worker(worker_id: int) -> None:
    """Albumentations keeps its own RNG, which forked DataLoader workers would all inherit in
    the same state (the same crops in every worker). Reseed it from torch's per-worker seed."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)


def normalize(images: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32, normalised (Standardize)."""
    return Standardize(norm).to(images.device)(images.float() / 255)


def augment_batch(images: torch.Tensor, aug: AugmentConfig, norm: Normalization,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, s, s) uint8 on any device -> augmented, normalised (B, 3, s, s) float32."""
    b, _, h, w = images.shape
    pad_to, cutout = scaled(aug, h)
    device = images.device
    x = normalize(images, norm)

    def uniform_ints(high: int) -> torch.Tensor:  # (B,) ints in [0, high]
        return torch.randint(0, high + 1, (b,), device=device, generator=generator)

    def coin(p: float) -> torch.Tensor:  # (B,) bools, True with probability p
        return torch.rand(b, device=device, generator=generator) < p

    # Pad and crop in one gather: output (i, j) reads source (top + i, left + j), 0 outside.
    pad_top, pad_left = max(0, pad_to - h) // 2, max(0, pad_to - w) // 2
    top = uniform_ints(max(0, pad_to - h)) - pad_top  # (B,)
    left = uniform_ints(max(0, pad_to - w)) - pad_left
    rows = top[:, None] + torch.arange(h, device=device)  # (B, H) source rows
    cols = left[:, None] + torch.arange(w, device=device)  # (B, W) source columns
    cols = torch.where(coin(aug.flip_p)[:, None], cols.flip(1), cols)  # flip after the crop
    inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
    gathered = x[torch.arange(b, device=device)[:, None, None], :,
                 rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # (B, H, W, 3)
    x = gathered.permute(0, 3, 1, 2) * inside[:, None]  # (B, 3, H, W), padding = 0 = the mean

    # Cutout: one size x size hole per chosen image, fully inside it.
    size = min(cutout, h, w)
    y0, x0 = uniform_ints(h - size)[:, None], uniform_ints(w - size)[:, None]
    ys, xs = torch.arange(h, device=device)[None], torch.arange(w, device=device)[None]
    hole = (((ys >= y0) & (ys < y0 + size))[:, :, None] & ((xs >= x0) & (xs < x0 + size))[:, None, :])
    hole &= coin(aug.cutout_p)[:, None, None]
    return x.masked_fill(hole[:, None], 0.0)
