"""A data set in memory, whatever it was read from, and what every stage needs to know of it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cifar_ray.errors import DataError

IMAGE_SIZE = 32


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of a data set's pixels in [0, 1]: CIFAR's fixed (SPECS), a
    class-folder set's from its training images; the model carries them."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class ImageArrays:
    """A data set in memory, whatever it was read from (these pickles, or class folders:
    image_folders.py)."""

    train_images: np.ndarray  # (N, 32, 32, 3) uint8, HWC as Albumentations wants
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    norm: Normalization
    # A validation set of its own (a class-folder set's val/), instead of a held-out split.
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None


def split_train_val(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into (train indices, validation indices)."""
    if val_size >= n:
        raise DataError(f"data.val_size ({val_size}) must be smaller than the {n} training images")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_size:]), np.sort(order[:val_size])
