"""Hostile inputs, a class at a time, each against the one gate that class goes through
(docs/architecture.md, "Where each decision lives"): what is written or deleted (files.py),
what is resumed (files.check_trusted), what a checkpoint may claim (module.load_module), what
a config or a search range may ask (config.py, search.settings.check_samplers), what a name may
hold (names.shown_name), what the app serves, what a cache may plant, where Ray listens.
Property-based tests give each gate inputs nobody listed."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifar_ray.config import ConfigError
from cifar_ray.errors import CheckpointError, UserError
from cifar_ray.files import check_no_links, make_dir, remove_made
from cifar_ray.module import LitResNet9, load_module
from cifar_ray.names import file_name, shown_name
from cifar_ray.search.settings import SearchConfig
from tests.cifar_fixture import write_cifar10, write_class_folders
from tests.conftest import ROOT, MarkerPayload, run_cli

# CIFAR_RAY_FUZZ_EXAMPLES: the longer run of docs/benchmarks.md (tests/test_fuzz.py reads it too).
QUICK = {"max_examples": int(os.environ.get("CIFAR_RAY_FUZZ_EXAMPLES", "40")), "deadline": None,
         "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_data")
    write_cifar10(root, n_train=60, n_test=20)
    return root


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def save_checkpoint(path: Path, width: int = 8, classes=tuple("abcdefghij"), **hparams) -> Path:
    module = LitResNet9(model={"width": width}, class_names=list(classes))
    ckpt = {"state_dict": module.state_dict(),
            "hyper_parameters": {**dict(module.hparams), **hparams}}
    torch.save(ckpt, path)
    return path


# --- 1. Deleting what the project did not make ---------------------------------------------


def test_a_search_keeps_a_tmp_folder_of_the_users_and_says_so(tiny_data, tmp_path):
    out = tmp_path / "out"
    (out / "tmp").mkdir(parents=True)
    (out / "tmp" / "mine.txt").write_text("the user's")
    proc = run_cli("cifar_ray.tune", "--config", "experiments/search_smoke.yaml", "--data-dir",
                   str(tiny_data), "--output-dir", str(out), "--val-size", "20", timeout=300)
    assert "is not the project's" in one_line_error(proc)
    assert (out / "tmp" / "mine.txt").read_text() == "the user's"


def test_overwrite_deletes_nothing_before_every_input_is_checked(tmp_path):
    """A finished search's folder survives an --overwrite whose data is missing."""
    out = tmp_path / "out"
    experiment = make_dir(out / "search")
    (experiment / "experiment_state-1.json").write_text("{}")
    proc = run_cli("cifar_ray.tune", "--config", "experiments/search_smoke.yaml", "--data-dir",
                   str(tmp_path / "no-such-data"), "--output-dir", str(out), "--overwrite",
                   "--dataset", "folder", timeout=300)
    one_line_error(proc)
    assert (experiment / "experiment_state-1.json").exists()


def test_overwrite_refuses_a_storage_another_search_holds(tmp_path):
    """The storage's experiment is locked by the search using it: --overwrite waits its turn."""
    from cifar_ray.output_dir import output_dir_lock

    storage = tmp_path / "storage"
    experiment = make_dir(storage / "search")
    (experiment / "kept").write_text("a running search's")
    with output_dir_lock(storage, "another search", lock_name=".search.lock"):
        proc = run_cli("cifar_ray.tune", "--config", "experiments/search_smoke.yaml",
                       "--output-dir", str(tmp_path / "out"), "--storage", str(storage),
                       "--overwrite", "--data-dir", str(tmp_path / "none"), timeout=300)
    assert "is in use by another search" in one_line_error(proc)
    assert (experiment / "kept").exists()


def test_overwrite_refuses_a_folder_the_project_did_not_make(tmp_path):
    out = tmp_path / "out"
    (out / "search").mkdir(parents=True)
    (out / "search" / "notes.txt").write_text("the user's")
    proc = run_cli("cifar_ray.tune", "--config", "experiments/search_smoke.yaml",
                   "--output-dir", str(out), "--overwrite", "--data-dir", str(tmp_path / "x"),
                   timeout=300)
    assert "the project did not make it" in one_line_error(proc)
    assert (out / "search" / "notes.txt").exists()


def test_remove_made_deletes_only_marked_folders_inside_the_root(tmp_path):
    root = tmp_path / "root"
    made = make_dir(root / "made" / "deep")
    (made / "x").write_text("x")
    remove_made(root, made)
    assert not made.exists()
    (root / "theirs").mkdir()
    with pytest.raises(UserError, match="did not make it"):
        remove_made(root, root / "theirs")
    (root / "link").symlink_to(tmp_path, target_is_directory=True)
    remove_made(root, root / "link")  # the link goes, never what it points at
    assert tmp_path.exists() and not (root / "link").exists()
    with pytest.raises(UserError, match="not inside"):
        remove_made(root, root / "made" / ".." / ".." / "elsewhere")


# --- 2. Writing through links --------------------------------------------------------------


def hostile_layouts():
    """Links at names the project writes in an output dir, to files and folders outside."""
    names = [".lock", "results.json", "best.ckpt", "last.ckpt", "curves.png", "tensorboard",
             "logs/workers.log", "retrain", "search", "report.html"]
    link = st.sampled_from(["symlink-file", "symlink-dir", "hardlink"])
    return st.dictionaries(st.sampled_from(names), link, min_size=1, max_size=4)


@settings(max_examples=int(os.environ.get("CIFAR_RAY_LINK_LAYOUTS", "6")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=hostile_layouts(), command=st.sampled_from(["cifar_ray.train", "cifar_ray.tune"]))
def test_links_in_an_output_dir_never_lead_a_write_outside(tmp_path_factory, tiny_data, layout,
                                                           command):
    base = tmp_path_factory.mktemp("links")
    outside = base / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("keep me")
    out = base / "out"
    for name, kind in layout.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "symlink-file":
            path.symlink_to(secret)
        elif kind == "symlink-dir":
            path.symlink_to(outside, target_is_directory=True)
        else:
            os.link(secret, path)
    before = sorted(p.name for p in outside.iterdir())
    args = ["--data-dir", str(tiny_data), "--output-dir", str(out), "--epochs", "1",
            "--val-size", "20", "--width", "8", "--device", "cpu", "--num-workers", "0"]
    if command == "cifar_ray.tune":
        args = ["--config", "experiments/search_smoke.yaml", *args[:-6]]
    proc = run_cli(command, *args, timeout=600)
    assert "refusing to use" in one_line_error(proc)
    assert secret.read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == before


def test_a_hard_link_is_allowed_when_both_names_are_inside(tmp_path):
    (tmp_path / "a").write_text("x")
    os.link(tmp_path / "a", tmp_path / "b")  # as best.ckpt and epoch=N.ckpt are
    check_no_links(tmp_path)
    os.link(tmp_path / "a", tmp_path.parent / f"{tmp_path.name}-outside")
    with pytest.raises(UserError, match="hard link to a file outside"):
        check_no_links(tmp_path)


# --- 3. Code run from the output dir ---------------------------------------------------------


@pytest.mark.parametrize("how", ["writable by others", "another user's"])
def test_resume_refuses_a_saved_state_it_cannot_trust(tiny_data, tmp_path, how):
    if how == "another user's" and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root (CI runs as root)")
    out = tmp_path / "out"
    experiment = make_dir(out / "search")
    marker = tmp_path / "ran"
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(MarkerPayload(marker)))
    if how == "writable by others":
        os.chmod(experiment / "tuner.pkl", 0o666)
    else:
        os.chown(experiment / "tuner.pkl", 65534, 65534)
    proc = run_cli("cifar_ray.tune", "--config", "experiments/search_smoke.yaml", "--resume",
                   "--data-dir", str(tiny_data), "--output-dir", str(out), "--val-size", "20",
                   timeout=300)
    line = one_line_error(proc)
    assert "tuner.pkl" in line and ("other users can write it" in line or "another user" in line)
    assert not marker.exists()


# --- 4. Files served through links -----------------------------------------------------------


def test_the_app_serves_no_file_through_a_link_in_the_report(tmp_path):
    from PIL import Image

    from cifar_ray.app import gallery

    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(secret)
    report = tmp_path / "gradcam"
    report.mkdir()
    (report / "misclassified.json").write_text(json.dumps(
        {"mistakes": 1, "images": 2, "split": "test", "accuracy": 0.5, "target_layer": "x"}))
    (report / "confusion_matrix.png").symlink_to(secret)
    items, note = gallery(tmp_path / "m.ckpt", None, None, str(report), tmp_path)
    assert not any(isinstance(item, str) and Path(item).resolve() == secret
                   for item, _ in items)
    assert items == [] and "cannot be shown" in note


def test_the_app_shows_a_damaged_report_as_a_message(tmp_path):
    from cifar_ray.app import gallery

    report = tmp_path / "gradcam"
    report.mkdir()
    (report / "misclassified.json").write_text('{"mistakes": "many"')
    items, note = gallery(tmp_path / "m.ckpt", None, None, str(report), tmp_path)
    assert items == [] and "cannot be shown" in note


# --- 5. Memory a small file can claim --------------------------------------------------------


def deflated(path: Path) -> Path:
    """The same checkpoint with every record deflated (torch.save stores them)."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    target = path.with_name("deflated.ckpt")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in records:
            archive.writestr(name, data)
    return target


def test_a_checkpoint_of_compressed_records_is_refused_before_inflating(tmp_path):
    bomb = save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(bomb, weights_only=True)
    ckpt["padding"] = torch.zeros(64 << 20, dtype=torch.uint8)  # 64 MB of zeros: 64 KB deflated
    torch.save(ckpt, bomb)
    small = deflated(bomb)
    assert small.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match="is compressed"):
        load_module(small)


PEAK = """
import resource, sys
from cifar_ray.module import load_module
from cifar_ray.errors import CheckpointError
try:
    load_module(sys.argv[1])
except CheckpointError as exc:
    print("refused:", exc)
print("peak MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_small_checkpoint_claiming_the_widest_network_builds_nothing(tmp_path):
    """Width 1024 (1.7 billion parameters) with only the layers the old check read: 500 KB."""
    width = 1024
    state = {"model.prep.0.weight": torch.zeros(width, 3, 3, 3),
             "model.fc.weight": torch.zeros(10, 8 * width), "model.fc.bias": torch.zeros(10)}
    path = tmp_path / "wide.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model": {"width": width}}}, path)
    assert path.stat().st_size < 1 << 20
    proc = subprocess.run([sys.executable, "-c", PEAK, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "refused:" in proc.stdout and "is none" in proc.stdout, proc.stderr[-2000:]
    peak = int(proc.stdout.split("peak MB")[1])
    assert peak < 2000, peak  # imports alone are ~1.5 GB; the network would be 6,900 MB


def test_a_checkpoint_naming_more_classes_than_a_data_set_may_have_is_refused(tmp_path):
    """100,000 classes at width 1: a 3 MB file whose confusion matrix would be 80 GB."""
    module = LitResNet9(model={"width": 1})
    state = module.state_dict()
    state["model.fc.weight"], state["model.fc.bias"] = torch.zeros(100_000, 8), torch.zeros(100_000)
    hparams = {**dict(module.hparams), "class_names": [f"c{i}" for i in range(100_000)]}
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    with pytest.raises(CheckpointError, match="class_names must be a list of 1 to 1000"):
        load_module(path)


def hash_bomb() -> bytes:
    """A 310-byte pickle of {t: 1} where t holds one tuple twice, 60 deep: hashing it as the
    dict is built takes 2**60 steps."""
    ops = bytearray(b"\x80\x02}")  # PROTO 2, EMPTY_DICT
    ops += b")q\x00"  # EMPTY_TUPLE, BINPUT 0
    for i in range(1, 61):  # the top (memo[i-1]) and BINGET i-1, TUPLE2, BINPUT i
        ops += b"h" + bytes([i - 1]) + b"\x86q" + bytes([i])
    ops += b"K\x01s."  # BININT1 1, SETITEM, STOP
    return bytes(ops)


def test_a_checkpoint_whose_pickle_would_hash_forever_is_refused_at_once(tmp_path):
    path = save_checkpoint(tmp_path / "m.ckpt")
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            archive.writestr(name, hash_bomb() if name.endswith("/data.pkl") else data)
    code = ("import sys\nfrom cifar_ray.module import load_module\n"
            "from cifar_ray.errors import CheckpointError\n"
            "try:\n    load_module(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, timeout=120,
                          capture_output=True, text=True)
    assert "nests deeper than 100 levels or holds more than" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("kind", ["a folder", "a fifo", "a link to a fifo"])
def test_a_checkpoint_path_that_is_not_a_plain_file_is_one_line(tmp_path, kind):
    path = tmp_path / "m.ckpt"
    if kind == "a folder":
        path.mkdir()
    elif kind == "a fifo":
        os.mkfifo(path)
    else:
        os.mkfifo(tmp_path / "fifo")
        path.symlink_to(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match="not a checkpoint file|Is a directory"):
        load_module(path)  # at once: a fifo is not waited on
    (tmp_path / "link.ckpt").symlink_to(save_checkpoint(tmp_path / "real.ckpt"))
    load_module(tmp_path / "link.ckpt")  # a link the user names to a checkpoint is fine


@pytest.mark.parametrize("flag, value", [("--num-workers", "1000000"),
                                         ("--batch-size", "1000000000"),
                                         ("--devices", "100000")])
def test_config_values_that_fork_or_allocate_without_bound_are_refused(flag, value):
    from cifar_ray.config import Config, parse_command
    from cifar_ray.train import build_parser

    with pytest.raises(ConfigError, match="must be in"):
        parse_command(build_parser, Config(), [flag, value])


# --- 6. Tracebacks from values the parsers let through ---------------------------------------

HPARAM_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                          st.floats(allow_nan=True), st.text(max_size=20),
                          st.lists(st.integers(-3, 3), max_size=4),
                          st.dictionaries(st.text(max_size=8), st.integers(), max_size=3))


@settings(**QUICK)
@given(section=st.sampled_from(["model", "optim", "data", "top"]),
       key=st.sampled_from(["width", "lr", "image_size", "dataset", "seed", "class_names", "norm",
                            "schedule", "pct_start", "val_size", "num_workers", "x"]),
       value=HPARAM_VALUES)
def test_any_checkpoint_hyperparameter_loads_or_is_one_line(tmp_path, section, key, value):
    path = save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(path, weights_only=True)
    hparams = ckpt["hyper_parameters"]
    if section == "top":
        hparams[key] = value
    else:
        hparams[section] = {**(hparams.get(section) or {}), key: value}
    torch.save(ckpt, path)
    try:
        module = load_module(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    module(torch.zeros(1, 3, module.image_size, module.image_size))  # it really works


@settings(**QUICK)
@given(data=st.binary(min_size=0, max_size=400), cut=st.integers(0, 10_000))
def test_any_damaged_checkpoint_is_one_line(tmp_path, data, cut):
    path = save_checkpoint(tmp_path / "m.ckpt")
    raw = path.read_bytes()
    cut = cut % len(raw)
    path.write_bytes(raw[:cut] + data + raw[cut + len(data):])
    try:
        load_module(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)


NUMBERS = st.one_of(st.integers(-10**25, 10**25), st.floats(allow_nan=True, allow_infinity=True))


@settings(**QUICK)
@given(key=st.sampled_from(["optim.lr", "optim.weight_decay", "trainer.batch_size",
                            "model.width", "augment.flip_p", "trainer.seed"]),
       name=st.sampled_from(["loguniform", "uniform", "qloguniform", "quniform", "randint",
                             "choice"]),
       args=st.lists(NUMBERS, min_size=1, max_size=4))
def test_any_search_range_is_sampled_by_ray_or_refused_at_parse_time(key, name, args):
    from cifar_ray.search.tuner import tune_space

    try:
        cfg = SearchConfig.from_dict({"search": {key: {name: args}}})
        cfg.check_space()  # what `tune` runs next, before data or Ray
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    rng = np.random.default_rng(1)
    for sampler in tune_space(cfg).values():
        for value in sampler.sample(size=64, random_state=rng):
            from cifar_ray.config import overlay

            overlay(cfg.training_config(), {key: value})  # every draw makes a valid config


@pytest.mark.parametrize("yaml_text, message", [
    ("optim:\n  lr: .inf\n", "optim.lr must be a finite number"),
    ("optim:\n  weight_decay: .nan\n", "optim.weight_decay must be a finite number"),
    ("trainer:\n  seed: -1\n", "trainer.seed must be in [0, 4294967295]"),
    ("trainer:\n  seed: 100000000000000000000\n", "trainer.seed must be in"),
    ("tune:\n  name: results.json\n", "tune.name must be a plain folder name"),
    ("tune:\n  name: report.html\n", "tune.name must be a plain folder name"),
])
def test_values_that_reached_a_traceback_are_one_line(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    proc = run_cli("cifar_ray.tune", "--config", str(path), "--plan", timeout=120)
    assert message in one_line_error(proc)


def test_a_flag_of_infinity_is_refused():
    from cifar_ray.config import Config, parse_command
    from cifar_ray.train import build_parser

    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        parse_command(build_parser, Config(), ["--lr", "inf"])


def test_results_are_standard_json_whatever_a_run_measured(tmp_path):
    """A diverged run's loss is NaN: results.json says null, which every JSON reader takes."""
    from cifar_ray.files import write_json

    write_json(tmp_path / "r.json", {"test_loss": float("nan"), "curve": [float("inf"), 0.5]})

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse) == \
        {"test_loss": None, "curve": [None, 0.5]}


def test_a_deep_folder_tree_is_one_line(tmp_path):
    from cifar_ray.data.image_folders import read_folders
    from cifar_ray.errors import DataError

    write_class_folders(tmp_path, n_train=8, n_test=4)
    deep = sorted(p for p in (tmp_path / "train").iterdir() if p.is_dir())[0]
    for _ in range(40):
        deep = deep / "d"
    deep.mkdir(parents=True)
    with pytest.raises(DataError, match="folders more than 16 deep"):
        read_folders(tmp_path, quiet=True)


def test_resume_with_other_training_settings_is_one_line(tmp_path):
    out = tmp_path / "out"
    experiment = make_dir(out / "search")
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    cfg = SearchConfig()
    (experiment / "cifar_ray_config.json").write_text(json.dumps(cfg.to_dict()))
    proc = run_cli("cifar_ray.tune", "--config", "experiments/search.yaml", "--resume",
                   "--output-dir", str(out), "--width", "32",
                   "--data-dir", str(tmp_path / "none"), timeout=300)
    assert "started with model.width = 64, not 32" in one_line_error(proc)


def test_train_resume_with_more_epochs_is_one_line(tmp_path, tiny_data):
    out = tmp_path / "out"
    out.mkdir()
    module = LitResNet9(model={"width": 8}, class_names=list("abcdefghij"), eval={"tta": "off"},
                        schedule={"epochs": 2, "batch_size": 512})
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
               out / "last.ckpt")
    proc = run_cli("cifar_ray.train", "--resume", "--output-dir", str(out), "--data-dir",
                   str(tiny_data), "--epochs", "5", "--width", "8", "--val-size", "20",
                   "--device", "cpu", timeout=300)
    assert "trainer.epochs = 2, not 5" in one_line_error(proc)


# --- 7. Trusting what can be planted ---------------------------------------------------------


def test_a_planted_image_cache_cannot_change_labels_or_classes(tmp_path):
    from cifar_ray.data.image_folders import cache_paths, read_folders

    write_class_folders(tmp_path, n_train=24, n_test=8)
    honest = read_folders(tmp_path, quiet=True)
    cache = cache_paths(tmp_path)[0]
    with np.load(cache) as cached:
        arrays = {name: cached[name] for name in cached.files}
    arrays["train_labels"] = np.full_like(arrays["train_labels"], 99)  # out of range
    arrays["classes"] = np.asarray(["planted"] * len(arrays["classes"]))
    stat_before = cache.stat()
    with open(cache, "wb") as f:
        np.savez(f, **arrays)
    os.utime(cache, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    again = read_folders(tmp_path, quiet=True)
    assert again.classes == honest.classes
    assert np.array_equal(again.train_labels, honest.train_labels)


# --- 8. Listening beyond the machine ---------------------------------------------------------

LISTENERS = """
import sys, time
from pathlib import Path
import psutil
from cifar_ray.search.cluster import configure_auth, start_ray
from cifar_ray.search.settings import TuneSettings
configure_auth("local")
start_ray(TuneSettings(), Path(sys.argv[1]))
import ray
ray.get(ray.remote(lambda: 1).remote())
time.sleep(5)
wide = set()
for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.ip not in (
                    "127.0.0.1", "::1", "::ffff:127.0.0.1"):
                wide.add(f"{proc.name()} {conn.laddr.ip}:{conn.laddr.port}")
    except psutil.Error:
        pass
ray.shutdown()
print("WIDE", sorted(wide))
"""


@pytest.mark.slow
def test_a_local_ray_instance_listens_on_the_loopback_only(sys_tmp):
    proc = subprocess.run([sys.executable, "-c", LISTENERS, str(sys_tmp)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TMPDIR=str(sys_tmp)))
    assert "WIDE" in proc.stdout, proc.stderr[-3000:]
    assert "WIDE []" in proc.stdout, proc.stdout


# --- 9. Escapes in output, and names anywhere ------------------------------------------------


def test_predict_prints_no_terminal_escape_from_a_checkpoint(tmp_path, capsys):
    from PIL import Image

    from cifar_ray import predict

    evil = ["\x1b]0;owned\x07", "\x1b[2J", "\u202egnp.exe", "$\\frac{$", *"abcdefg"]
    ckpt = save_checkpoint(tmp_path / "m.ckpt", classes=evil)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    assert predict.main(["--checkpoint", str(ckpt), str(tmp_path / "x.png"), "--top-k", "10"]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\u202e" not in printed and "\\x1b" in printed


NAMES = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=300)


@settings(**QUICK)
@given(name=NAMES)
def test_any_name_is_one_printable_line_a_file_name_and_a_figure(tmp_path, name):
    shown = shown_name(name)
    assert shown.isprintable() and len(shown) <= 80
    shown.encode("utf-8")  # no lone surrogate left
    file = tmp_path / f"x_{file_name(name)}.png"
    assert file.parent == tmp_path and len(file.name.encode()) < 255
    from cifar_ray.plots import plot_per_class_accuracy

    plot_per_class_accuracy([0.5], [shown], file)  # matplotlib draws it as text
    assert file.is_file()
    str(UserError(name)).encode("ascii", "backslashreplace").decode()


def test_a_class_folder_name_that_is_not_utf8_runs_through_the_analysis(tmp_path):
    from cifar_ray.explain import render_html

    name = os.fsdecode(b"bad\xffname")  # what a Linux folder name becomes
    summary = {"checkpoint": "m.ckpt", "split": "test", "images": 8, "accuracy": 0.75,
               "mistakes": 2, "shown": 2, "target_layer": "layer3_R", "output_dir": "out",
               "figures": []}
    page = render_html(summary, np.eye(2, dtype=int) * 3 + 1, [shown_name(name), "b"])
    assert "\\udcff" in page or "bad" in page
    page.encode("utf-8")


# --- 10. A full disk under TorchScript export ------------------------------------------------


def test_torchscript_export_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk, tmp_path):
    ckpt = save_checkpoint(tmp_path / "m.ckpt", width=64)  # a 26 MB model on a 12 MB disk
    target = small_disk / "model.pt"
    proc = run_cli("cifar_ray.export", "--checkpoint", str(ckpt), "--format", "torchscript",
                   "--output", str(target), timeout=300)
    assert "no space left to write" in one_line_error(proc)
    assert list(small_disk.iterdir()) == []

