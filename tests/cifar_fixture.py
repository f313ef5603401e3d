"""Small data sets in the exact on-disk format of the official CIFAR "python version".

The official batch files are Python 2 pickles (protocol 2): dict keys and strings are Python 2
`str`, i.e. raw bytes written with the BINSTRING opcodes, and the image array is pickled through
`numpy.core.multiarray._reconstruct`. `_Py2Pickler` writes exactly that, so the reader is tested
against what the real files contain, not against a Python 3 re-pickling.

The images carry a planted signal: a solid patch of a class-specific colour at a random place on
low-contrast noise. A model that learns must beat chance by far; `boxes` records where each
patch is, which the GradCAM tests use.
"""

from __future__ import annotations

import colorsys
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PATCH = 10


class _Py2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        # numpy 2 moved numpy.core to numpy._core; the official files name the old module.
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


@dataclass
class Planted:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 2): top-left (row, col) of each image's patch


def class_colours(num_classes: int) -> np.ndarray:
    hues = np.arange(num_classes) / num_classes
    return np.array([colorsys.hsv_to_rgb(h, 1.0, 1.0) for h in hues]) * 255


def planted_images(n: int, num_classes: int, seed: int) -> Planted:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = rng.normal(110, 25, size=(n, 32, 32, 3))
    boxes = rng.integers(0, 32 - PATCH + 1, size=(n, 2))
    colours = class_colours(num_classes)
    for i, (r, c) in enumerate(boxes):
        images[i, r:r + PATCH, c:c + PATCH] = colours[labels[i]]
    return Planted(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64), boxes)


def _batch(planted: Planted, label_key: bytes, name: str) -> dict:
    data = planted.images.transpose(0, 3, 1, 2).reshape(len(planted.images), 3072)  # R, G, B planes
    return {
        b"batch_label": name.encode(),
        label_key: [int(v) for v in planted.labels],
        b"data": np.ascontiguousarray(data),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(data))],
    }


def write_cifar10(root: Path, n_train: int = 500, n_test: int = 200, num_classes: int = 10,
                  seed: int = 0, test_label_noise: float = 0.0) -> tuple[Path, Planted, Planted]:
    """Write `root/cifar-10-batches-py/`; return (folder, train data, test data).

    `test_label_noise` relabels that fraction of the test images at random, so that even a
    perfect model makes mistakes for the GradCAM stage to show."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = planted_images(n_train, num_classes, seed)
    test = planted_images(n_test, num_classes, seed + 1)
    noisy = np.random.default_rng(seed + 2).random(n_test) < test_label_noise
    test.labels[noisy] = (test.labels[noisy] + 1) % num_classes
    names = [f"class_{k}".encode() for k in range(num_classes)]
    dump_py2({b"num_cases_per_batch": n_train // 5, b"label_names": names, b"num_vis": 3072},
             folder / "batches.meta")
    for k, part in enumerate(np.array_split(np.arange(n_train), 5)):
        sub = Planted(train.images[part], train.labels[part], train.boxes[part])
        dump_py2(_batch(sub, b"labels", f"training batch {k + 1} of 5"), folder / f"data_batch_{k + 1}")
    dump_py2(_batch(test, b"labels", "testing batch 1 of 1"), folder / "test_batch")
    return folder, train, test


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = planted_images(n_train, 100, seed), planted_images(n_test, 100, seed + 1)
    dump_py2({b"fine_label_names": [f"fine_{k}".encode() for k in range(100)],
              b"coarse_label_names": [f"coarse_{k}".encode() for k in range(20)]}, folder / "meta")
    for name, planted in (("train", train), ("test", test)):
        batch = _batch(planted, b"fine_labels", name)
        batch[b"coarse_labels"] = [v // 5 for v in batch[b"fine_labels"]]
        dump_py2(batch, folder / name)
    return folder


FOLDER_CLASSES = ["apple", "boat", "cloud", "daisy"]


def write_class_folders(root: Path, n_train: int = 240, n_test: int = 80, n_val: int = 0,
                        seed: int = 0) -> dict[str, Planted]:
    """A class-folder data set (torchvision's ImageFolder layout) with the planted signal:
    `root/train/<class>/`, `root/test/<class>/` (and `root/val/<class>/` when n_val > 0).

    What a user's folders hold: PNG and JPEG mixed, sizes other than 32x32 (each image scaled
    up by a whole factor, so area resampling gives the planted image back), one grayscale and
    one RGBA image, and files that are not images (`notes.txt`, `.DS_Store`). Returns the
    planted images per split, in the order of `sorted(paths)` within each class."""
    root = Path(root)
    out = {}
    splits = [("train", n_train, seed), ("test", n_test, seed + 1)]
    if n_val:
        splits.append(("val", n_val, seed + 2))
    for split, n, split_seed in splits:
        planted = planted_images(n, len(FOLDER_CLASSES), split_seed)
        for i, (image, label) in enumerate(zip(planted.images, planted.labels)):
            folder = root / split / FOLDER_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(image).resize((32 * (1 + i % 3), 32 * (1 + i % 3)),
                                                    Image.Resampling.NEAREST)
            if i == 0:
                picture.convert("L").save(folder / f"{i:05d}.png")
            elif i == 1:
                picture.convert("RGBA").save(folder / f"{i:05d}.png")
            elif i % 2:  # high-quality JPEG: the planted colours survive it
                picture.save(folder / f"{i:05d}.jpg", quality=95)
            else:
                picture.save(folder / f"{i:05d}.png")
        out[split] = planted
    (root / "train" / FOLDER_CLASSES[0] / "notes.txt").write_text("not an image\n")
    (root / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "test" / FOLDER_CLASSES[1] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return out


STRIPE_CLASSES = ["across", "down"]


def stripes(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 image whose class is fine detail: stripes 2 pixels wide (period
    4), across (horizontal) or down (vertical), at an even offset, over noise. Area resampling
    to half the size keeps them as 1-pixel stripes; to a quarter it averages every 4x4 block
    to the same grey: the class is gone at 32 pixels from 128, kept at 64."""
    offset = 2 * int(rng.integers(0, 2))
    on = ((np.arange(size) + offset) % 4 < 2)[:, None].repeat(size, 1)  # rows 0, 1 on: across
    pattern = on if label == 0 else on.T
    grey = 128 + 60 * np.where(pattern, 1, -1) + rng.normal(0, 12, (size, size))
    image = grey[:, :, None] + rng.integers(-20, 21, 3)[None, None]  # a tint per image
    return np.clip(image, 0, 255).astype(np.uint8)


def write_stripes(root: Path, n_train: int = 200, n_test: int = 100, n_val: int = 60,
                  size: int = 128, seed: int = 0) -> Path:
    """A class-folder set (PNG, `size` pixels) whose two classes differ only in fine detail
    (`stripes`); train/, val/ and test/, classes balanced."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            folder = Path(root) / split / STRIPE_CLASSES[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(stripes(i % 2, size, rng)).save(folder / f"{i:05d}.png")
    return Path(root)
