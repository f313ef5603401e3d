"""From arrays to batches: ImageArrays -> split -> one of two engines (data/augment.py):
Albumentations in DataLoader workers, or DeviceBatches on the training device augmented in
`on_after_batch_transfer` -> (B, 3, 32, 32) float32 batches for the module."""

from __future__ import annotations

import math
import os
import sys
from typing import Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from cifar_ray.config import TTA_VIEWS, Config
from cifar_ray.data.arrays import (
    ImageArrays,
    Normalization,
    resized,
    split_train_val,
    val_count,
)
from cifar_ray.data.augment import (
    augment_batch,
    eval_transform,
    normalize,
    reseed_worker,
    train_transform,
)
from cifar_ray.data.cifar_files import ensure_dataset
from cifar_ray.data.sources import load_dataset
from cifar_ray.pl import pl


class ImageArrayDataset(Dataset):
    """uint8 HWC images held in memory, transformed one at a time by Albumentations."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: A.Compose):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.images[index])["image"], int(self.labels[index])


# Evaluation batches hold at least this many images: the size changes nothing but the number
# of steps, and on a GPU a small step costs its kernel launches more than its arithmetic.
EVAL_BATCH = 1024


def drop_partial(images: int, batch_size: int) -> bool:
    """Whether training drops each epoch's last, partial batch (when there is a full one):
    every step the same shape, no BatchNorm statistics from a handful of images."""
    return images >= batch_size


class DeviceBatches:
    """Batches of (uint8 images, labels) sliced from tensors already on the training device,
    shuffled anew each epoch from `seed`; under DDP each rank takes every `world`-th image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 weights: torch.Tensor | None = None):
        self.images, self.labels = images, labels  # (N, 3, s, s) uint8, (N,) int64
        self.weights = weights  # (N,) on the CPU: each epoch draws N images by them (balanced)
        self.batch_size, self.shuffle, self.rank, self.world = batch_size, shuffle, rank, world
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.count = len(range(rank, len(labels), world))  # this rank's images
        self.drop_last = shuffle and drop_partial(self.count, batch_size)

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return rounding(self.count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        elif self.shuffle:
            order = torch.randperm(n, generator=self.generator)
        else:
            order = torch.arange(n)
        order = order[self.rank::self.world].to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.images[index], self.labels[index]


def split_arrays(arrays: ImageArrays, split: str, val_size: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of "train", "val" or "test". A data set's own val/ is the validation
    set (train + val/ are trained on when `val_size` is 0); else `val_size` training images
    (-1: a tenth), stratified, drawn with `seed`."""
    if split == "test":
        return arrays.test_images, arrays.test_labels
    if arrays.val_images is not None:
        if split == "val":
            return (arrays.val_images, arrays.val_labels) if val_size else \
                (arrays.val_images[:0], arrays.val_labels[:0])
        if val_size:
            return arrays.train_images, arrays.train_labels
        return (np.concatenate([arrays.train_images, arrays.val_images]),
                np.concatenate([arrays.train_labels, arrays.val_labels]))
    if val_size:
        count = val_count(val_size, len(arrays.train_labels))
        train_idx, val_idx = split_train_val(arrays.train_labels, count, seed)
    else:
        train_idx, val_idx = np.arange(len(arrays.train_labels)), np.arange(0)
    index = train_idx if split == "train" else val_idx
    return arrays.train_images[index], arrays.train_labels[index]


def balanced_weights(labels: np.ndarray) -> torch.Tensor:
    """(N,) sampling weights that make each class equally likely: 1 / its count."""
    labels = torch.from_numpy(np.asarray(labels)).long()
    return 1.0 / torch.bincount(labels).double()[labels]


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CifarDataModule(pl.LightningDataModule):
    """Train / validation / test loaders for one run (validation: see `split_arrays`)."""

    def __init__(self, cfg: Config, arrays: ImageArrays | None = None):
        super().__init__()
        self.cfg = cfg
        self.arrays = arrays
        self.train_set = self.val_set = self.test_set = None

    @property
    def classes(self) -> list[str]:
        return self.arrays.classes

    @property
    def norm(self) -> Normalization:
        return self.arrays.norm

    def prepare_data(self) -> None:
        ensure_dataset(self.cfg.data.data_dir, self.cfg.data.dataset)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.arrays is None:
            self.arrays = load_dataset(self.cfg.data)
        d = self.cfg.data
        # A search reads once at its largest size; each trial takes the size it samples.
        self.arrays = arrays = resized(self.arrays, d.image_size)
        train_x, train_y = split_arrays(arrays, "train", d.val_size, self.cfg.trainer.seed)
        val_x, val_y = split_arrays(arrays, "val", d.val_size, self.cfg.trainer.seed)
        if arrays.val_images is None and len(val_y) * 2 > len(train_y):
            print(f"warning: validation holds {len(val_y):,} images, more than a third of the "
                  f"{len(train_y) + len(val_y):,} it was split from: the model trains on "
                  f"{len(train_y):,} (data.val_size -1 holds out a tenth)", file=sys.stderr,
                  flush=True)
        if d.limit_train:
            train_x, train_y = train_x[: d.limit_train], train_y[: d.limit_train]
        evaluate = eval_transform(self.norm)
        self.train_set = ImageArrayDataset(train_x, train_y,
                                           train_transform(self.cfg.augment, self.norm,
                                                           seed=self.cfg.trainer.seed,
                                                           size=d.image_size))
        self.val_set = ImageArrayDataset(val_x, val_y, evaluate)
        self.test_set = ImageArrayDataset(arrays.test_images, arrays.test_labels, evaluate)

    def train_images_per_epoch(self) -> int:
        """Images trained on per epoch: the training set less the dropped partial batch."""
        n, batch = len(self.train_set), self.cfg.trainer.batch_size
        return n // batch * batch if drop_partial(n, batch) else n

    def on_device(self) -> bool:
        """Whether batches come from the device and are augmented there (augment.py's tensor
        engine), or from DataLoader workers running Albumentations."""
        engine = self.cfg.augment.engine
        if engine == "auto":
            return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return engine == "tensors"

    def batch_size(self, shuffle: bool) -> int:
        """Training batches (shuffled) are the config's size; evaluation's at least EVAL_BATCH
        images, each view of eval.tta counted (model.averaged_views passes them at once)."""
        batch = self.cfg.trainer.batch_size
        return batch if shuffle else max(1, max(batch, EVAL_BATCH) // TTA_VIEWS[self.cfg.eval.tta])

    def sample_weights(self, dataset: ImageArrayDataset, shuffle: bool) -> torch.Tensor | None:
        """data.balance "sampler": training batches drawn with each class equally likely."""
        return balanced_weights(dataset.labels) if shuffle and self.cfg.data.balance == "sampler" \
            else None

    def _device_batches(self, dataset: ImageArrayDataset, shuffle: bool) -> DeviceBatches:
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        images = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).contiguous()  # (N, 3, s, s)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DeviceBatches(images.to(device), torch.from_numpy(dataset.labels).long().to(device),
                             self.batch_size(shuffle), shuffle, seed=self.cfg.trainer.seed,
                             rank=rank, world=world, weights=self.sample_weights(dataset, shuffle))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Device batches arrive as uint8: augment (training) or just normalise them here."""
        x, y = batch
        if x.dtype == torch.uint8:
            if self.trainer is not None and self.trainer.training:
                x = augment_batch(x, self.cfg.augment, self.norm)
            else:
                x = normalize(x, self.norm)
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def num_workers(self) -> int:
        n = self.cfg.data.num_workers
        return min(available_cpus(), 8) if n < 0 else n

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        workers, batch = self.num_workers(), self.batch_size(shuffle)
        weights = self.sample_weights(dataset, shuffle)
        sampler = None if weights is None else WeightedRandomSampler(
            weights, len(dataset), generator=torch.Generator().manual_seed(self.cfg.trainer.seed))
        return DataLoader(dataset, batch_size=batch, shuffle=shuffle and sampler is None,
                          sampler=sampler,
                          drop_last=shuffle and drop_partial(len(dataset), batch),
                          num_workers=workers, persistent_workers=workers > 0,
                          worker_init_fn=reseed_worker, pin_memory=torch.cuda.is_available())

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
