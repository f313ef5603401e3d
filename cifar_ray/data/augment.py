"""The augmentation recipe, in two engines (`augment.engine`): with `color_p`, brightness and
contrast on the pixels -> normalise -> pad to `pad_to` with 0 (the mean) -> random crop -> flip
with `flip_p`, upside down with `vflip_p` -> turn by 90, 180 or 270 degrees with `rot90_p` -> with
`affine_p`, rotate and scale about the centre, corners 0 -> with `cutout_p`, one `cutout_size`
hole of 0; pad and hole grow with the image (`scaled`); a step at probability 0 draws nothing.
albumentations: per image, in DataLoader workers; tensors: a batch in a few ops on the device."""

from __future__ import annotations

import albumentations as A
import cv2
import torch
import torch.nn.functional as F
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
    """The reference recipe. Normalising first makes 0 the data set's mean, so the padding, the
    affine's corners and the cutout hole, all filled with 0, are filled with the mean."""
    pad_to, cutout = scaled(aug, size)
    hole = (cutout, cutout)
    color = [A.RandomBrightnessContrast(brightness_limit=aug.brightness,
                                        contrast_limit=aug.contrast, brightness_by_max=True,
                                        p=aug.color_p)]
    # k in {1, 2, 3} (RandomRotate90 would draw k = 0 too), exact and picklable, unlike A.Lambda.
    rot90 = [A.OneOf([A.Sequential([A.Transpose(p=1), A.VerticalFlip(p=1)]),
                      A.Sequential([A.HorizontalFlip(p=1), A.VerticalFlip(p=1)]),
                      A.Sequential([A.Transpose(p=1), A.HorizontalFlip(p=1)])], p=aug.rot90_p)]
    # keep_ratio: one scale for both axes; balanced_scale off: uniform on [1 - s, 1 + s].
    affine = [A.Affine(rotate=(-aug.rotate, aug.rotate), scale=(1 - aug.scale, 1 + aug.scale),
                       keep_ratio=True, balanced_scale=False, interpolation=cv2.INTER_LINEAR,
                       border_mode=cv2.BORDER_CONSTANT, fill=0, p=aug.affine_p)]
    return A.Compose([
        *(color if aug.color_p > 0 else []),
        A.Normalize(mean=norm.mean, std=norm.std, max_pixel_value=255.0),
        A.PadIfNeeded(min_height=pad_to, min_width=pad_to,
                      border_mode=cv2.BORDER_CONSTANT, fill=0),
        A.RandomCrop(height=size, width=size),
        A.HorizontalFlip(p=aug.flip_p),
        *([A.VerticalFlip(p=aug.vflip_p)] if aug.vflip_p > 0 else []),
        *(rot90 if aug.rot90_p > 0 else []),
        *(affine if aug.affine_p > 0 else []),
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

    def uniform_ints(high: int) -> torch.Tensor:  # (B,) ints in [0, high]
        return torch.randint(0, high + 1, (b,), device=device, generator=generator)

    def coin(p: float) -> torch.Tensor:  # (B,) bools, True with probability p
        return torch.rand(b, device=device, generator=generator) < p

    def spread(half_width: float) -> torch.Tensor:
        return (torch.rand(b, device=device, generator=generator) * 2 - 1) * half_width

    def per_image(chosen: torch.Tensor, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.where(chosen.view(b, 1, 1, 1), changed, x)

    x = images.float() / 255
    if aug.color_p > 0:
        chosen, alpha, beta = coin(aug.color_p), 1 + spread(aug.contrast), spread(aug.brightness)
        x = per_image(chosen, (x * alpha.view(b, 1, 1, 1) + beta.view(b, 1, 1, 1)).clamp(0, 1), x)
    x = Standardize(norm).to(device)(x)

    # Pad and crop in one gather: output (i, j) reads source (top + i, left + j), 0 outside.
    pad_top, pad_left = max(0, pad_to - h) // 2, max(0, pad_to - w) // 2
    top = uniform_ints(max(0, pad_to - h)) - pad_top  # (B,)
    left = uniform_ints(max(0, pad_to - w)) - pad_left
    rows = top[:, None] + torch.arange(h, device=device)  # (B, H) source rows
    cols = left[:, None] + torch.arange(w, device=device)  # (B, W) source columns
    cols = torch.where(coin(aug.flip_p)[:, None], cols.flip(1), cols)  # flip after the crop
    if aug.vflip_p > 0:
        rows = torch.where(coin(aug.vflip_p)[:, None], rows.flip(1), rows)
    inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
    gathered = x[torch.arange(b, device=device)[:, None, None], :,
                 rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # (B, H, W, 3)
    x = gathered.permute(0, 3, 1, 2) * inside[:, None]  # (B, 3, H, W), padding = 0 = the mean

    if aug.rot90_p > 0:
        turns = torch.where(coin(aug.rot90_p), uniform_ints(2) + 1, 0)  # 0: not turned
        for k in (1, 2, 3):
            x = per_image(turns == k, x.rot90(k, (2, 3)), x)
    if aug.affine_p > 0:  # theta maps output to source: the inverse of Albumentations' matrix
        chosen, angle = coin(aug.affine_p), torch.deg2rad(spread(aug.rotate))
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(b, 2, 3)
        grid = F.affine_grid(theta / (1 + spread(aug.scale)).view(b, 1, 1), list(x.shape),
                             align_corners=False)
        x = per_image(chosen, F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=False), x)

    # Cutout: one size x size hole per chosen image, fully inside it.
    size = min(cutout, h, w)
    y0, x0 = uniform_ints(h - size)[:, None], uniform_ints(w - size)[:, None]
    ys, xs = torch.arange(h, device=device)[None], torch.arange(w, device=device)[None]
    hole = (((ys >= y0) & (ys < y0 + size))[:, :, None] & ((xs >= x0) & (xs < x0 + size))[:, None, :])
    hole &= coin(aug.cutout_p)[:, None, None]
    return x.masked_fill(hole[:, None], 0.0)
