"""What `tune` and `train` may do to the folders a user names: never delete outside them,
refuse contradicting flags before touching anything, and look for a saved search where the
search writes it (tune.storage). Each case runs the command as a user would and checks what
is left on disk. And one run per output dir: a second run pointed at a dir a live run holds
refuses at once, naming the holder; a lock left by a killed run does not block the next one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_ray.errors import UserError
from cifar_ray.files import MARKER, make_dir, remove_made
from cifar_ray.output_dir import LOCK_NAME, output_dir_lock
from cifar_ray.pipeline import check_search_dir, start_fresh_or_resume
from cifar_ray.search.settings import SearchConfig
from tests.conftest import FAST_FLAGS, ROOT, SMOKE, run_cli

# A config for the search commands here: without one, a search is first sized to this
# machine's GPUs (tune.sized_to_this_machine), which imports torch: seconds per call.
FULL = ["--config", "experiments/search.yaml"]


def _saved_search(folder: Path, name: str = "search") -> Path:
    """What Tune leaves of an interrupted search: its state file, and one trial's run."""
    make_dir(folder / name)  # as pipeline.start_fresh_or_resume makes it
    (folder / name / "experiment_state-2026-12-03.json").write_text("{}")
    (folder / name / "train_runs" / "run_1").mkdir(parents=True)
    return folder / name


@pytest.mark.parametrize("name", ["..", ".", "../x", ".hidden", "a/b", "", "retrain", "tmp",
                                  "x" * 101, "a\0b", "tr\nx"])
def test_a_search_name_that_is_not_a_plain_folder_name_is_refused_and_nothing_deleted(
        tmp_path, name):
    """`--name .. --overwrite` used to delete the output dir's parent and all in it."""
    parent = tmp_path / "parent"
    out = parent / "out"
    _saved_search(out)
    (parent / "precious.txt").write_text("keep me")
    if "\0" in name:  # no argv can hold a NUL: the same value through the YAML
        config = tmp_path / "c.yaml"
        config.write_text(json.dumps({"tune": {"name": name}}))
        args = ["--config", str(config)]
    else:
        args = ["--name", name]
    proc = run_cli("cifar_ray.tune", *FULL, *args, "--overwrite", "--output-dir", str(out),
                   "--dataset", "folder", "--data-dir", str(tmp_path / "no-data"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tune.name must be a plain folder name" in proc.stderr.strip().splitlines()[-1]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (parent / "precious.txt").read_text() == "keep me"
    assert (out / "search" / "experiment_state-2026-12-03.json").is_file()


@pytest.mark.parametrize("command", ["cifar_ray.tune", "cifar_ray.train"])
def test_resume_with_overwrite_is_refused_before_anything_is_touched(tmp_path, command):
    """`--resume --overwrite` used to delete the saved search, then fail to resume it; train
    ignored --overwrite."""
    out = tmp_path / "out"
    state = _saved_search(out)
    (out / "last.ckpt").write_bytes(b"a checkpoint")
    (out / "results.json").write_text("{}")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = run_cli(command, *(FULL if command == "cifar_ray.tune" else []), "--resume",
                   "--overwrite", "--output-dir", str(out),
                   "--dataset", "folder", "--data-dir", str(tmp_path / "no-data"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("error: --resume and --overwrite contradict each other "
                                   "(--resume continues what is in the output dir, --overwrite "
                                   "discards it): give one of them")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert state.is_dir() and (out / "last.ckpt").read_bytes() == b"a checkpoint"


def test_resume_and_overwrite_look_where_the_search_writes_with_a_storage_path(tmp_path):
    """tune.storage set: the saved state is under it, not under the output dir."""
    out, storage = tmp_path / "out", tmp_path / "shared"
    out.mkdir()
    experiment = _saved_search(storage)
    cfg = SearchConfig()
    cfg.tune.storage = str(storage)
    check_search_dir(out, cfg, resume=True, overwrite=False)  # finds the state: no error
    with pytest.raises(UserError, match=f"{storage} holds an interrupted search"):
        check_search_dir(out, cfg, resume=False, overwrite=False)
    (storage / "unrelated").mkdir()
    check_search_dir(out, cfg, resume=False, overwrite=True)  # checks only
    assert experiment.exists()
    start_fresh_or_resume(out, cfg, resume=False, overwrite=True)
    assert (experiment / MARKER).is_file() and not (experiment / "train_runs").exists()
    assert (storage / "unrelated").is_dir()  # only the search's own folder went
    remove_made(storage, experiment)
    with pytest.raises(UserError, match=f"--resume: no search to resume in {experiment}"):
        check_search_dir(out, cfg, resume=True, overwrite=False)


def test_remove_made_deletes_only_inside_the_named_folder(tmp_path):
    root = tmp_path / "root"
    make_dir(root / "sub")
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    for path in (root / "..", root, root / ".", root / "sub" / ".." / "..", tmp_path / "outside"):
        with pytest.raises(UserError, match="refusing to delete"):
            remove_made(root, path)
    remove_made(root, root / "link")  # the link goes, never what it points to
    assert not (root / "link").exists() and (tmp_path / "outside").is_dir()
    remove_made(root, root / "sub")
    remove_made(root, root / "never-there")
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("command", ["cifar_ray.tune", "cifar_ray.train"])
@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_an_output_dir_that_cannot_be_one_is_one_line(tmp_path, command, case):
    """(Root ignores a folder's mode, so 'cannot be created' is a path through a file.)"""
    (tmp_path / "taken").write_text("not a folder")
    out = tmp_path / "taken" if case == "a file" else tmp_path / "taken" / "out"
    flags = FAST_FLAGS if command == "cifar_ray.train" else [*FULL, "--device", "cpu"]
    proc = run_cli(command, "--output-dir", str(out), "--dataset", "folder", "--data-dir",
                   str(tmp_path / "no-data"), *flags, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot use {out} as the output dir"), \
        proc.stderr[-2000:]

pytestmark = pytest.mark.slow


def test_a_second_run_into_a_live_runs_dir_refuses_and_a_dead_runs_lock_does_not_block(
        cifar10, tmp_path):
    data_dir, _, _ = cifar10
    out = tmp_path / "run"
    args = ["--data-dir", str(data_dir), "--output-dir", str(out), "--val-size", "200", *FAST_FLAGS]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "cifar_ray.train", *args, "--epochs", "50"],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while f"pid {first.pid}" not in ((out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else ""):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        started = time.time()
        second = run_cli("cifar_ray.train", *args, "--epochs", "1")
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines() == [
            f"error: {out} is in use by cifar_ray.train (pid {first.pid}); wait for it to "
            "finish or choose another --output-dir"]
        assert time.time() - started < 30  # at once, not after the first run
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed run's lock file is still there; its lock is not.
    assert (out / LOCK_NAME).exists()
    third = run_cli("cifar_ray.train", *args, "--epochs", "1")
    assert third.returncode == 0, third.stderr[-2000:]
    assert (out / "results.json").exists()


def test_a_search_into_a_dir_in_use_refuses_before_starting_ray(noisy_data, tmp_path):
    out = tmp_path / "search"
    out.mkdir()
    with output_dir_lock(out, "another search"):
        proc = run_cli("cifar_ray.tune", *SMOKE, "--data-dir", str(noisy_data),
                       "--output-dir", str(out), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {out} is in use by another search (pid {os.getpid()}); wait for it to "
        "finish or choose another --output-dir")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing else written
