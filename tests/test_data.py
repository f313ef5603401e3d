"""Reading, validating and downloading CIFAR data; the split; the augmentation recipe."""

import functools
import hashlib
import pickle
import socket
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10

from cifar_ray.config import Config
from cifar_ray.data.arrays import ImageArrays, Normalization, split_train_val
from cifar_ray.data.cifar_files import SPECS, ensure_dataset, read_cifar
from cifar_ray.data.datamodule import CifarDataModule, DeviceBatches, split_arrays
from cifar_ray.errors import DataError
from tests.cifar_fixture import dump_py2, write_cifar10, write_cifar100
from tests.conftest import MarkerPayload

SPEC = SPECS["cifar10"].norm


def test_reads_python2_pickles_exactly(tmp_path):
    folder, train, test = write_cifar10(tmp_path, n_train=50, n_test=20)
    # The fixture really is in the Python 2 format: keys are BINSTRINGs, numpy under numpy.core.
    raw = (folder / "data_batch_1").read_bytes()
    assert b"U\x04data" in raw and b"numpy.core.multiarray\n_reconstruct" in raw
    arrays = read_cifar(folder, "cifar10")
    assert arrays.train_images.shape == (50, 32, 32, 3) and arrays.train_images.dtype == np.uint8
    np.testing.assert_array_equal(arrays.train_images, train.images)
    np.testing.assert_array_equal(arrays.test_labels, test.labels)
    assert arrays.classes == [f"class_{k}" for k in range(10)]


def test_reads_cifar100(tmp_path):
    arrays = read_cifar(write_cifar100(tmp_path, n_train=40, n_test=10), "cifar100")
    assert len(arrays.classes) == 100 and arrays.train_labels.max() < 100
    assert arrays.test_images.shape == (10, 32, 32, 3)


def _corrupt(folder: Path, name: str, **changes):
    with open(folder / name, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    batch = {k.encode(): v for k, v in batch.items()}
    for key, value in changes.items():
        if value is None:
            del batch[key.encode()]
        else:
            batch[key.encode()] = value
    dump_py2(batch, folder / name)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "data_batch_3").unlink(), "data_batch_3: file missing"),
    (lambda f: (f / "data_batch_2").write_bytes((f / "data_batch_2").read_bytes()[:500]),
     "data_batch_2: not a CIFAR batch file (truncated or malformed pickle: expected 30720 "
     "bytes in a string4, but only"),
    (lambda f: (f / "test_batch").write_bytes(b"garbage" * 10), "test_batch: "),
    (lambda f: _corrupt(f, "data_batch_1", data=np.zeros((10, 3071), np.uint8)),
     "'data' must be an N x 3072 uint8 array, got (10, 3071) uint8"),
    (lambda f: _corrupt(f, "data_batch_1", data=np.zeros((10, 3072), np.float32)),
     "'data' must be an N x 3072 uint8 array"),
    (lambda f: _corrupt(f, "data_batch_4", labels=[12] * 10),
     "label 12 out of range for the 10 classes"),
    (lambda f: _corrupt(f, "data_batch_1", labels=[1, 2]), "2 labels for 10 images"),
    (lambda f: _corrupt(f, "data_batch_1", labels=None), "missing key 'labels'"),
    (lambda f: _corrupt(f, "batches.meta", label_names=[b"a", b"b"]),
     "out of range for the 2 classes in the meta file"),
    (lambda f: _corrupt(f, "test_batch", data=np.zeros((0, 3072), np.uint8), labels=[]),
     "the test split is empty"),
])
def test_each_validation_error_is_one_clear_line(tmp_path, damage, message):
    folder, _, _ = write_cifar10(tmp_path, n_train=50, n_test=20)
    damage(folder)
    with pytest.raises(DataError) as err:
        read_cifar(folder, "cifar10")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_batch_file_that_would_run_code_is_refused(tmp_path):
    folder, _, _ = write_cifar10(tmp_path, n_train=50, n_test=20)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": MarkerPayload(marker), "labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        read_cifar(folder, "cifar10")
    assert not marker.exists()


class _Declared:
    """Pickles as numpy's own array constructor asked for `shape`: a few bytes in the file."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, self.shape, self.dtype))


class _Encoded:
    """Pickles as `_codecs.encode(text, 'latin1')`: many of them share one memoised string."""

    def __init__(self, text):
        self.text = text

    def __reduce__(self):
        import codecs

        return (codecs.encode, (self.text, "latin1"))


MEGABYTE = "x" * (1 << 20)  # one string: pickled once, then referenced


def _nested_labels(levels: int) -> list:
    level = [0] * 10
    for _ in range(levels):
        level = [level] * 10  # pickled once, then referenced: 10x more per ~25 bytes
    return level


@pytest.mark.parametrize("batch, message", [
    ({"data": _Declared((100_000, 3072), "u1"), "labels": _Declared((100_000,), "i8")},
     "declares more data than the file holds"),
    ({"data": np.zeros((10, 3072), np.uint8), "labels": _nested_labels(6)},
     "'labels' must be a flat list of ints"),
    ({"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 10,
      "filenames": [_Encoded(MEGABYTE) for _ in range(200)]},
     "declares more data than the file holds"),
    ({"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 10,
      "extra": _Declared((10,), "O")}, "refusing dtype object"),
    # Found by tests/test_fuzz.py: the C unpickler's memo grows to the largest index a PUT names.
    (b"\x80\x02]r\xff\xff\xff\x0f.", "a memo index of 268435455 in a 9-byte file"),
])
def test_a_crafted_batch_file_is_refused_without_allocating_what_it_declares(
        tmp_path, batch, message):
    """A small file that asks for hundreds of megabytes (an array's declared shape, shared
    nested lists, one string encoded over and over) is refused within a bound of its size."""
    import tracemalloc

    folder, _, _ = write_cifar10(tmp_path, n_train=50, n_test=20)
    with open(folder / "data_batch_1", "wb") as f:
        f.write(batch) if isinstance(batch, bytes) else pickle.dump(batch, f, protocol=2)
    size = (folder / "data_batch_1").stat().st_size
    assert size < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            read_cifar(folder, "cifar10")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(err.value) and "\n" not in str(err.value)
    assert peak < 4 * size + 20_000_000, f"{peak / 1e6:.0f} MB for a {size / 1e3:.0f} KB file"


def test_a_meta_file_with_too_many_classes_is_refused(tmp_path):
    folder, _, _ = write_cifar10(tmp_path, n_train=50, n_test=20)
    _corrupt(folder, "batches.meta", label_names=[b"c"] * 2_000)
    with pytest.raises(DataError, match="must be a list of 1 to 1000 class names"):
        read_cifar(folder, "cifar10")


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(DataError, match=r"/data: a file, not a folder$"):
        ensure_dataset(tmp_path / "data", "cifar10")


class QuietServer(ThreadingHTTPServer):
    """Says nothing when a client hangs up mid-reply (the download code may close a connection
    early); any other error in a request is still printed."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def served_archive(tmp_path, monkeypatch):
    """Pack a fixture set like the official archive, serve it over HTTP on 127.0.0.1, and point
    torchvision's CIFAR10 url and md5 at it: the real download code runs, on loopback only."""
    site = tmp_path / "site"
    write_cifar10(tmp_path / "src", n_train=50, n_test=20)
    site.mkdir()
    archive = site / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.server_port}/{archive.name}")
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    yield archive
    server.shutdown()
    server.server_close()
    thread.join()


def test_missing_folder_is_downloaded_md5_checked_and_extracted(tmp_path, served_archive):
    folder = ensure_dataset(tmp_path / "data", "cifar10")
    assert folder == (tmp_path / "data" / "cifar-10-batches-py").resolve()
    assert len(read_cifar(folder, "cifar10").train_labels) == 50
    assert not list((tmp_path / "data").glob(".extract-*"))  # no half-extracted leftovers


def test_download_with_a_wrong_md5_is_an_error_and_leaves_no_folder(tmp_path, served_archive,
                                                                    monkeypatch):
    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)
    with pytest.raises(DataError, match="download .* failed"):
        ensure_dataset(tmp_path / "data", "cifar10")
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


def test_no_network_says_where_to_put_the_files(tmp_path, monkeypatch):
    # A closed loopback port: the connection is refused at once, as with no network.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    with pytest.raises(DataError) as err:
        ensure_dataset(tmp_path / "data", "cifar10")
    text = str(err.value)
    assert "cifar-10-batches-py not found" in text and "extract cifar-10-python.tar.gz" in text


def test_split_is_seeded_disjoint_and_complete():
    labels = np.arange(100) % 10
    train, val = split_train_val(labels, 20, seed=3)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    assert sorted(np.concatenate([train, val])) == list(range(100))
    np.testing.assert_array_equal(val, split_train_val(labels, 20, seed=3)[1])
    assert not np.array_equal(val, split_train_val(labels, 20, seed=4)[1])
    with pytest.raises(DataError, match="must be smaller than the 100 training images"):
        split_train_val(labels, 100, seed=0)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=8), share=st.floats(0.01, 0.9),
       seed=st.integers(0, 2**32 - 1))
def test_the_split_is_stratified_for_any_class_counts(counts, share, seed):
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    n = len(labels)
    val_size = min(n - 1, max(0, round(share * n)))
    train, val = split_train_val(labels, val_size, seed)
    assert len(val) <= val_size and sorted(np.concatenate([train, val])) == list(range(n))
    for c, count in enumerate(counts):
        # each class gives its share, off by less than one, and keeps an image at least
        assert (labels[train] == c).sum() >= 1
        given = (labels[val] == c).sum()
        assert abs(given - count * val_size / n) < 1 or given == count - 1
    assert len(val) == val_size or any(c * val_size / n > c - 2 for c in counts)


def test_validation_is_a_stratified_tenth_by_default_with_a_warning_past_a_third(capsys):
    labels = np.array([0] * 700 + [1] * 300)
    images = np.zeros((1000, 8, 8, 3), np.uint8)
    arrays = ImageArrays(images, labels, images[:10], labels[:10], ["good", "faulty"],
                         Normalization((0.5,) * 3, (0.25,) * 3))
    _, val_y = split_arrays(arrays, "val", -1, seed=1)
    assert len(val_y) == 100 and (val_y == 1).sum() == 30  # a tenth, 70/30 like the data
    cfg = Config.from_dict({"data": {"val_size": 600, "image_size": 8, "num_workers": 0}})
    CifarDataModule(cfg, arrays).setup()
    assert "validation holds 600 images, more than a third of the 1,000" in capsys.readouterr().err
    CifarDataModule(Config.from_dict({"data": {"image_size": 8}}), arrays).setup()
    assert "warning" not in capsys.readouterr().err


def test_datamodule_split_limit_and_no_validation(cifar10):
    data_dir, _, _ = cifar10
    cfg = Config()
    cfg.data.data_dir, cfg.data.val_size, cfg.data.limit_train = str(data_dir), 200, 300
    dm = CifarDataModule(cfg)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (300, 200, 300)
    cfg2 = Config()
    cfg2.data.data_dir, cfg2.data.val_size = str(data_dir), 0
    dm2 = CifarDataModule(cfg2)
    dm2.setup()
    assert len(dm2.train_set) == 1000 and dm2.val_dataloader() == []


@pytest.mark.parametrize("engine", ["albumentations", "tensors"])
def test_evaluation_batches_are_large_and_change_no_result(cifar10, engine):
    """Validation and test run in batches of at least EVAL_BATCH images, whatever the training
    batch: each image once, in order, and the same outputs as in batches of the training
    size (a model in eval mode: BatchNorm on its running statistics)."""
    from cifar_ray.model import ResNet9

    cfg = Config()
    cfg.data.data_dir, cfg.data.val_size, cfg.data.num_workers = str(cifar10[0]), 200, 0
    cfg.augment.engine, cfg.trainer.batch_size = engine, 64
    dm = CifarDataModule(cfg)
    dm.setup()
    assert [len(y) for _, y in dm.train_dataloader()] == [64] * (800 // 64)
    model = ResNet9(10, width=4).eval()

    def outputs(batches):  # (images, classes) log-probabilities, (images,) labels
        with torch.no_grad():
            pairs = [(model(x), y) for x, y in
                     (dm.on_after_batch_transfer(batch, 0) for batch in batches)]
        return torch.cat([o for o, _ in pairs]), torch.cat([y for _, y in pairs])

    assert [len(y) for _, y in dm.test_dataloader()] == [300]  # one batch (EVAL_BATCH: 1024)
    test = dm.test_set
    small = DataLoader(test, batch_size=64) if engine == "albumentations" else DeviceBatches(
        torch.from_numpy(test.images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(test.labels).long(), batch_size=64, shuffle=False)
    (big_out, big_y), (small_out, small_y) = outputs(dm.test_dataloader()), outputs(small)
    assert torch.equal(big_y, small_y) and torch.equal(big_y, torch.from_numpy(test.labels))
    assert torch.allclose(big_out, small_out, atol=1e-5)
