"""The one way a command reads its data set: CIFAR's files (downloaded when missing) or class
folders, behind one call that returns ImageArrays at the size asked for."""

from __future__ import annotations

from cifar_ray.config import DataConfig
from cifar_ray.data.arrays import ImageArrays, resized
from cifar_ray.data.cifar_files import ensure_dataset, read_cifar
from cifar_ray.data.image_folders import read_folders


def load_dataset(data: DataConfig, image_size: int | None = None) -> ImageArrays:
    """The data set `data` names, its images `image_size` (default: data.image_size) square:
    class folders decoded at that size, CIFAR's 32-pixel files resized to it."""
    size = image_size or data.image_size
    if data.dataset == "folder":
        return read_folders(ensure_dataset(data.data_dir, "folder"), size=size)
    return resized(read_cifar(ensure_dataset(data.data_dir, data.dataset), data.dataset), size)
