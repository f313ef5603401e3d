"""Property-based tests (Hypothesis) of what reads user input: the config loader and flags, the
search-space parser, the CIFAR batch reader and the image reader. Each property: any input is
either accepted or refused with the project's one-line error (a UserError, which the commands
print as `error: ...`, exit 2); never another exception, which would be a traceback, and (the
batch reader) never an allocation beyond a bound of the input's size.

Each test tries FUZZ_EXAMPLES inputs (300 in CI; `CIFAR_RAY_FUZZ_EXAMPLES=5000 pytest
tests/test_fuzz.py` for a longer run, as the README's figures were made)."""

import argparse
import io
import os
import pickle
import tracemalloc

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifar_ray.config import add_config_flags, keys, resolve
from cifar_ray.data.cifar_files import read_cifar
from cifar_ray.data.image_folders import read_image
from cifar_ray.errors import UserError
from cifar_ray.search.settings import DISTRIBUTIONS, SearchConfig, parse_space
from tests.cifar_fixture import write_cifar10

FUZZ_EXAMPLES = int(os.environ.get("CIFAR_RAY_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEYS = sorted(keys(SearchConfig()))
SECTIONS = sorted({k.split(".")[0] for k in KEYS} | {"search", "tune", "retrain", "tracking"})
FIELDS = sorted({k.split(".")[1] for k in KEYS})

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner,
                                                                       max_size=4)),
                      max_leaves=12)
names = lambda known: st.one_of(st.sampled_from(known), st.text(max_size=12))  # noqa: E731
spaces = st.dictionaries(
    names(KEYS),
    st.one_of(values, st.dictionaries(names(sorted(DISTRIBUTIONS)),
                                      st.lists(st.one_of(scalars, values), max_size=4),
                                      min_size=0, max_size=2)),
    max_size=3)
configs = st.dictionaries(
    names(SECTIONS),
    st.one_of(values, st.dictionaries(names(FIELDS), values, max_size=5), spaces),
    max_size=5)


def _refused_or_accepted(call) -> str:
    try:
        call()
    except UserError as exc:
        assert "\n" not in str(exc), str(exc)
        return "refused"
    return "accepted"


@FUZZ
@given(config=configs)
def test_any_yaml_config_is_accepted_or_one_line(tmp_path_factory, config):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    _refused_or_accepted(lambda: _resolve(["--config", str(path)]))


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(
    lambda b: b.decode("latin1"))))
def test_any_text_as_a_config_file_is_accepted_or_one_line(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz_text.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _refused_or_accepted(lambda: _resolve(["--config", str(path)]))


FLAGS = sorted(a.option_strings[-1] for a in (lambda p: (add_config_flags(p, SearchConfig()),
                                                          p)[1])(argparse.ArgumentParser())._actions
               if a.option_strings and a.option_strings[-1].startswith("--")
               and a.option_strings[-1] not in ("--help", "--config"))


@FUZZ
@given(argv=st.lists(st.tuples(st.sampled_from(FLAGS),
                               st.one_of(st.text(max_size=12), st.integers().map(str),
                                         st.floats().map(str))), max_size=6))
def test_any_flag_values_are_accepted_or_one_line(argv):
    flat = [part for flag, value in argv
            for part in ([flag] if flag.startswith("--no-") or "progress-bar" in flag
                         else [flag, value])]
    _refused_or_accepted(lambda: _resolve(flat))


@FUZZ
@given(space=spaces)
def test_any_search_space_is_parsed_or_one_line(space):
    _refused_or_accepted(lambda: parse_space(space, SearchConfig().training_config()))


def _resolve(argv: list[str]) -> SearchConfig:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_flags(parser, SearchConfig())
    try:
        args = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit):
        raise UserError("argparse's usage error (its own one line and exit code 2)") from None
    return resolve(SearchConfig(), args)


# ---------------------------------------------------------------------------------------------
# Files: CIFAR batches and images


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    folder, _, _ = write_cifar10(tmp_path_factory.mktemp("fuzz_cifar"), n_train=50, n_test=10)
    read_cifar(folder, "cifar10")  # imports torchvision (for the file names) before measuring
    return folder


def _valid_batch() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4],
             b"batch_label": b"fuzz", b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
    path = io.BytesIO()
    from tests.cifar_fixture import _Py2Pickler
    _Py2Pickler(path, protocol=2).dump(batch)
    buffer.write(path.getvalue())
    return buffer.getvalue()


VALID_BATCH = _valid_batch()
edits = st.lists(st.tuples(st.sampled_from(["set", "cut", "insert", "repeat"]),
                           st.integers(0, len(VALID_BATCH) - 1), st.binary(min_size=1, max_size=8)),
                 min_size=1, max_size=4)


def _edit(data: bytes, changes) -> bytes:
    for op, at, payload in changes:
        at %= max(len(data), 1)
        if op == "set":
            data = data[:at] + payload + data[at + len(payload):]
        elif op == "cut":
            data = data[:at]
        elif op == "insert":
            data = data[:at] + payload + data[at:]
        else:  # a slice written again: the shape of pickle's memo and nesting tricks
            data = data[:at] + data[at:at + 64] * 4 + data[at:]
    return data


arrays = st.builds(lambda shape, dtype: np.zeros(shape, dtype),
                   st.lists(st.integers(0, 5), max_size=3).map(tuple),
                   st.sampled_from(["u1", "i8", "f4", "?"]))
batches = st.dictionaries(st.sampled_from(["data", "labels", "batch_label", "x"]),
                          st.one_of(values, arrays, st.lists(st.integers(-3, 12), max_size=6)),
                          max_size=4)


def _read_within_bound(folder, data: bytes) -> None:
    (folder / "data_batch_1").write_bytes(data)
    tracemalloc.start()
    try:
        _refused_or_accepted(lambda: read_cifar(folder, "cifar10"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The other files of the set (~200 KB as arrays) plus a bound of this one's size.
    assert peak < 8 * len(data) + 4_000_000, (peak, len(data))


@FUZZ
@given(changes=edits)
def test_any_damaged_batch_file_is_read_or_one_line_within_a_bound(cifar_folder, changes):
    _read_within_bound(cifar_folder, _edit(VALID_BATCH, changes))


@FUZZ
@given(batch=batches)
def test_any_pickled_structure_as_a_batch_is_read_or_one_line_within_a_bound(cifar_folder,
                                                                              batch):
    buffer = io.BytesIO()
    pickle.dump(batch, buffer, protocol=2)
    _read_within_bound(cifar_folder, buffer.getvalue())


def _image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (24, 17), (10, 200, 30))
    image.save(buffer, format=fmt)
    return buffer.getvalue()


VALID_IMAGES = {fmt: _image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@FUZZ
@given(fmt=st.sampled_from(sorted(VALID_IMAGES)), changes=edits)
def test_any_damaged_image_file_is_read_or_one_line(tmp_path_factory, fmt, changes):
    path = tmp_path_factory.getbasetemp() / f"fuzz.{fmt.lower()}"
    path.write_bytes(_edit(VALID_IMAGES[fmt], changes))
    try:
        image = read_image(path)
    except UserError as exc:
        assert "\n" not in str(exc)
    else:
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
