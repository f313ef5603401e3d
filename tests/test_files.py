"""Outputs are replaced atomically: a failure mid-write leaves the old file, whole."""

import json

import pytest

from cifar_ray.files import atomic_path, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"test_acc": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"test_acc": 0.')  # torn half-way
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"test_acc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_finished_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "results.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
