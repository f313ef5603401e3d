import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from filelock import FileLock

from tests.cifar_fixture import write_cifar10, write_class_folders
from tests.processes import RAY_PROCESS_NAMES, kill_all, pids_with, wait_gone

ROOT = Path(__file__).resolve().parents[1]

# The files of whole searches (minutes each) run first: in parallel (`-n 2`, as CI runs the
# suite) the short tests then fill in beside them, instead of a search starting last.
FIRST = ("test_bench.py", "test_cluster.py", "test_tune.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: each file stays whole


# Small and fast: width-16 ResNet-9, no DataLoader workers, no progress bars.
FAST_FLAGS = ["--width", "16", "--num-workers", "0", "--batch-size", "64", "--no-progress-bar",
              "--device", "cpu"]


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


def run_cli(module: str, *args: str, timeout: int = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` the way a user would (`env`: variables added to this
    process's); capture its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


HEAVY = ("ray", "torch", "pytorch_lightning")


def mains_in_a_fresh_process(module: str, calls: list[list[str]]) -> tuple[list, list[str], str]:
    """Call `module.main(argv)` for each argv in one new Python process: (the exit codes,
    which of HEAVY that process had imported by the end, its stderr). Whether a command
    answers before importing torch cannot be seen from this process, which has."""
    code = ("import contextlib, io, json, sys\n"
            f"from cifar_ray import {module} as command\n"
            "codes = []\n"
            f"for argv in {calls!r}:\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(io.StringIO()):\n"
            "            codes.append(command.main(argv))\n"
            "    except SystemExit as exc:\n"
            "        codes.append(exc.code)\n"
            f"print(json.dumps([codes, [m for m in {HEAVY!r} if m in sys.modules]]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    codes, imported = json.loads(proc.stdout)
    return codes, imported, proc.stderr


def once_per_run(tmp_path_factory, name: str, make: Callable[[Path], Any]) -> tuple[Path, Any]:
    """A session fixture that trains, made once per pytest run: with `-n 2` each xdist worker
    is a session of its own, so the first worker to ask makes it (under a file lock) in the
    run's folder, and the other reads it. `make(folder)` returns what JSON can hold. (Its
    data paths may be the other worker's: each writes the same seeded data sets.)"""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's folder, above each worker's own
    folder, made = shared / name, shared / f"{name}.json"
    with FileLock(f"{made}.lock"):
        if not made.exists():
            folder.mkdir(exist_ok=True)
            made.write_text(json.dumps(make(folder)))
    return folder, json.loads(made.read_text())


@pytest.fixture(scope="session")
def trained_run(cifar10, tmp_path_factory):
    """One real `python -m cifar_ray.train` on the fixture (3 epochs): (output dir, process)."""
    data_dir, _, _ = cifar10

    def train(out: Path) -> list:
        proc = run_cli("cifar_ray.train", "--data-dir", str(data_dir), "--output-dir", str(out),
                       "--epochs", "3", "--val-size", "200", "--lr", "0.01", *FAST_FLAGS)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [proc.args, proc.returncode, proc.stdout, proc.stderr]

    out, proc = once_per_run(tmp_path_factory, "train", train)
    return out, subprocess.CompletedProcess(*proc)


# ---------------------------------------------------------------------------------------------
# Searches (tests/test_tune.py, tests/test_cluster.py)

SMOKE = ["--config", "experiments/search_smoke.yaml", "--val-size", "200", "--limit-train", "0",
         "--num-workers", "0"]


@pytest.fixture(scope="session")
def noisy_data(tmp_path_factory):
    """The planted signal, with 10% of the test labels wrong: a good model still has mistakes."""
    root = tmp_path_factory.mktemp("tune_data")
    write_cifar10(root, n_train=1000, n_test=200, test_label_noise=0.1)
    return root


@pytest.fixture(scope="session")
def class_folders(tmp_path_factory):
    """A class-folder data set (`--dataset folder`) of 4 classes with a val/ folder: 800 train,
    100 val, 120 test images, in every format and size tests/cifar_fixture.py writes."""
    root = tmp_path_factory.mktemp("class_folders")
    write_class_folders(root, n_train=800, n_test=120, n_val=100)
    return root


@pytest.fixture(scope="session")
def folder_run(class_folders, tmp_path_factory):
    """A training run on a class-folder set with a val/ folder: (data dir, output dir, stdout
    of a second run that read the cache). (tests/test_tune.py runs a search on the set.)"""
    def train(out: Path) -> dict:
        args = ["--dataset", "folder", "--data-dir", str(class_folders), "--output-dir",
                str(out), "--epochs", "3", "--lr", "0.01", *FAST_FLAGS]
        first = run_cli("cifar_ray.train", *args)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
        assert "decoding 1020 images" in first.stdout or "read from its cache" in first.stdout
        second = run_cli("cifar_ray.train", *args, "--epochs", "1", "--overwrite",
                         "--output-dir", str(tmp_path_factory.mktemp("again")))
        assert second.returncode == 0, second.stderr[-3000:]
        return {"data": str(class_folders), "second": second.stdout}

    out, made = once_per_run(tmp_path_factory, "folder_train", train)
    return Path(made["data"]), out, made["second"]


@pytest.fixture
def sys_tmp():
    """The temp dir a search sees (short: Ray puts unix sockets under it, 107 bytes max)."""
    path = Path(tempfile.mkdtemp(prefix="crt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def search_env(sys_tmp: Path, **extra: str) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(sys_tmp), **extra)


@contextlib.contextmanager
def another_ray_instance(tmp_path: Path, sys_tmp: Path):
    """Another Ray instance up on the same machine (another search, a notebook) while a search
    runs, locally or on a cluster. Ray Train's placement-group cleaner found "its" instance by
    looking for Ray's processes, found two and died; the placement group of each trial that
    ended then stayed reserved, and the next trial or the retrain waited for it forever. Each
    process of the search's instance is now given that instance's address."""
    home = sys_tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = search_env(sys_tmp, HOME=str(home), RAY_AUTH_TOKEN=secrets.token_hex(32))
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(num_cpus=1, include_dashboard=False); "
                               "print('up', flush=True); sys.stdin.read()"],
        cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        yield other
    finally:
        other.stdin.close()  # its driver ends, and Ray stops the instance it started
        other.wait(timeout=60)


def registered_runs(out: Path) -> list[Path]:
    """The trials' runs with a checkpoint registered by Ray Train (in its snapshot, what a
    restarted worker group goes on from), not just written: a worker lost in between starts
    over from epoch 0."""
    runs = []
    for snapshot in out.glob("*/train_runs/*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                runs.append(snapshot.parent)
        except ValueError:  # being written
            pass
    return runs


@pytest.fixture
def no_leftover_ray():
    """Fails the test if Ray processes it started outlive it, after stopping exactly those.

    (A SIGKILLed driver's Ray agents take up to ~30 s to notice and exit by themselves.)
    """
    before = pids_with(*RAY_PROCESS_NAMES)
    yield
    left = wait_gone(pids_with(*RAY_PROCESS_NAMES) - before, timeout=45)
    kill_all(left)
    assert not left, f"Ray processes left running: {sorted(left)}"


# ---------------------------------------------------------------------------------------------
# Pages in a real browser (tests/test_app.py, the search's report.html)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container, with no network: no sandbox, no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Screenshots the tests keep for people to look at (ignored by git).
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium (see .ci/run)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def small_disk(tmp_path, request):
    """A real 12 MB file system (tmpfs; mounting needs root, as in CI), unmounted afterwards;
    another size in MB through indirect parametrisation."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    size = getattr(request, "param", 12)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", str(mount)],
                   check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)
