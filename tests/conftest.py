import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cifar_fixture import write_cifar10

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: width-16 ResNet-9, no DataLoader workers, no progress bars.
FAST_FLAGS = ["--width", "16", "--num-workers", "0", "--batch-size", "64", "--no-progress-bar",
              "--accelerator", "cpu"]


@pytest.fixture(scope="session")
def cifar10(tmp_path_factory):
    """A 1,000/300-image CIFAR-10-format set with a planted signal: (data_dir, train, test)."""
    root = tmp_path_factory.mktemp("cifar10")
    _, train, test = write_cifar10(root, n_train=1000, n_test=300)
    return root, train, test


class MarkerPayload:
    """Pickles into a call that creates `marker`: proof of whether a loader ran pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def run_cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m module args` the way a user would; capture its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_run(cifar10, tmp_path_factory):
    """One real `python -m cifar_ray.train` on the fixture (3 epochs): (output dir, process)."""
    data_dir, _, _ = cifar10
    out = tmp_path_factory.mktemp("train")
    proc = run_cli("cifar_ray.train", "--data-dir", str(data_dir), "--output-dir", str(out),
                   "--epochs", "3", "--val-size", "200", "--lr", "0.01", *FAST_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc
