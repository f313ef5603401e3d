"""Your own images in class folders (train/, test/, optionally val/; README.md, "Your own
images"), each decoded once to `data.image_size` square RGB (`read_image`, which predict and
the app use too) into a cache keyed by every file's path, size and time."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifar_ray.config import MAX_CLASS_NAME, MAX_CLASSES
from cifar_ray.data.arrays import ImageArrays, Normalization, split_train_val
from cifar_ray.errors import DataError
from cifar_ray.files import atomic_path

CACHE_NAME = ".cifar_ray_cache.npz"
SPLITS = ("train", "val", "test")
# Every image a user gives is refused above this many pixels before it is decoded (150 MB RGB).
MAX_PIXELS = 50_000_000
# Read by content, whatever a file is called (never EPS, which Pillow hands to Ghostscript).
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA")
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items()
                             if fmt in FORMATS)
# read_image explains a refusal in one line; Pillow's warnings would be a second.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", message="Corrupt EXIF data", module="PIL")


def read_image(path: str | Path, size: int = 32) -> np.ndarray:
    """Any image file -> (size, size, 3) uint8 RGB, by area resampling; DataError naming the file
    if it is missing, does not decode, or declares more than MAX_PIXELS in its header."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, not an image file")
    if not path.is_file():
        raise DataError(f"{path}: file missing")
    try:
        with Image.open(path, formats=FORMATS) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(f"{path}: {width}x{height} pixels, more than this project "
                                f"reads ({MAX_PIXELS // 1_000_000} megapixels)")
            image = image.convert("RGB")
            image = image.resize((size, size), Image.Resampling.BOX)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            SyntaxError) as exc:  # SyntaxError: Pillow's word for some malformed headers
        raise DataError(f"{path}: not a readable image ({type(exc).__name__})") from None
    return np.asarray(image, dtype=np.uint8)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def scan(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]], int]:
    """Class names, and for each split present its (file, class index) pairs; plus how many
    files were skipped as not images. DataError (one line) for a layout that cannot be used."""
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder (expected train/<class>/<images>, "
                        "optionally test/ and val/ alike)")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'}: no class folders (expected train/<class>/<images>)")
    if len(classes) > MAX_CLASSES or max(len(c) for c in classes) > MAX_CLASS_NAME:
        raise DataError(f"{root / 'train'}: at most {MAX_CLASSES} class folders, of names up "
                        f"to {MAX_CLASS_NAME} characters (found {len(classes)})")
    index = {name: i for i, name in enumerate(classes)}
    files, skipped = {}, 0
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        pairs = []
        skipped += sum(1 for p in folder.iterdir() if p.is_file())  # beside the class folders
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            if class_dir.name not in index:
                raise DataError(f"{class_dir}: class '{class_dir.name}' is not in train/")
            found = files_under(class_dir)
            images = [p for p in found if is_image(p)]
            skipped += len(found) - len(images)
            if not images:
                raise DataError(f"{class_dir}: no images in this class folder")
            pairs += [(p, index[class_dir.name]) for p in images]
        if not pairs:
            raise DataError(f"{folder}: no class folders")
        files[split] = pairs
    return classes, files, skipped


MAX_DEPTH = 16  # folders below a class folder: deeper is not a data set's layout


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder`, sorted; links are not followed (os.walk's default), and a
    tree deeper than MAX_DEPTH is one line, not a RecursionError."""
    found = []
    for parent, dirs, names in os.walk(folder, onerror=_raise):
        if len(Path(parent).relative_to(folder).parts) >= MAX_DEPTH and dirs:
            raise DataError(f"{folder}: folders more than {MAX_DEPTH} deep")
        found += [Path(parent) / name for name in names if (Path(parent) / name).is_file()]
    return sorted(found)


def _raise(exc: OSError) -> None:
    raise DataError(f"{exc.filename}: cannot be listed ({exc.strerror})")


def fingerprint(root: Path, files: dict[str, list[tuple[Path, int]]]) -> str:
    """Changes when any image is added, removed, moved, rewritten or relabelled."""
    digest = hashlib.sha256()
    for split, pairs in files.items():
        for path, label in pairs:
            stat = path.stat()
            digest.update(f"{split}\0{path.relative_to(root)}\0{label}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_paths(root: Path, size: int = 32) -> list[Path]:
    """Where the cache of `size`-pixel images may be, in order: beside the data, else in the
    user's cache dir (for a data dir this process cannot write). One file per size."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar_ray"
    name = CACHE_NAME if size == 32 else CACHE_NAME.replace(".npz", f"_{size}px.npz")
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return [root / name, base / f"{digest}{'' if size == 32 else f'_{size}px'}.npz"]


def _load_cache(path: Path, key: str, say, files: dict[str, list[tuple[Path, int]]],
                size: int) -> dict[str, np.ndarray] | None:
    """The cached arrays if `path` holds the cache of `key`; None if missing or stale. A
    damaged or foreign file is one warning, and the images are decoded again."""
    if not path.is_file():
        return None
    try:
        _check_npz(path)
        with np.load(path, allow_pickle=False) as cached:  # arrays only: no code runs
            if str(cached["key"]) != key:
                return None
            arrays = {name: cached[name] for name in cached.files}
        for split, pairs in files.items():
            images = arrays[f"{split}_images"]
            if images.dtype != np.uint8 or images.shape != (len(pairs), size, size, 3):
                raise ValueError(f"{split}_images {images.dtype} {images.shape}")
        return arrays
    except Exception as exc:  # truncated, garbage, or not ours: zipfile, zlib, numpy errors
        say(f"warning: the cache {path} is damaged ({type(exc).__name__}); decoding the "
            "images again")
        return None


HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                  (2, 0): np.lib.format.read_array_header_2_0}


def _check_npz(path: Path) -> None:
    """ValueError unless every array in the .npz is stored uncompressed (as np.savez writes
    them) and declares no more bytes than it holds: numpy allocates what a header declares."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if member.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{member.filename} is compressed")
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version not in HEADER_READERS:
                    raise ValueError(f"{member.filename}: .npy version {version}")
                shape, _, dtype = HEADER_READERS[version](f)
                if math.prod(shape) * dtype.itemsize > member.file_size:
                    raise ValueError(f"{member.filename} declares more than it holds")


def _decode(root: Path, files: dict[str, list[tuple[Path, int]]], classes: list[str],
            key: str, size: int) -> dict[str, np.ndarray]:
    arrays = {"key": np.asarray(key), "classes": np.asarray(classes)}
    for split, pairs in files.items():
        arrays[f"{split}_images"] = np.stack([read_image(path, size) for path, _ in pairs])
        arrays[f"{split}_labels"] = np.asarray([label for _, label in pairs], dtype=np.int64)
    return arrays


def read_folders(data_dir: str | Path, quiet: bool = False, size: int = 32) -> ImageArrays:
    """The class-folder data set at `data_dir` as ImageArrays of `size`-pixel images, from the
    cache when it is current, else decoded (and cached)."""
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: data folder missing")
    classes, files, skipped = scan(root)
    key = f"{size}px {fingerprint(root, files)}"
    say = (lambda message: None) if quiet else (lambda message: print(message, flush=True))
    note = f" ({skipped} files that are not images skipped)" if skipped else ""
    for cache in cache_paths(root, size):
        arrays = _load_cache(cache, key, say, files, size)
        if arrays is not None:
            say(f"data: {root} read from its cache {cache}{note}")
            break
    else:
        count = sum(len(pairs) for pairs in files.values())
        say(f"data: decoding {count} images from {root} at {size}x{size}{note}")
        arrays = _decode(root, files, classes, key, size)
        _write_cache(arrays, cache_paths(root, size), say)
    # Only pixels come from the cache, each split's count and shape checked: the labels and
    # classes come from the folders as listed now (a cache can be planted with any).
    labels = {split: np.asarray([label for _, label in pairs], dtype=np.int64)
              for split, pairs in files.items()}
    train, train_labels = arrays["train_images"], labels["train"]
    if "test" in files:
        test, test_labels = arrays["test_images"], labels["test"]
    else:
        kept, held = split_train_val(train_labels, len(train_labels) // TEST_SHARE, TEST_SEED)
        if not len(held):
            raise DataError(f"{root}: no test/ folder, and train/ has too few images to hold "
                            "some out as the test set: add test/<class>/ folders")
        say(f"data: no test/ folder: a stratified 1/{TEST_SHARE} of train/ ({len(held):,} "
            "images) is the test set, the same in every run; the rest is trained on")
        train, train_labels, test, test_labels = (train[kept], train_labels[kept], train[held],
                                                  train_labels[held])
    return ImageArrays(train, train_labels, test, test_labels, classes, channel_stats(train),
                       arrays.get("val_images"), labels.get("val"))


# Without test/, this share of train/ is the test set: drawn with a fixed seed, never the run's,
# so that no run, trial or seed ever trains on it.
TEST_SHARE, TEST_SEED = 5, 0


def _write_cache(arrays: dict[str, np.ndarray], places: list[Path], say) -> None:
    for cache in places:
        try:
            with atomic_path(cache) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
            say(f"data: cached as {cache}")
            return
        except OSError as exc:  # read-only: the next place; none: decode again next time
            reason = exc.strerror or type(exc).__name__
    say(f"data: cannot write a cache ({reason}); the images are decoded again next time")


def channel_stats(images: np.ndarray, chunk: int = 4096) -> Normalization:
    """Per-channel mean and std in [0, 1] of (N, H, W, 3) uint8 images, in chunks (a float
    copy of 50,000 images would take 1.2 GB)."""
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].reshape(-1, 3).astype(np.float64) / 255
        total += part.sum(0)
        squares += np.square(part).sum(0)
    count = max(len(images) * images.shape[1] * images.shape[2], 1)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0))
    return Normalization(tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std))
