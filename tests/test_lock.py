"""One output dir, one run at a time: a second training run or search pointed at a dir that a
live run holds refuses at once with one line naming the holder, and the first run goes on; a
lock left by a killed run does not block the next one."""

import os
import signal
import subprocess
import sys
import time

import pytest

from cifar_ray.output_dir import LOCK_NAME, output_dir_lock
from tests.conftest import FAST_FLAGS, ROOT, SMOKE, run_cli

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
