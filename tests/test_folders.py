"""Your own images: a class-folder data set (`--dataset folder`) that the tests write
themselves (PNG and JPEG, odd sizes, a grayscale and an RGBA image, stray files), read once into
a cache; training and a small search on it learn; each bad input is one line and exit 2; a
run on it is exported and predicts in tests/test_export.py and tests/test_predict.py. (A
search on such a set: tests/test_tune.py.)"""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cifar_ray.data import image_folders
from cifar_ray.data.image_folders import CACHE_NAME, read_folders
from cifar_ray.errors import DataError
from tests.cifar_fixture import FOLDER_CLASSES, write_class_folders
from tests.conftest import FAST_FLAGS, run_cli


def _order(planted) -> np.ndarray:
    """The planted images' indices in the order the reader lists them: by class, then name."""
    return np.array([i for label in range(len(FOLDER_CLASSES))
                     for i in np.flatnonzero(planted.labels == label)])


def test_a_class_folder_set_reads_every_format_and_size_as_32x32_rgb(tmp_path, capsys):
    planted = write_class_folders(tmp_path, n_train=60, n_test=20)
    arrays = read_folders(tmp_path)
    assert arrays.classes == FOLDER_CLASSES
    assert arrays.train_images.shape == (60, 32, 32, 3) and arrays.train_images.dtype == np.uint8
    assert arrays.test_images.shape == (20, 32, 32, 3) and arrays.val_images is None
    order = _order(planted["train"])
    assert (arrays.train_labels == planted["train"].labels[order]).all()
    for position, i in enumerate(order):
        got, want = arrays.train_images[position].astype(int), planted["train"].images[i].astype(int)
        if i == 0:  # grayscale: three equal channels, the planted image's luminance
            assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
        elif i % 2 and i != 1:  # JPEG, lossy on this noise: nearer its own image than any other
            distances = np.abs(planted["train"].images.astype(int) - got).mean(axis=(1, 2, 3))
            assert distances.argmin() == i, i
        else:  # PNG, RGBA included (alpha dropped), scaled up then area-resampled: exact
            assert (got == want).all(), i
    # Statistics of the training images, for the model to carry.
    pixels = arrays.train_images.reshape(-1, 3) / 255
    assert np.allclose(arrays.norm.mean, pixels.mean(0)) and np.allclose(arrays.norm.std, pixels.std(0))
    assert "3 files that are not images skipped" in capsys.readouterr().out


def test_the_second_read_comes_from_the_cache_until_a_file_changes(tmp_path, monkeypatch, capsys):
    write_class_folders(tmp_path, n_train=40, n_test=12)
    first = read_folders(tmp_path)
    assert (tmp_path / CACHE_NAME).is_file()

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(image_folders, "read_image", no_decoding)
    again = read_folders(tmp_path)  # no image decoded
    assert (again.train_images == first.train_images).all() and again.classes == first.classes
    assert "read from its cache" in capsys.readouterr().out
    monkeypatch.undo()

    changed = sorted((tmp_path / "train" / "boat").iterdir())[0]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    read_folders(tmp_path)
    assert "decoding 52 images" in capsys.readouterr().out


def test_a_data_dir_that_cannot_be_written_caches_in_the_users_cache_dir(tmp_path, monkeypatch,
                                                                         capsys):
    data = tmp_path / "data"
    write_class_folders(data, n_train=40, n_test=12)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = image_folders.atomic_path

    def read_only(target):  # as a read-only data dir (root ignores permission bits)
        if str(target).startswith(str(data)):
            raise PermissionError(13, "Permission denied")
        return real(target)

    monkeypatch.setattr(image_folders, "atomic_path", read_only)
    read_folders(data)
    assert not (data / CACHE_NAME).exists()
    assert len(list((tmp_path / "cache" / "cifar_ray").glob("*.npz"))) == 1
    monkeypatch.setattr(image_folders, "read_image", lambda path: pytest.fail("decoded"))
    read_folders(data)
    assert "read from its cache" in capsys.readouterr().out


def test_a_val_folder_is_the_validation_set_and_joins_training_without_validation(tmp_path):
    from cifar_ray.data.datamodule import split_arrays

    write_class_folders(tmp_path, n_train=40, n_test=12, n_val=10)
    arrays = read_folders(tmp_path, quiet=True)
    train_x, _ = split_arrays(arrays, "train", val_size=5000, seed=1)
    val_x, val_y = split_arrays(arrays, "val", val_size=5000, seed=1)
    assert (train_x == arrays.train_images).all() and (val_x == arrays.val_images).all()
    assert (val_y == arrays.val_labels).all()  # val/ itself, whatever data.val_size says
    everything, labels = split_arrays(arrays, "train", val_size=0, seed=1)  # the retrain
    assert len(everything) == 50 and (everything[40:] == arrays.val_images).all()
    assert (labels[40:] == arrays.val_labels).all()
    assert len(split_arrays(arrays, "val", val_size=0, seed=1)[0]) == 0


def _break(root, case: str) -> str:
    """Damages a written set one way; returns what the error line must contain."""
    if case == "corrupt":
        bad = root / "train" / "cloud" / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return f"{bad}: not a readable image"
    if case == "empty class":
        (root / "train" / "empty").mkdir()
        return f"{root / 'train' / 'empty'}: no images in this class folder"
    if case == "unknown test class":
        (root / "test" / "zebra").mkdir()
        Image.new("RGB", (32, 32)).save(root / "test" / "zebra" / "z.png")
        return f"{root / 'test' / 'zebra'}: class 'zebra' is not in train/"
    if case == "no train":
        (root / "train").rename(root / "training")
        return f"{root}: no train/ folder"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["corrupt", "empty class", "unknown test class", "no train"])
def test_bad_class_folders_are_one_line_and_exit_2_writing_nothing(tmp_path, case):
    data = tmp_path / "data"
    write_class_folders(data, n_train=40, n_test=12)
    message = _break(data, case)
    out = tmp_path / "out"
    proc = run_cli("cifar_ray.train", "--dataset", "folder", "--data-dir", str(data),
                   "--output-dir", str(out), "--val-size", "8", *FAST_FLAGS)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and message in last[0], proc.stderr[-2000:]
    assert not out.exists() and not (data / CACHE_NAME).exists()
    with pytest.raises(DataError):
        read_folders(data, quiet=True)


@pytest.mark.slow
def test_training_on_class_folders_learns_and_keeps_its_normalisation(folder_run):
    data, out, second = folder_run
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == FOLDER_CLASSES
    assert results["test_acc"] > 0.6  # 4 classes: chance is 0.25
    assert results["val_score"] is not None and results["train_images"] == 800  # val/ validated
    from cifar_ray.module import load_module
    module = load_module(out / "best.ckpt")
    assert module.normalization == read_folders(data, quiet=True).norm
    assert "read from its cache" in second and "decoding" not in second


def test_an_image_declaring_more_pixels_than_the_bound_is_refused_before_decoding(tmp_path):
    """A 60-megapixel PNG of one colour is a few kilobytes; decoded as RGB it is 180 MB."""
    from cifar_ray.data.image_folders import MAX_PIXELS, read_image

    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 6_000)).save(path)
    assert path.stat().st_size < 100_000 and 10_000 * 6_000 > MAX_PIXELS
    with pytest.raises(DataError, match=r"bomb.png: 10000x6000 pixels, more than this project "
                                        r"reads \(50 megapixels\)$"):
        read_image(path)


def test_a_folder_or_an_eps_file_given_as_an_image_is_named_for_what_it_is(tmp_path):
    from cifar_ray.data.image_folders import read_image

    with pytest.raises(DataError, match=r": a folder, not an image file$"):
        read_image(tmp_path)
    eps = tmp_path / "drawing.png"  # EPS inside, whatever the name: never handed to Ghostscript
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n")
    with pytest.raises(DataError, match="not a readable image"):
        read_image(eps)


def test_gif_and_tiff_files_in_class_folders_are_read_not_skipped(tmp_path, capsys):
    write_class_folders(tmp_path, n_train=40, n_test=12)
    first = read_folders(tmp_path, quiet=True)
    for i, ext in enumerate((".gif", ".tif")):
        Image.new("RGB", (40, 40), (200, 10 * i, 0)).save(tmp_path / "train" / "boat" / f"x{ext}")
    again = read_folders(tmp_path)
    assert len(again.train_labels) == len(first.train_labels) + 2
    assert "skipped" not in capsys.readouterr().out.replace("3 files that are not images skipped", "")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _declare_a_gigabyte(path):
    """An .npz whose 'key' array declares 10^9 bytes in a 128-byte header."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**9,)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("key.npy", header.getvalue() + b"\0" * 16)


@pytest.mark.parametrize("damage", [_truncate, _declare_a_gigabyte])
def test_a_damaged_cache_is_one_warning_and_is_rebuilt(tmp_path, capsys, damage):
    import tracemalloc

    write_class_folders(tmp_path, n_train=40, n_test=12)
    first = read_folders(tmp_path, quiet=True)
    damage(tmp_path / CACHE_NAME)
    tracemalloc.start()
    try:
        again = read_folders(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out = capsys.readouterr().out
    assert f"warning: the cache {tmp_path / CACHE_NAME} is damaged" in out, out
    assert "decoding 52 images" in out and (again.train_images == first.train_images).all()
    assert peak < 50_000_000, f"{peak / 1e6:.0f} MB"
    read_folders(tmp_path)  # rebuilt: read from it again
    assert "read from its cache" in capsys.readouterr().out


def test_without_test_folder_a_stratified_fifth_of_train_is_the_test_set(tmp_path, capsys):
    write_class_folders(tmp_path, n_train=200, n_test=10)
    whole = read_folders(tmp_path, quiet=True)
    shutil.rmtree(tmp_path / "test")
    arrays = read_folders(tmp_path)
    said = capsys.readouterr().out
    assert "no test/ folder: a stratified 1/5 of train/ (40 images) is the test set" in said
    assert (len(arrays.train_labels), len(arrays.test_labels)) == (160, 40)
    share = np.bincount(whole.train_labels) / 200
    np.testing.assert_allclose(np.bincount(arrays.test_labels) / 40, share, atol=1 / 40)
    # The held-out images are train/'s own, none of them trained on, the same in every read.
    train_rows = {image.tobytes() for image in arrays.train_images}
    assert not any(image.tobytes() in train_rows for image in arrays.test_images)
    again = read_folders(tmp_path, quiet=True)
    np.testing.assert_array_equal(again.test_images, arrays.test_images)


def test_without_test_folder_too_few_images_is_one_line(tmp_path):
    for i, name in enumerate(["x", "x", "y", "y"]):  # 4 images: a fifth of them is none
        (tmp_path / "train" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / "train" / name / f"{i}.png")
    with pytest.raises(DataError, match="no test/ folder, and train/ has too few images"):
        read_folders(tmp_path, quiet=True)
