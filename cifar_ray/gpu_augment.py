"""The augmentation recipe on whole batches, with tensor ops on the training device.

Albumentations transforms one image at a time in Python, in DataLoader worker processes: about
5-8k images/s per CPU core, far below what one GPU trains on. Here the data set lives on the
device as uint8 and each batch is augmented in a handful of tensor ops, with the same recipe
and the same parameter meanings as `data.train_transform`:

  normalise -> pad to `pad_to` with 0 (the mean, after normalising) -> random 32x32 crop
  -> horizontal flip with `flip_p` -> with `cutout_p`, one `cutout_size` square hole, fully
  inside the image, filled with 0 (the mean)

Each image draws its own crop offset, flip and hole, as with Albumentations.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from cifar_ray.config import AugmentConfig


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32, per channel (x / 255 - mean) / std."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


def augment_batch(images: torch.Tensor, aug: AugmentConfig, mean: Sequence[float],
                  std: Sequence[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, 32, 32) uint8 on any device -> augmented, normalised (B, 3, 32, 32) float32."""
    b, _, h, w = images.shape
    device = images.device
    x = normalize(images, mean, std)

    def uniform_ints(high: int) -> torch.Tensor:  # (B,) ints in [0, high]
        return torch.randint(0, high + 1, (b,), device=device, generator=generator)

    def coin(p: float) -> torch.Tensor:  # (B,) bools, True with probability p
        return torch.rand(b, device=device, generator=generator) < p

    # Pad and crop in one gather: output pixel (i, j) of image k reads padded pixel
    # (top_k + i, left_k + j), i.e. source pixel (top_k + i - pad_top, ...), 0 outside the image.
    pad_top, pad_left = max(0, aug.pad_to - h) // 2, max(0, aug.pad_to - w) // 2
    top = uniform_ints(max(0, aug.pad_to - h)) - pad_top  # (B,)
    left = uniform_ints(max(0, aug.pad_to - w)) - pad_left
    rows = top[:, None] + torch.arange(h, device=device)  # (B, H) source rows
    cols = left[:, None] + torch.arange(w, device=device)  # (B, W) source columns
    cols = torch.where(coin(aug.flip_p)[:, None], cols.flip(1), cols)  # flip after the crop
    inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
    gathered = x[torch.arange(b, device=device)[:, None, None], :,
                 rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # (B, H, W, 3)
    x = gathered.permute(0, 3, 1, 2) * inside[:, None]  # (B, 3, H, W), padding = 0 = the mean

    # Cutout: one size x size hole per chosen image, fully inside it.
    size = min(aug.cutout_size, h, w)
    y0, x0 = uniform_ints(h - size)[:, None], uniform_ints(w - size)[:, None]
    ys, xs = torch.arange(h, device=device)[None], torch.arange(w, device=device)[None]
    hole = (((ys >= y0) & (ys < y0 + size))[:, :, None] & ((xs >= x0) & (xs < x0 + size))[:, None, :])
    hole &= coin(aug.cutout_p)[:, None, None]
    return x.masked_fill(hole[:, None], 0.0)


class DeviceBatches:
    """Batches of (uint8 images, labels) sliced from tensors already on the training device:
    no DataLoader processes, no host-to-device copy per batch. Shuffled anew each epoch from
    `seed`; under DDP each rank takes every `world`-th image of the shuffled order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.images, self.labels = images, labels  # (N, 3, 32, 32) uint8, (N,) int64
        self.batch_size, self.shuffle, self.rank, self.world = batch_size, shuffle, rank, world
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(range(self.rank, len(self.labels), self.world)) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order[self.rank::self.world].to(self.images.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.images[index], self.labels[index]
