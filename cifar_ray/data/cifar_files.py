"""The CIFAR data sets in the official python-pickle format: download, and a reading that runs
no code (`_SafeUnpickler` allows the globals a numpy array needs) and allocates no more than
the file holds."""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np

try:  # numpy 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

from cifar_ray.config import MAX_CLASS_NAME, MAX_CLASSES
from cifar_ray.data.arrays import ImageArrays, Normalization
from cifar_ray.errors import DataError

CIFAR_SIZE = 32  # the official files' images


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set lives on disk and how its pickles are keyed (torchvision has the facts)."""

    name: str
    source_name: str  # the torchvision class whose url / md5 / file list we reuse
    labels_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def source(self) -> type:
        # Imported when first needed: torch comes with it, and flags are checked before.
        import torchvision.datasets

        return getattr(torchvision.datasets, self.source_name)

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

    @property
    def norm(self) -> "Normalization":
        return Normalization(self.mean, self.std)


SPECS = {
    "cifar10": DatasetSpec("cifar10", "CIFAR10", "labels",
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec("cifar100", "CIFAR100", "fine_labels",
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def ensure_dataset(data_dir: str | Path, dataset: str) -> Path:
    """The data set's folder, downloaded, md5-checked and extracted (to a temporary folder
    renamed into place) if missing; an existing one is used as it is."""
    data_dir = Path(data_dir).expanduser().resolve()
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: a file, not a folder")
    if dataset == "folder":  # the user's own images: nothing to download
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: data folder missing (--dataset folder reads "
                            "train/<class>/<images> and test/<class>/<images> there)")
        return data_dir
    spec = SPECS[dataset]
    folder = data_dir / spec.folder
    if folder.is_dir():
        return folder
    from torchvision.datasets.utils import download_and_extract_archive

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




class _SafeUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts, lists, strings, numeric arrays) and nothing else, each
    array and string charged before it is made against `budget`, the file's own size."""

    _NDARRAY = object()  # stands for numpy.ndarray: an argument of _reconstruct, never called
    RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"),
                   ("numpy._core.multiarray", "_reconstruct")}

    def __init__(self, data: bytes):
        # latin1: the official files are Python 2 pickles whose strings are raw bytes.
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.data, self.budget = data, len(data)

    def load(self):
        # The C unpickler's memo is as long as the largest PUT index: one past the file's
        # size (an honest pickle numbers from 0) would allocate gigabytes.
        try:
            for opcode, arg, _ in pickletools.genops(self.data):
                if "PUT" in opcode.name and arg > len(self.data):
                    raise pickle.UnpicklingError(f"a memo index of {arg} in a "
                                                 f"{len(self.data)}-byte file")
        except ValueError as exc:  # pickletools' word for a malformed stream
            first = (str(exc).splitlines() or ["?"])[0]
            raise pickle.UnpicklingError(f"truncated or malformed pickle: {first}") from None
        return super().load()

    def charge(self, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise pickle.UnpicklingError("it declares more data than the file holds")

    def find_class(self, module: str, name: str):  # noqa: D102 (pickle's hook)
        if (module, name) in self.RECONSTRUCT:
            return self.reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return self._NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return numeric_dtype
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles store bytes
            return self.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def reconstruct(self, subtype, shape, dtype) -> np.ndarray:
        if subtype is not self._NDARRAY or not isinstance(shape, tuple) \
                or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError("not a plain numpy array")
        self.charge(math.prod(shape) * numeric_dtype(dtype).itemsize)
        return _reconstruct(np.ndarray, shape, dtype)

    def encode(self, text, encoding: str = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("not a byte string")
        self.charge(len(text))
        return text.encode("latin1")


def numeric_dtype(*args) -> np.dtype:
    """numpy.dtype, for booleans, integers and floats only (no objects, no records)."""
    try:
        dtype = np.dtype(*args[:1])
    except TypeError:
        raise pickle.UnpicklingError("not a numeric dtype") from None
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refusing dtype {dtype}")
    return dtype


def _unpickle(path: Path) -> dict:
    if path.is_dir():
        raise DataError(f"{path}: a folder, where a CIFAR batch file should be")
    if not path.is_file():
        raise DataError(f"{path}: file missing")
    try:
        obj = _SafeUnpickler(path.read_bytes()).load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: not a CIFAR batch file ({exc})") from None
    except MemoryError:
        raise DataError(f"{path}: not a CIFAR batch file (it declares more data than fits in "
                        "memory)") from None
    except Exception as exc:  # truncated or garbage files fail in many ways inside pickle
        raise DataError(f"{path}: cannot be read, truncated or corrupt ({type(exc).__name__})") \
            from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _labels(value) -> np.ndarray | None:
    """A batch's labels as int64, if they are a flat list of ints (or a 1-D int array)."""
    if isinstance(value, np.ndarray):
        return value.astype(np.int64) if value.ndim == 1 and value.dtype.kind in "iu" else None
    if isinstance(value, list) and all(type(v) is int for v in value):
        try:
            return np.asarray(value, dtype=np.int64)
        except OverflowError:
            return None
    return None


def _read_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    for key in ("data", labels_key):
        if key not in batch:
            raise DataError(f"{path}: missing key '{key}'")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * CIFAR_SIZE * CIFAR_SIZE:
        got = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be an N x 3072 uint8 array, got {got}")
    labels = _labels(batch[labels_key])
    if labels is None:
        raise DataError(f"{path}: '{labels_key}' must be a flat list of ints")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: label {int(labels.max() if labels.max() >= num_classes else labels.min())} "
                        f"out of range for the {num_classes} classes in the meta file")
    # Rows are 1024 red, then 1024 green, then 1024 blue values: -> (N, 32, 32, 3).
    images = data.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar(folder: str | Path, dataset: str) -> ImageArrays:
    """Read and validate a folder in the official python-pickle format; DataError if anything is off."""
    spec = SPECS[dataset]
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder missing")
    meta_path = folder / spec.meta_file
    meta = _unpickle(meta_path)
    classes = meta.get(spec.meta_key)
    if not isinstance(classes, list) or not 0 < len(classes) <= MAX_CLASSES \
            or not all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME for c in classes):
        raise DataError(f"{meta_path}: '{spec.meta_key}' must be a list of 1 to {MAX_CLASSES} "
                        f"class names of 1 to {MAX_CLASS_NAME} characters")

    def read_split(files: list[str], split: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_batch(folder / name, spec.labels_key, len(classes)) for name in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if len(images) == 0:
            raise DataError(f"{folder}: the {split} split is empty")
        return images, labels

    train_x, train_y = read_split(spec.train_files, "train")
    test_x, test_y = read_split(spec.test_files, "test")
    return ImageArrays(train_x, train_y, test_x, test_y, classes, spec.norm)
