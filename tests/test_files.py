"""Outputs are replaced atomically: a failure or a kill mid-write leaves the old file, whole."""

import errno
import json
import pickle
import random
import subprocess
import sys
import time

import pytest

from cifar_ray.errors import DiskFull, Interrupted, full_disk
from cifar_ray.files import atomic_path, save_figure, write_json
from tests.conftest import ROOT


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


WRITER = """
import sys, time
from pathlib import Path
from cifar_ray.files import write_json

def slow_write_text(self, text, **kwargs):  # a slow disk: the kill then lands inside a write
    with open(self, "w", **kwargs) as f:
        for start in range(0, len(text), 1 << 16):
            f.write(text[start:start + (1 << 16)])
            f.flush()
            time.sleep(0.002)

Path.write_text = slow_write_text
target, i = sys.argv[1], 0
while True:  # ever-changing versions of a large results file
    i += 1
    write_json(target, {"version": i, "payload": [i] * 200_000})
"""


def test_a_kill_at_any_moment_leaves_a_whole_file(tmp_path):
    """SIGKILL a process that rewrites results.json in a loop, many times, at random moments."""
    target = tmp_path / "results.json"
    write_json(target, {"version": 0, "payload": []})
    rng = random.Random(0)
    versions = set()
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT)
        time.sleep(1.0 + rng.random())  # imports, then somewhere inside a write
        writer.kill()
        writer.wait()
        data = json.loads(target.read_text())  # never torn
        assert data["payload"] == [data["version"]] * len(data["payload"])
        versions.add(data["version"])
    assert len(versions) > 1  # the writer really was rewriting it when killed


def test_a_full_disk_names_the_file_and_keeps_the_old_one(small_disk):
    """On a real 12 MB file system: a write that does not fit is a DiskFull (one line, exit 2
    from any command) naming its target; the file it would have replaced is whole."""
    import matplotlib.pyplot as plt

    target = small_disk / "results.json"
    write_json(target, {"test_acc": 0.9})
    with pytest.raises(DiskFull, match=rf"^no space left to write {target} \(No space left"):
        write_json(target, {"big": "x" * 20_000_000})
    assert json.loads(target.read_text()) == {"test_acc": 0.9}
    figure = small_disk / "curves.png"
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    fig = plt.figure()
    with pytest.raises(DiskFull, match=f"^no space left to write {figure} "):
        save_figure(fig, figure)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "results.json"]


def test_errors_raised_in_a_ray_worker_reach_the_driver_whole():
    """Ray pickles an error raised in a worker to hand it to the driver: the errors that take
    more than a message come back the same (before, DiskFull came back as a TypeError)."""
    full = DiskFull("/run/best.ckpt", OSError(errno.ENOSPC, "No space left on device"))
    back = pickle.loads(pickle.dumps(full))
    assert type(back) is DiskFull and str(back) == str(full)
    assert (back.path, back.reason, back.exit_code) == ("/run/best.ckpt", "No space left on device", 2)
    back = pickle.loads(pickle.dumps(Interrupted("stopped; --resume goes on", 143)))
    assert type(back) is Interrupted and str(back) == "stopped; --resume goes on"
    assert back.exit_code == 143


def test_a_full_disk_is_found_among_an_errors_causes():
    assert full_disk(OSError(errno.ENOSPC, "No space left on device", "events.out")).path == "events.out"
    wrapped = RuntimeError("the worker failed")
    wrapped.__cause__ = DiskFull("/run/last.ckpt", "No space left on device")
    assert full_disk(wrapped).path == "/run/last.ckpt"
    assert full_disk(OSError(errno.EACCES, "Permission denied")) is None
    assert full_disk(ValueError("no")) is None and full_disk(None) is None


def test_best_and_last_of_the_same_epoch_are_one_file(tmp_path):
    """Lightning saves best.ckpt and last.ckpt from the same state in an epoch that is the best
    so far: the second is a hard link, not a second copy; the next epoch's last.ckpt replaces
    the link and leaves best.ckpt as it was."""
    import torch

    from cifar_ray.runtime import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    weights = torch.arange(1000.0)
    io.save_checkpoint({"epoch": 1, "global_step": 10, "w": weights}, best)
    io.save_checkpoint({"epoch": 1, "global_step": 10, "w": weights}, last)
    assert best.stat().st_ino == last.stat().st_ino and best.stat().st_nlink == 2
    io.save_checkpoint({"epoch": 2, "global_step": 20, "w": weights + 1}, last)
    assert best.stat().st_ino != last.stat().st_ino and best.stat().st_nlink == 1
    assert torch.load(best, weights_only=True)["epoch"] == 1
    assert torch.equal(torch.load(last, weights_only=True)["w"], weights + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporaries


@pytest.mark.parametrize("write_behind", [True, False])
def test_write_behind_checkpoints_are_the_state_when_saved(tmp_path, monkeypatch, write_behind):
    """`cifar_ray.train`'s Trainer writes checkpoints in a thread while training goes on, each
    the state at the moment it was saved (training changes the tensors in place right after);
    a Trainer that does not ask for it (lr_find, the bench) writes in line."""
    import threading

    import torch

    from cifar_ray.runtime import AtomicCheckpointIO, build_trainer

    writers = []
    save = AtomicCheckpointIO.save_checkpoint

    def noted(self, checkpoint, path, storage_options=None):
        writers.append(threading.get_ident())
        save(self, checkpoint, path, storage_options)
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", noted)
    io = build_trainer("cpu", write_behind=write_behind).strategy.checkpoint_io
    weights = torch.zeros(1_000_000)
    for epoch in range(3):
        io.save_checkpoint({"epoch": epoch, "global_step": epoch, "w": weights},
                           tmp_path / f"{epoch}.ckpt")
        weights += 1  # the next optimiser step, while the write may still be going on
    io.teardown()  # what the end of fit does: waits for the last write
    for epoch in range(3):
        saved = torch.load(tmp_path / f"{epoch}.ckpt", weights_only=True)["w"]
        assert torch.equal(saved, torch.full_like(saved, epoch))
    assert len(writers) == 3
    assert (threading.get_ident() not in writers) == write_behind


def test_a_snapshot_checkpoint_is_the_state_when_saved_written_later(tmp_path):
    """The search's worker saves a copy of the state at each epoch's end and Ray Train's
    checkpoint thread writes it while the next epoch changes the tensors in place."""
    import threading

    import torch

    from cifar_ray.runtime import SnapshotCheckpointIO

    io = SnapshotCheckpointIO()
    weights = torch.zeros(1_000_000)
    paths = [tmp_path / f"epoch_{i}" / "checkpoint.ckpt" for i in range(3)]
    for epoch, path in enumerate(paths):
        io.save_checkpoint({"epoch": epoch, "global_step": epoch, "w": weights}, path)
        weights += 1
        assert not path.exists()  # nothing written on the training thread
    writer = threading.Thread(target=lambda: [io.write(path) for path in paths])
    writer.start()
    writer.join()
    for epoch, path in enumerate(paths):
        saved = torch.load(path, weights_only=True)["w"]
        assert torch.equal(saved, torch.full_like(saved, epoch))
    assert not io._copies  # each copy let go once written


def test_outputs_get_the_umasks_permissions_and_importing_never_changes_the_umask(tmp_path):
    """The umask is the kernel's to apply: files.py used to set it to 0 at import to read it,
    a moment in which a file any other thread created was world-writable."""
    code = ("import os, sys\n"
            "calls = []\n"
            "real = os.umask\n"
            "os.umask = lambda mask: calls.append(mask) or real(mask)\n"
            "real(0o027)\n"
            "from cifar_ray.files import write_json\n"
            "write_json(sys.argv[1], {'a': 1})\n"
            "print(calls, oct(os.stat(sys.argv[1]).st_mode & 0o777))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "0o640"]
