"""CIFAR data: download, safe reading and validation, the train/val split, augmentation, DataModule.

Data flow: `<data_dir>/cifar-10-batches-py/*` (pickled batches) -> `read_cifar` -> uint8 arrays
(N, 32, 32, 3) in memory -> `split_train_val` -> `ImageArrayDataset` + Albumentations -> batches
of normalised float tensors (B, 3, 32, 32).

The official files are Python 2 pickles. Unpickling can run code, so `_SafeUnpickler` accepts
only the handful of globals a numpy array needs: a tampered batch file is refused, not executed.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from cifar_ray.config import AugmentConfig, Config, DataConfig
from cifar_ray.errors import DataError
from cifar_ray.gpu_augment import DeviceBatches, augment_batch, normalize
from cifar_ray.pl import pl

IMAGE_SIZE = 32


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set lives on disk and how its pickles are keyed (torchvision has the facts)."""

    name: str
    source: type  # the torchvision class whose url / md5 / file list we reuse
    labels_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def folder(self) -> str:
        return self.source.base_folder

    @property
    def train_files(self) -> list[str]:
        return [name for name, _md5 in self.source.train_list]

    @property
    def test_files(self) -> list[str]:
        return [name for name, _md5 in self.source.test_list]

    @property
    def meta_file(self) -> str:
        return self.source.meta["filename"]

    @property
    def meta_key(self) -> str:
        return self.source.meta["key"]


SPECS = {
    "cifar10": DatasetSpec("cifar10", CIFAR10, "labels",
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec("cifar100", CIFAR100, "fine_labels",
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class CifarArrays:
    train_images: np.ndarray  # (N, 32, 32, 3) uint8, HWC as Albumentations wants
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


# ---------------------------------------------------------------------------------------------
# Download


def ensure_dataset(data_dir: str | Path, dataset: str) -> Path:
    """Return the data set's folder, downloading and md5-checking the archive if it is missing.

    An existing folder is used as it is (it may be a user's own set in this format); `read_cifar`
    validates it. Extraction goes to a temporary folder renamed into place, so an interrupted
    download never leaves a half-written data set behind.
    """
    spec = SPECS[dataset]
    data_dir = Path(data_dir).expanduser().resolve()
    folder = data_dir / spec.folder
    if folder.is_dir():
        return folder
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".extract-") as tmp:
            download_and_extract_archive(spec.source.url, download_root=str(data_dir),
                                         extract_root=tmp, filename=spec.source.filename,
                                         md5=spec.source.tgz_md5)
            os.replace(Path(tmp) / spec.folder, folder)
    except (URLError, OSError, RuntimeError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"{spec.folder} not found in {data_dir} and the download from {spec.source.url} "
            f"failed ({reason}); without network, extract {spec.source.filename} so that "
            f"{folder} holds its files"
        ) from None
    return folder


# ---------------------------------------------------------------------------------------------
# Reading and validation


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of lists, strings and numpy arrays) and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):  # noqa: D102 (pickle's hook)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file missing")
    try:
        with open(path, "rb") as f:
            # latin1: the official files are Python 2 pickles whose strings are raw bytes.
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: not a CIFAR batch file ({exc})") from None
    except Exception as exc:  # truncated or garbage files fail in many ways inside pickle
        raise DataError(f"{path}: cannot be read, truncated or corrupt ({type(exc).__name__})") \
            from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _read_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    for key in ("data", labels_key):
        if key not in batch:
            raise DataError(f"{path}: missing key '{key}'")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        got = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be an N x 3072 uint8 array, got {got}")
    try:
        labels = np.asarray(batch[labels_key])
        labels = labels.astype(np.int64) if labels.size == 0 else labels  # [] reads as float
    except Exception:
        labels = np.asarray([[]], dtype=object)  # ragged or odd: reported just below
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: '{labels_key}' must be a list of ints")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: label {int(labels.max() if labels.max() >= num_classes else labels.min())} "
                        f"out of range for the {num_classes} classes in the meta file")
    # Rows are 1024 red, then 1024 green, then 1024 blue values: -> (N, 32, 32, 3).
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_cifar(folder: str | Path, dataset: str) -> CifarArrays:
    """Read and validate a folder in the official python-pickle format; DataError if anything is off."""
    spec = SPECS[dataset]
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder missing")
    meta_path = folder / spec.meta_file
    meta = _unpickle(meta_path)
    classes = meta.get(spec.meta_key)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{meta_path}: '{spec.meta_key}' must be a non-empty list of class names")

    def read_split(files: list[str], split: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_batch(folder / name, spec.labels_key, len(classes)) for name in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if len(images) == 0:
            raise DataError(f"{folder}: the {split} split is empty")
        return images, labels

    train_x, train_y = read_split(spec.train_files, "train")
    test_x, test_y = read_split(spec.test_files, "test")
    return CifarArrays(train_x, train_y, test_x, test_y, classes)


def load_dataset(data: DataConfig) -> CifarArrays:
    return read_cifar(ensure_dataset(data.data_dir, data.dataset), data.dataset)


def split_train_val(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into (train indices, validation indices)."""
    if val_size >= n:
        raise DataError(f"data.val_size ({val_size}) must be smaller than the {n} training images")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


# ---------------------------------------------------------------------------------------------
# Augmentation


def train_transform(aug: AugmentConfig, spec: DatasetSpec, seed: int | None = None) -> A.Compose:
    """The reference recipe. Normalising first makes 0 the data set's mean, so the padding and
    the cutout hole, both filled with 0, are filled with the mean."""
    hole = (aug.cutout_size, aug.cutout_size)
    return A.Compose([
        A.Normalize(mean=spec.mean, std=spec.std, max_pixel_value=255.0),
        A.PadIfNeeded(min_height=aug.pad_to, min_width=aug.pad_to,
                      border_mode=cv2.BORDER_CONSTANT, fill=0),
        A.RandomCrop(height=IMAGE_SIZE, width=IMAGE_SIZE),
        A.HorizontalFlip(p=aug.flip_p),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=hole, hole_width_range=hole,
                        fill=0, p=aug.cutout_p),
        ToTensorV2(),
    ], strict=True, seed=seed)


def eval_transform(spec: DatasetSpec) -> A.Compose:
    return A.Compose([A.Normalize(mean=spec.mean, std=spec.std, max_pixel_value=255.0),
                      ToTensorV2()], strict=True)


def denormalize(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, H, W, 3) floats in [0, 1], for plotting."""
    spec = SPECS[dataset]
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (images.cpu().float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


class ImageArrayDataset(Dataset):
    """uint8 HWC images held in memory, transformed one at a time by Albumentations."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: A.Compose):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.images[index])["image"], int(self.labels[index])


def _reseed_worker(worker_id: int) -> None:
    """Albumentations keeps its own RNG, which forked DataLoader workers would all inherit in
    the same state (the same crops in every worker). Reseed it from torch's per-worker seed."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CifarDataModule(pl.LightningDataModule):
    """Train / validation / test loaders for one run. `data.val_size=0` trains on the whole
    training set and validates on nothing (the retrain after a search)."""

    def __init__(self, cfg: Config, arrays: CifarArrays | None = None):
        super().__init__()
        self.cfg = cfg
        self.spec = SPECS[cfg.data.dataset]
        self.arrays = arrays
        self.train_set = self.val_set = self.test_set = None

    @property
    def classes(self) -> list[str]:
        return self.arrays.classes

    def prepare_data(self) -> None:
        ensure_dataset(self.cfg.data.data_dir, self.cfg.data.dataset)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.arrays is None:
            self.arrays = load_dataset(self.cfg.data)
        d, arrays = self.cfg.data, self.arrays
        if d.val_size:
            train_idx, val_idx = split_train_val(len(arrays.train_labels), d.val_size,
                                                 self.cfg.trainer.seed)
        else:
            train_idx, val_idx = np.arange(len(arrays.train_labels)), np.arange(0)
        if d.limit_train:
            train_idx = train_idx[: d.limit_train]
        evaluate = eval_transform(self.spec)
        self.train_set = ImageArrayDataset(arrays.train_images[train_idx],
                                           arrays.train_labels[train_idx],
                                           train_transform(self.cfg.augment, self.spec,
                                                           seed=self.cfg.trainer.seed))
        self.val_set = ImageArrayDataset(arrays.train_images[val_idx],
                                         arrays.train_labels[val_idx], evaluate)
        self.test_set = ImageArrayDataset(arrays.test_images, arrays.test_labels, evaluate)

    def on_device(self) -> bool:
        """Whether batches come from the device and are augmented there (gpu_augment.py)."""
        runs_on = self.cfg.augment.runs_on
        if runs_on == "auto":
            return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return runs_on == "gpu"

    def _device_batches(self, dataset: ImageArrayDataset, shuffle: bool) -> DeviceBatches:
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        images = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DeviceBatches(images.to(device), torch.from_numpy(dataset.labels).long().to(device),
                             self.cfg.trainer.batch_size, shuffle, seed=self.cfg.trainer.seed,
                             rank=rank, world=world)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Device batches arrive as uint8: augment (training) or just normalise them here."""
        x, y = batch
        if x.dtype == torch.uint8:
            if self.trainer is not None and self.trainer.training:
                x = augment_batch(x, self.cfg.augment, self.spec.mean, self.spec.std)
            else:
                x = normalize(x, self.spec.mean, self.spec.std)
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def num_workers(self) -> int:
        n = self.cfg.data.num_workers
        return min(available_cpus(), 8) if n < 0 else n

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        workers = self.num_workers()
        return DataLoader(dataset, batch_size=self.cfg.trainer.batch_size, shuffle=shuffle,
                          num_workers=workers, persistent_workers=workers > 0,
                          worker_init_fn=_reseed_worker, pin_memory=torch.cuda.is_available())

    def _batches(self, dataset: ImageArrayDataset, shuffle: bool) -> DataLoader | DeviceBatches:
        if self.on_device():
            return self._device_batches(dataset, shuffle)
        return self._loader(dataset, shuffle)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._batches(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches | list:
        return self._batches(self.val_set, shuffle=False) if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._batches(self.test_set, shuffle=False)
