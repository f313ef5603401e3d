"""`python -m cifar_ray.train` end to end on a planted-signal fixture, as a user runs it."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from cifar_ray.config import Config
from cifar_ray.data.datamodule import CifarDataModule
from cifar_ray.module import load_module
from tests.conftest import FAST_FLAGS, ROOT, mains_in_a_fresh_process, run_cli

pytestmark = pytest.mark.slow


def test_training_learns_the_planted_signal(trained_run):
    out, proc = trained_run
    results = json.loads((out / "results.json").read_text())
    assert results["test_acc"] > 0.6  # 10 classes: chance is 0.1
    assert results["val_score"] > 0.6
    assert "done: test_acc=" in proc.stdout


def test_results_json_has_every_documented_field(trained_run):
    out, _ = trained_run
    results = json.loads((out / "results.json").read_text())
    for key in ("test_acc", "test_loss", "val_score", "metric", "per_class_acc", "confusion_matrix", "epochs",
                "train_seconds", "train_images_per_second", "checkpoint", "config", "history"):
        assert key in results, key
    assert results["epochs"] == 3 and len(results["history"]) == 3
    assert set(results["per_class_acc"]) == {f"class_{k}" for k in range(10)}
    matrix = torch.tensor(results["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 300
    assert results["config"]["model"]["width"] == 16 and results["config"]["data"]["val_size"] == 200
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(results["history"][-1])


def test_best_checkpoint_reloads_and_reproduces_the_test_accuracy(trained_run, cifar10):
    out, _ = trained_run
    results = json.loads((out / "results.json").read_text())
    module = load_module(results["checkpoint"])
    cfg = Config.from_dict(results["config"])
    cfg.data.data_dir = str(cifar10[0])
    data = CifarDataModule(cfg)
    data.setup()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += (module(x).argmax(1) == y).sum().item()
            total += len(y)
    assert correct / total == pytest.approx(results["test_acc"], abs=1e-6)


def test_outputs_are_real_files(trained_run):
    out, _ = trained_run
    with Image.open(out / "curves.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 600
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "last.ckpt").is_file()


def test_a_finished_run_is_not_overwritten_by_accident(trained_run, cifar10):
    out, _ = trained_run
    before = (out / "results.json").read_bytes()
    proc = run_cli("cifar_ray.train", "--data-dir", str(cifar10[0]), "--output-dir", str(out),
                   *FAST_FLAGS)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {out} already holds a finished run (results.json); "
        "pass --overwrite or choose another --output-dir"]
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "error: optim.lr must be > 0, got 0.0"),
    (["--val-size", "5000"], "must be smaller than the 1000 training images"),
    (["--dataset", "cifar100"], "cifar-100-python not found in"),
])
def test_bad_input_exits_2_with_one_line(cifar10, tmp_path, args, message):
    proc = run_cli("cifar_ray.train", "--data-dir", str(cifar10[0]), "--output-dir",
                   str(tmp_path / "o"), *FAST_FLAGS, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "o" / "results.json").exists()


def test_no_validation_set_keeps_the_last_epoch(cifar10, tmp_path):
    cfg = Config()
    cfg.data.data_dir, cfg.data.val_size, cfg.data.limit_train = str(cifar10[0]), 0, 256
    cfg.data.num_workers, cfg.model.width, cfg.trainer.epochs = 0, 8, 1
    cfg.trainer.batch_size, cfg.trainer.progress_bar = 64, False
    cfg.trainer.output_dir = str(tmp_path / "noval")
    from cifar_ray.training import run

    results = run(cfg)
    assert results["val_score"] is None and (tmp_path / "noval" / "best.ckpt").is_file()
    assert "val/acc" not in results["history"][0]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_an_interrupted_run_resumes_from_its_last_checkpoint(cifar10, tmp_path, sig):
    """SIGKILL: no chance to clean up, as when a machine dies. SIGTERM (`kill`, `timeout`, a
    scheduler): the run stops with exit code 143 and one line on how to go on."""
    out = tmp_path / "run"
    args = ["--data-dir", str(cifar10[0]), "--output-dir", str(out), "--epochs", "4",
            "--val-size", "200", "--limit-train", "400", *FAST_FLAGS]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "cifar_ray.train", *args], cwd=ROOT,
                                  env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 300
    while not (out / "last.ckpt").exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    driver.send_signal(sig)
    driver.wait()
    assert not (out / "results.json").exists(), "the run finished before it was stopped"
    if sig == signal.SIGTERM:
        assert driver.returncode == 143
        last = (tmp_path / "stderr.txt").read_text().strip().splitlines()[-1]
        assert last == (f"error: SIGTERM: stopped; the last finished epoch is saved in "
                        f"{out / 'last.ckpt'}: run the same command with --resume to go on")
    epochs_done = torch.load(out / "last.ckpt", weights_only=True)["epoch"] + 1
    assert 1 <= epochs_done < 4

    proc = run_cli("cifar_ray.train", *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 4
    assert [row["epoch"] for row in results["history"]] == [1, 2, 3, 4]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, cifar10):
    proc = run_cli("cifar_ray.train", "--data-dir", str(cifar10[0]), "--output-dir",
                   str(tmp_path / "empty"), "--resume", *FAST_FLAGS, timeout=120)
    assert proc.returncode == 2 and "--resume: no " in proc.stderr


def test_a_full_disk_is_one_line_and_keeps_what_was_written(cifar10, small_disk):
    """Each checkpoint of this width-16 network is 5 MB and 8 MB are free: the first epoch
    writes best.ckpt (last.ckpt, the same state, is a link to it), the second runs out of
    space writing either. Lightning's own writer left a torn last.ckpt."""
    out = small_disk / "run"
    (small_disk / "filler").write_bytes(bytes(shutil.disk_usage(small_disk).free - 8 * 2**20))
    proc = run_cli("cifar_ray.train", "--data-dir", str(cifar10[0]), "--output-dir", str(out),
                   "--epochs", "4", "--val-size", "200", *FAST_FLAGS)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: no space left to write {out}/(best|last)\.ckpt \(No space left "
                        r"on device\); files written before it are intact: free some space and "
                        r"run the same command again", line), line
    assert "Traceback" not in proc.stderr
    for name in ("best.ckpt", "last.ckpt"):  # both there, whole: they load and hold epoch 1+
        load_module(out / name)
        assert torch.load(out / name, weights_only=True)["epoch"] >= 0
    assert not list(out.glob(".*.ckpt"))  # no temporary files left behind


def test_help_and_bad_input_answer_before_torch_is_imported(cifar10, tmp_path):
    """The command checks its flags, config and output dir before it imports torch and
    Lightning (seconds on a small machine): `--help` and a mistake answer at once."""
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "results.json").write_text("{}")
    data = str(cifar10[0])
    calls = [["--help"], ["--data-dir", data, "--lr", "0"],
             ["--data-dir", data, "--output-dir", str(tmp_path / "empty"), "--resume"],
             ["--data-dir", data, "--output-dir", str(finished)]]
    codes, imported, stderr = mains_in_a_fresh_process("train", calls)
    assert codes == [0, 2, 2, 2] and imported == [], (codes, imported, stderr)
    assert stderr.strip().splitlines() == [
        "error: optim.lr must be > 0, got 0.0",
        f"error: --resume: no {tmp_path / 'empty' / 'last.ckpt'} to resume from",
        f"error: {finished} already holds a finished run (results.json); "
        "pass --overwrite or choose another --output-dir"], stderr


def test_last_checkpoint_is_each_epochs_and_best_the_best_epochs(cifar10, tmp_path):
    """last.ckpt is the latest epoch's state, what --resume and a stopped run's message promise,
    whether or not that epoch was the best; best.ckpt is the epoch of the best val/acc. (Since
    Lightning 2.6, ModelCheckpoint's own save_last writes last.ckpt only in an epoch that is
    the best so far.) A learning rate too small to learn: val/acc does not improve every epoch."""
    cfg = Config()
    cfg.data.data_dir, cfg.data.val_size, cfg.data.limit_train = str(cifar10[0]), 200, 128
    cfg.data.num_workers, cfg.model.width, cfg.trainer.epochs, cfg.optim.lr = 0, 8, 4, 1e-6
    cfg.trainer.batch_size, cfg.trainer.progress_bar = 64, False
    cfg.trainer.output_dir = str(tmp_path / "run")
    from cifar_ray.training import run

    results = run(cfg)
    accs = [row["val/acc"] for row in results["history"]]
    out = tmp_path / "run"
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 3, accs
    assert torch.load(out / "best.ckpt", weights_only=True)["epoch"] == accs.index(max(accs)), accs
    assert results["val_score"] == pytest.approx(max(accs))
    assert sorted(p.name for p in out.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
