"""The one way a command reads its data set: CIFAR's files (downloaded when missing) or class
folders, behind one call that returns ImageArrays."""

from __future__ import annotations

from cifar_ray.config import DataConfig
from cifar_ray.data.arrays import ImageArrays
from cifar_ray.data.cifar_files import ensure_dataset, read_cifar
from cifar_ray.data.image_folders import read_folders


def load_dataset(data: DataConfig) -> ImageArrays:
    """The data set `data` names: class folders (image_folders.py) or CIFAR's files."""
    if data.dataset == "folder":
        return read_folders(ensure_dataset(data.data_dir, "folder"))
    return read_cifar(ensure_dataset(data.data_dir, data.dataset), data.dataset)
