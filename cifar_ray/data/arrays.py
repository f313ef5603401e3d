"""A data set in memory, whatever it was read from, and what every stage needs to know of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from cifar_ray.errors import DataError

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

    train_images: np.ndarray  # (N, s, s, 3) uint8, HWC as Albumentations wants
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    norm: Normalization
    # A validation set of its own (a class-folder set's val/), instead of a held-out split.
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    @property
    def image_size(self) -> int:
        return self.train_images.shape[1]


def resized(arrays: ImageArrays, size: int) -> ImageArrays:
    """`arrays` with every image size x size: area averaging down, bilinear up (from what was
    read, so a search reads once at its largest size; data.sources)."""
    if arrays.image_size == size:
        return arrays
    return dataclasses.replace(
        arrays, train_images=resize_images(arrays.train_images, size),
        test_images=resize_images(arrays.test_images, size),
        val_images=None if arrays.val_images is None else resize_images(arrays.val_images, size))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N, s, s, 3) uint8 -> (N, size, size, 3) uint8."""
    import cv2

    how = cv2.INTER_AREA if size < images.shape[1] else cv2.INTER_LINEAR
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        out[i] = cv2.resize(image, (size, size), interpolation=how)
    return out


VAL_SHARE = 10  # data.val_size -1: a tenth of the training images (5,000 of CIFAR's 50,000)


def val_count(val_size: int, n: int) -> int:
    """The validation images data.val_size asks for out of `n` training images."""
    return max(min(1, n - 1), n // VAL_SHARE) if val_size < 0 else val_size


def split_train_val(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of the images `labels` label into (train indices, validation indices),
    stratified: each class gives validation its share, the largest remainders one more, and
    keeps one image at least. Written here: scikit-learn's splitter costs each trial 1.6 s of
    imports."""
    labels = np.asarray(labels)
    n = len(labels)
    if val_size >= n:
        raise DataError(f"data.val_size ({val_size}) must be smaller than the {n} training images")
    _, counts = np.unique(labels, return_counts=True)
    share = counts * val_size / n
    take = np.floor(share).astype(int)
    take[np.argsort(take - share, kind="stable")[:val_size - take.sum()]] += 1
    take = np.minimum(take, counts - 1)
    order = np.random.default_rng(seed).permutation(n)
    by_class = order[np.argsort(labels[order], kind="stable")]  # shuffled within each class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    val = np.sort(np.concatenate([by_class[s:s + k] for s, k in zip(starts, take)]))
    return np.setdiff1d(np.arange(n), val), val
