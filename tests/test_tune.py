"""`python -m cifar_ray.tune`: a real ASHA search over Ray Train trials on CPU, its outputs,
resuming an interrupted search, and the errors raised before any trial starts.

Every test starts its own local Ray instance through the CLI (in a subprocess) and checks
afterwards that no Ray process it started is still running; any that is gets stopped by pid.
"""

import csv
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import (
    ARTIFACTS,
    ROOT,
    SMOKE,
    another_ray_instance,
    mains_in_a_fresh_process,
    run_cli,
    search_env,
)
from tests.mlflow_server import FakeMlflow
from tests.processes import files_containing, free_port

pytestmark = pytest.mark.slow

PHASE_COLUMNS = ["trial_s", "controller_s", "worker_s", "imports_s", "data_s", "footprint_s",
                 "lightning_s", "first_step_s"]


def _read_trials(out: Path) -> list[dict]:
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_the_readmes_main_command_as_written_runs_the_whole_search(noisy_data, tmp_path, sys_tmp,
                                                                    no_leftover_ray, browser):
    """The README's first command, after its install, run as written in a fresh folder whose
    ./data holds the tests' data set (with the user's own Ray token and a home directory to see
    what gets written there): on this machine (no GPU) the quick CPU search, said in its first
    line, to a finished report.html of a model that learned. Its outputs, its console,
    report.html in a browser, TensorBoard's HParams."""
    readme = (ROOT / "README.md").read_text()
    (line,) = [l.strip() for l in readme.splitlines()
               if l.startswith("    python3 -m venv .venv && .venv/bin/pip install -e . &&")]
    command = line.split(" && ")[-1]
    assert command.startswith(".venv/bin/"), command
    program, *args = command[len(".venv/bin/"):].split()
    folder = tmp_path / "fresh"
    folder.mkdir()
    (folder / "data").symlink_to(noisy_data)
    token, home = secrets.token_hex(32), sys_tmp / "home"
    home.mkdir()
    proc = subprocess.run([str(Path(sys.executable).parent / program), *args], cwd=folder,
                          env=search_env(sys_tmp, RAY_AUTH_TOKEN=token, HOME=str(home),
                                         CIFAR_RAY_PROGRESS_EVERY="3"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("no GPU here: the quick CPU search"), \
        proc.stdout[:500]
    out = folder / "outputs" / "search_smoke"
    assert token not in proc.stdout + proc.stderr and not files_containing(out, token)
    _check_console(proc.stdout, proc.stderr, out)
    assert not (home / ".ray").exists()

    trials = _read_trials(out)
    assert len(trials) >= 4
    assert all(0 < float(t["startup_s"]) < 300 for t in trials), trials  # measured, per trial
    assert any(t["status"] == "stopped early" and int(t["epochs"]) < 3 for t in trials), trials
    results = json.loads((out / "results.json").read_text())
    best_row = max(trials, key=lambda t: float(t["best_score"] or -1))
    assert results["best_score"] == pytest.approx(float(best_row["best_score"]))
    assert list(trials[0]) == ["trial_id", "optim.lr", "optim.weight_decay", "trainer.batch_size",
                               "epochs", "best_score", "status", "origin", "round",
                               "startup_s", *PHASE_COLUMNS,
                               "train_s"]
    # Each trial's start-up, phase by phase: the phases add up to it.
    for t in trials:
        phases = [float(t[column]) for column in PHASE_COLUMNS]
        assert all(p >= 0 for p in phases), t
        assert sum(phases) == pytest.approx(float(t["startup_s"]), abs=0.05), t
        assert 0 < float(t["train_s"]) < 300, t
    _check_reports_reach_tune_at_once(out)
    assert results["best_config"]["optim.lr"] == pytest.approx(float(best_row["optim.lr"]))
    assert results["best_config"]["trainer.batch_size"] == int(best_row["trainer.batch_size"])
    assert results["num_trials"] == len(trials)
    # Retrained and tested once: the planted signal is learned (10% of test labels are noise).
    assert results["test_acc"] > 0.6
    for key in ("test_loss", "checkpoint", "gradcam_dir"):
        assert key in results
    # The retrained checkpoint loads without Ray, safely.
    from cifar_ray.module import load_module
    assert load_module(results["checkpoint"]).data_config.val_size == 0

    gradcam = Path(results["gradcam_dir"])
    for name in ("misclassified.png", "gradcam_true_vs_pred.png", "confusion_matrix.png",
                 "per_class_accuracy.png"):
        with Image.open(gradcam / name) as image:
            image.verify()
            assert image.format == "PNG"
    assert (out / "summary.md").read_text().startswith("# Search summary")
    assert "done: best optim.lr=" in proc.stdout
    assert "Trial status" in proc.stdout + proc.stderr  # Tune's progress table
    # tune.max_concurrent (2 in search_smoke.yaml) holds: never more trials running at once.
    running = [int(n) for n in re.findall(r"Trial status:.*?(\d+) RUNNING", proc.stdout + proc.stderr)]
    assert running and max(running) <= 2, running
    # Nothing left behind outside the output dir.
    assert not list(sys_tmp.glob("lightning_checkpoints*"))
    assert not (out / "tmp").exists()
    # The console's last lines name the report page first.
    assert proc.stdout.strip().splitlines()[-5] == f"  report:  {out / 'report.html'}"
    assert results["report"] == str(out / "report.html")
    assert "search (random)" in proc.stdout and results["search_alg"] == "random"
    _check_tensorboard_hparams(out, trials)
    _check_report_page(out, browser)


def _check_reports_reach_tune_at_once(out: Path) -> None:
    """The epochs' reports reached Tune (and ASHA) at once: half of them within half a second
    of the worker's report, none later than 2.5 s. With Ray Train's default poll of the
    workers, every 2 s, these smoke epochs of 1-3 s waited 0-2 s each (1 s in the middle),
    and epochs shorter than the poll queued up (trial.POLL_S)."""
    waits = []
    for result in out.glob("search/*/result.json"):
        for report in map(json.loads, result.read_text().splitlines()):
            # time_total_s: the trial's process got the report, from the trainable's start,
            # which is before the trial function's (so this over-states the wait, never less).
            sent = report["time/reported_at"] - report["time/first_step_at"] + report["time/startup_s"]
            waits.append(report["time_total_s"] - sent)
    assert waits and sorted(waits)[len(waits) // 2] < 0.5 and max(waits) < 2.5, sorted(waits)


def _check_console(stdout: str, stderr: str, out: Path) -> None:
    """What a person reads: the plan, one line per trial event, Tune's table, the progress line
    (with an estimate that was right within a factor of three half-way), the retrain's epochs;
    Ray's and Lightning's per-worker chatter in logs/workers.log instead."""
    console = stdout + stderr
    plan = console.index("plan:\n  trials       4, 2 at a time, each on 1 CPU")
    assert "compares trials at epochs 1, 2 of 3" in console
    assert plan < console.index(" started: optim.lr=")  # the plan comes before any trial
    assert "!!" not in console  # the small config: no CPU warning
    assert re.search(r"trial \w+ (stopped by ASHA at epoch [12]|finished: 3 epochs) \(val/acc", console)
    assert re.search(r"progress: \d/4 trials done, \d running; \d+ trial-epochs \(at most 12, "
                     r"about 7 expected\); .* elapsed, about .* left \(per epoch: ", console)
    assert "retrain epoch 2/2: train/acc=" in console and "about 0 s left" in console
    log = (out / "logs" / "workers.log").read_text()
    for chatter in ("Reporting training result", "Started training worker group of size 1"):
        assert chatter in log and chatter not in console
    # One worker per trial: no torch process group (Ray Train's plain trainer; trial.py).
    assert "Setting up process group" not in log
    assert "litlogger" not in console and "set_float32_matmul_precision" not in console
    assert f"worker output (Ray Train, Lightning): {out / 'logs' / 'workers.log'}" in console
    # The estimate at the search's half-way point, against the time the search really had left.
    records = [json.loads(line) for line in (out / "logs" / "progress.jsonl").read_text().splitlines()]
    end = records[-1]["time"]
    began = end - records[-1]["elapsed_s"]
    half = min((r for r in records if r["left_s"] > 0),
               key=lambda r: abs(r["time"] - (began + end) / 2))
    real = end - half["time"]
    # Within a factor of 5: under the parallel suite the trials' start-ups, which the estimate
    # extrapolates, vary with what the other worker runs (4.4 once, beside tests that start
    # commands); its accuracy on a quiet machine is docs/benchmarks.md's.
    assert 1 / 5 <= half["left_s"] / real <= 5, (half, real, records)


def _check_tensorboard_hparams(out: Path, trials: list[dict]) -> None:
    """`tensorboard --logdir <out>`: one run per trial (its Lightning logs) and the retrain,
    each with its sampled values in the HParams tab and its val/acc curve; no second run per
    trial from Tune's own logger."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    logs = EventMultiplexer()
    logs.AddRunsFromDirectory(str(out))
    logs.Reload()
    hparams = {}
    for run, tags in logs.PluginRunToTagToContent("hparams").items():
        for content in tags.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                hparams[run] = {key: value.number_value
                                for key, value in data.session_start_info.hparams.items()}
    assert len(hparams) == len(trials) + 1, sorted(hparams)
    for t in trials:
        (run,) = [r for r in hparams if f"train-{t['trial_id']}/" in r]
        assert hparams[run] == {"optim.lr": pytest.approx(float(t["optim.lr"])),
                                "optim.weight_decay": pytest.approx(float(t["optim.weight_decay"])),
                                "trainer.batch_size": int(t["trainer.batch_size"])}
        assert len(logs.Scalars(run, "val/acc")) == int(t["epochs"])
    retrain = hparams["retrain/tensorboard"]
    assert retrain["optim.lr"] == pytest.approx(json.loads(
        (out / "results.json").read_text())["best_config"]["optim.lr"])


def _check_report_page(out: Path, browser) -> None:
    """report.html opened from disk in Chromium: every figure loads (none broken), in the
    order the page promises; the screenshot is kept in test-artifacts/."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate("Array.from(document.images).map(i => "
                           "[i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    # The README's search runs 4 trials: too few for fANOVA's importance (a line says so).
    assert [src for src, _ in images][:4] == [
        "report/curves.png", "report/parallel_coordinates.png", "report/slices.png",
        "retrain/curves.png"]
    assert "left out below 10 scored trials" in page.content()
    assert any(src.startswith("gradcam/") for src, _ in images)
    assert all(loaded for _, loaded in images), images
    assert page.locator("h1").inner_text() == "Search report"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search_report.png"), full_page=True)
    page.close()


def test_a_search_over_other_config_keys_on_your_own_images(class_folders, tmp_path, sys_tmp,
                                                             no_leftover_ray):
    """Any config key can be searched: the model's width, the cutout probability and the image
    size here. Each key is a column of trials.csv and a key of best_config, and the retrain
    builds the winner, at the winner's image size.
    The data is a class-folder set with a val/ folder (tests/cifar_fixture.py): the search
    learns on it, and GradCAM and the report work on it unchanged. The retrain is stopped by
    SIGTERM half-way (exit 143, one line), and --resume finishes it. Another Ray instance is
    up beside the search all along (another_ray_instance)."""
    space = tmp_path / "space.yaml"
    space.write_text("search:\n  model.width: {choice: [8, 16]}\n"
                     "  augment.cutout_p: {uniform: [0, 1]}\n"
                     "  data.image_size: {choice: [32, 48]}\n")
    out = tmp_path / "search"
    password = f"pw-{secrets.token_hex(8)}"
    with FakeMlflow(tmp_path / "mlflow_artifacts", "ada", password) as server, \
            another_ray_instance(tmp_path, sys_tmp) as other:
        # MLflow over HTTP with a password in the URI: it must reach the server, and nothing
        # else (checked at the end).
        uri = server.url.replace("http://", f"http://ada:{password}@")
        _search_on_folders_resumed(class_folders, space, out, tmp_path, sys_tmp, uri)
        assert other.poll() is None  # the other instance was up all along
    assert {auth for _, _, auth in server.requests} == {server.expected}
    runs = [r for r in server.runs.values() if r["info"]["status"] == "FINISHED"]
    kinds = sorted(tag["value"] for r in runs for tag in r["data"]["tags"]
                   if tag["key"] == "cifar_ray")
    assert kinds == ["retrain", "trial", "trial", "trial"], kinds
    written = files_containing(tmp_path, password) + files_containing(sys_tmp, password)
    assert written == [], written


def _search_on_folders_resumed(class_folders, space, out, tmp_path, sys_tmp, uri) -> None:
    args = [sys.executable, "-m", "cifar_ray.tune", *SMOKE, "--config", str(space),
            "--dataset", "folder", "--data-dir", str(class_folders), "--output-dir", str(out),
            "--num-samples", "3", "--epochs", "2", "--grace-period", "2",
            "--retrain-epochs", "2", "--lr", "0.01", "--batch-size", "64", "--mlflow-uri", uri]
    password = uri.split(":")[2].split("@")[0]
    # SIGTERM once the retrain's first epoch is done.
    output = _sigterm_when(lambda log: (out / "retrain" / "last.ckpt").exists(), args,
                           tmp_path / "first.log", sys_tmp)
    assert password not in output
    assert output.strip().splitlines()[-1] == (
        "error: stopped during the retrain; run the same command with --resume to finish (the "
        "search's trials are kept)")
    assert "SIGTERM: stopping (Ctrl-C again to abort) ..." in output
    assert "*** " not in output and not (out / "results.json").exists()

    proc = subprocess.run([*args, "--resume"], cwd=ROOT, env=search_env(sys_tmp),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert password not in proc.stdout + proc.stderr
    assert " started: " not in proc.stdout  # no trial ran again
    trials = _read_trials(out)
    assert list(trials[0]) == ["trial_id", "model.width", "augment.cutout_p", "data.image_size",
                               "epochs", "best_score", "status", "origin", "round",
                               "startup_s", *PHASE_COLUMNS,
                               "train_s"]
    assert {t["model.width"] for t in trials} <= {"8", "16"}
    assert {t["data.image_size"] for t in trials} <= {"32", "48"}
    assert all(0 <= float(t["augment.cutout_p"]) <= 1 for t in trials)
    results = json.loads((out / "results.json").read_text())
    best = max(trials, key=lambda t: float(t["best_score"]))
    assert results["best_config"] == {"model.width": int(best["model.width"]),
                                      "augment.cutout_p": pytest.approx(float(best["augment.cutout_p"])),
                                      "data.image_size": int(best["data.image_size"])}
    from cifar_ray.module import load_module
    retrained = load_module(results["checkpoint"])
    assert (retrained.width, retrained.image_size) == (int(best["model.width"]),
                                                       int(best["data.image_size"]))
    assert f"model.width={best['model.width']}" in proc.stdout
    assert "model.width = " in (out / "summary.md").read_text()
    # Learned on the user's images: 4 classes, chance is 0.25.
    assert results["best_score"] > 0.5 and results["test_acc"] > 0.6, results
    assert (out / "gradcam" / "index.html").is_file() and (out / "report.html").is_file()
    assert results["resumes"] == 1


def test_an_interrupted_or_killed_search_resumes(noisy_data, tmp_path, sys_tmp, no_leftover_ray):
    """SIGTERM, then --resume, then SIGKILL, then --resume: all 4 trials end, none trains twice.

    The kill is made unlucky every time. Tune saves its experiment state every few seconds; a
    driver killed between two saves leaves a state that lists trials as unfinished while their
    Ray Train runs went on, here one of them to its last epoch (the state is put back as it was
    first saved in the second session), and a checkpoint is damaged while the search is down.
    Resumed, each trial must hand Tune every epoch of its run, once and in order, and go on from
    the run's latest checkpoint that loads (before the fix, a finished run returned no result
    and Tune stopped the search: "Trial returned a result which did not include ... val/acc").
    The searcher is Optuna's TPE, seeded: restarted afresh on a resume it would draw the first
    trials' values again; restored with the experiment, every trial's values are new.
    The trials write to a storage path of their own (tune.storage, as on a cluster's shared
    file system): --resume looks for the search there."""
    out = tmp_path / "search"
    storage = tmp_path / "shared"
    state = storage / "search"
    # Two at a time (search_smoke.yaml); no trial stopped by ASHA: each has 3 epochs to hand on.
    args = [sys.executable, "-m", "cifar_ray.tune", *SMOKE, "--data-dir", str(noisy_data),
            "--output-dir", str(out), "--retrain-epochs", "1", "--num-samples", "4",
            "--grace-period", "3", "--search-alg", "optuna", "--storage", str(storage)]

    # SIGTERM (as `kill`, `timeout`, Slurm send it) once the first trial has finished (the two
    # first may finish together) and the rest have not: the search stops as on Ctrl-C
    # (tests/test_signals.py: both signals).
    driver, log = _start(args, tmp_path / "first.log", sys_tmp)
    _wait_for_finished_trials(state, 1, driver)
    driver.send_signal(signal.SIGTERM)
    driver.wait(timeout=300)
    output = log.read_text()
    assert driver.returncode == 143, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("error: search interrupted; its state is "
                                                      f"saved in {state}: "), output[-3000:]
    assert "run the same command with --resume" in output
    assert "SIGTERM received" not in output and "*** " not in output  # no C++ stack dumps
    assert not (out / "results.json").exists()
    done_first = {trial_id: _startups(state, trial_id) for trial_id in _finished_trials(state)}

    # Resume; keep Tune's state as this session first saves it, with more trials listed than
    # have finished; SIGKILL (no chance to clean up) once one more has finished, before the
    # search ends (its last trials may have finished too: then both runs are handed over).
    driver, log = _start([*args, "--resume"], tmp_path / "second.log", sys_tmp)
    early = tmp_path / "early_state"
    deadline = time.time() + 300
    while not (len(list(state.glob("experiment_state*.json"))) == 2
               and len(_listed_trials(state)) > len(done_first)):
        assert time.time() < deadline and driver.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    shutil.copytree(state, early, ignore=shutil.ignore_patterns("train_runs"))  # Tune's files
    assert set(_finished_trials(early)) == set(done_first), "a trial finished before the save"
    _wait_for_finished_trials(state, len(done_first) + 1, driver)
    driver.kill()
    driver.wait()
    assert not (out / "results.json").exists()
    finished = {trial_id: _startups(state, trial_id) for trial_id in _finished_trials(state)
                if trial_id not in done_first}
    for path in state.iterdir():  # Tune's files put back; the Train runs inside stay as they are
        if path.name != "train_runs":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.copytree(early, state, dirs_exist_ok=True)  # the state lags the Train runs
    # And a checkpoint damaged while the search was down: the latest of a run the state lists
    # as unfinished and that had not finished (of a finished one if both had), cut in half.
    listed = [trial_id for trial_id in _listed_trials(state) if trial_id not in done_first]
    runs = sorted((state / "train_runs" / f"train-{trial_id}" for trial_id in listed),
                  key=lambda run: run.name[6:] in finished)
    damaged_run = next(run for run in runs if list(run.glob("epoch_*")))
    damaged = sorted(damaged_run.glob("epoch_*/checkpoint.ckpt"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
    finished.pop(damaged_run.name[6:], None)  # that run trains again from an earlier epoch

    proc = subprocess.run([*args, "--resume"], cwd=ROOT, env=search_env(sys_tmp),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # One line on the console says so, and the search goes on.
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: trial ")]
    assert len(warnings) == 1 and f"its checkpoint {damaged} is unreadable" in warnings[0]
    assert re.search(r"; (going on from epoch_\d{4}_\w{8}|starting the trial over)$", warnings[0])
    trials = {t["trial_id"]: t for t in _read_trials(out)}
    assert len(trials) == 4 and all(t["status"] == "completed" and t["epochs"] == "3"
                                    for t in trials.values()), trials
    samples = {(t["optim.lr"], t["optim.weight_decay"], t["trainer.batch_size"])
               for t in trials.values()}
    assert len(samples) == 4, trials  # no values drawn twice: the searcher went on
    for result in state.glob("*/result.json"):  # every epoch reached Tune once, in order
        epochs = [json.loads(line)["epoch"] for line in result.read_text().splitlines() if line]
        assert epochs == [0, 1, 2], (result, epochs)
    # The finished runs were kept or handed over, not trained again: their reports are the
    # first run's (a second training would have measured its own start-up time).
    for trial_id, startups in {**done_first, **finished}.items():
        assert _startups(state, trial_id) == startups
    results = json.loads((out / "results.json").read_text())
    assert results["num_trials"] == 4 and results["experiment_dir"] == str(state)
    assert not (out / "search").exists()
    # The times count all three sessions: their count came back with Tune's saved state.
    assert results["resumes"] == 2, results
    assert results["search_seconds"] >= results["tune_seconds"] >= results["training_seconds"] > 0
    assert "(over 3 sessions: resumed 2 times)" in (out / "summary.md").read_text()


def _startups(state: Path, trial_id: str) -> list[float]:
    """The start-up seconds in each of a trial's reports to Tune."""
    (result,) = [p for p in state.glob("*/result.json") if trial_id in p.parent.name]
    return [json.loads(line)["time/startup_s"] for line in result.read_text().splitlines() if line]


def _listed_trials(state: Path) -> list[str]:
    """The ids of the trials Tune's last saved experiment state lists (none while it is being
    rewritten)."""
    saved = sorted(state.glob("experiment_state*.json"))
    try:
        data = json.loads(saved[-1].read_text())["trial_data"] if saved else []
    except (ValueError, KeyError):  # being rewritten
        return []
    return [json.loads(trial)["trial_id"] for trial, _ in data]


def _start(args: list[str], log: Path, sys_tmp: Path) -> tuple[subprocess.Popen, Path]:
    with open(log, "w") as f:  # a file, not a pipe nobody reads while we wait
        driver = subprocess.Popen(args, cwd=ROOT, env=search_env(sys_tmp), stdout=f,
                                  stderr=subprocess.STDOUT)
    return driver, log


def _sigterm_when(ready, args: list[str], log: Path, sys_tmp: Path) -> str:
    """Start the command, SIGTERM it once `ready(its output so far)`; it must exit 143. Returns
    its output."""
    driver, log = _start(args, log, sys_tmp)
    deadline = time.time() + 600
    while not ready(log.read_text()):
        assert time.time() < deadline and driver.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    driver.wait(timeout=300)
    output = log.read_text()
    assert driver.returncode == 143, output[-3000:]
    return output


def _wait_for_finished_trials(state: Path, n: int, driver: subprocess.Popen) -> float:
    """Waits until `n` trials have finished, while the driver runs; returns when."""
    deadline = time.time() + 600
    while len(_finished_trials(state)) < n:
        assert time.time() < deadline and driver.poll() is None, \
            "the search ended before it could be interrupted"
        time.sleep(0.5)
    return time.time()


def _finished_trials(state: Path) -> dict[str, int]:
    """Trial id -> epochs, for the trials Tune recorded as done."""
    done = {}
    for result in state.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("done"):
            done[lines[-1]["trial_id"]] = lines[-1]["training_iteration"]
    return done


@pytest.mark.parametrize("extra, yaml_text, message", [
    ([], "search:\n  optim.lr: {loguniform: [0.1, 0.001]}\n",
     "search optim.lr: empty or inverted range"),
    ([], "search:\n  optim.momentum: {uniform: [0.8, 0.9]}\n",
     "unknown config key 'optim.momentum'"),
    ([], "search:\n  trainer.batch_size: {choice: []}\n", "choice needs at least one value"),
    ([], "search:\n  model.width: {uniform: [8, 16]}\n",
     "uniform samples floats, but model.width is an int"),
    (["--address", f"127.0.0.1:{free_port()}"], "", "cannot reach a Ray cluster at 127.0.0.1:"),
    (["--workers-per-trial", "64"], "", "a trial needs 64 CPUs"),
])
def test_bad_search_input_exits_2_before_any_trial(noisy_data, tmp_path, extra, yaml_text,
                                                   message, no_leftover_ray):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text or "{}\n")
    out = tmp_path / "o"
    proc = run_cli("cifar_ray.tune", *SMOKE, "--config", str(cfg), "--data-dir", str(noisy_data),
                   "--output-dir", str(out), *extra, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not (out / "trials.csv").exists() and not list(out.glob("search/*/result.json"))


@pytest.mark.parametrize("small_disk", [64], indirect=True)  # MB: room for the whole search
def test_a_search_out_of_disk_stops_at_once_and_resumes_with_room(noisy_data, small_disk,
                                                                    tmp_path, sys_tmp,
                                                                    no_leftover_ray):
    """A trial's checkpoint fills the disk (a real tmpfs): the search stops -- a retry, or
    any other trial, would fail the same way -- with one line that names the file and says
    how to go on, exit 2, its state saved; with room again, --resume finishes it. (Ray Train
    restarts the trial's worker, tune.max_failures times, before Tune hears of it; then Tune
    would retry the trial as often.)"""
    out = small_disk / "search"
    filler = small_disk / "filler"
    # 6 MB left: the first checkpoint fits (about 1.6 MB of weights and 3.2 of Adam's state),
    # not the second epoch's beside it.
    filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - 6 * 2**20))
    args = [sys.executable, "-m", "cifar_ray.tune", *SMOKE, "--data-dir", str(noisy_data),
            "--output-dir", str(out), "--num-samples", "1", "--epochs", "2", "--grace-period",
            "2", "--retrain-epochs", "1", "--max-failures", "1"]
    proc = subprocess.run(args, cwd=ROOT, env=search_env(sys_tmp), capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: the search stopped: no space left to write \S+ \(No space left "
                        r"on device\); its state is saved in \S+: free some space and run the "
                        r"same command with --resume", last), output[-3000:]
    assert re.search(r"trial \w+ failed: no space left to write \S+ \(No space left on "
                     r"device\); stopping the search", proc.stdout), proc.stdout[-3000:]
    assert "retry 1 of 1" not in output  # Tune did not try the trial again
    assert "Tuner.restore" not in output  # Tune's advice: --resume is this command's way
    assert list((out / "search").glob("experiment_state*.json"))

    filler.unlink()
    proc = subprocess.run([*args, "--resume"], cwd=ROOT, env=search_env(sys_tmp),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = _read_trials(out)
    assert len(trials) == 1 and trials[0]["status"] == "completed" and trials[0]["epochs"] == "2", \
        trials
    assert json.loads((out / "results.json").read_text())["test_acc"] > 0.3


def test_a_long_cpu_search_is_announced_before_its_first_trial(noisy_data, tmp_path, sys_tmp,
                                                                no_leftover_ray):
    """The full-size network on CPUs, 200 trials of up to 100 epochs: hours. The warning comes
    before Tune starts (and so before the first trial); the search goes on until it is
    stopped, here as soon as Tune has started."""
    out = tmp_path / "search"
    args = [sys.executable, "-m", "cifar_ray.tune", "--config", "experiments/search.yaml",
            "--data-dir", str(noisy_data),
            "--output-dir", str(out), "--device", "cpu", "--num-samples", "200", "--epochs",
            "100", "--cpus-per-worker", "1", "--max-concurrent", "1", "--val-size", "200"]
    tune_started = "Configuration for experiment"  # Tune's first lines
    output = _sigterm_when(lambda log: tune_started in log, args, tmp_path / "driver.log",
                           sys_tmp)
    warning = output.index("!! This search trains on CPUs only and would take about ")
    assert warning < output.index(tune_started)
    assert "python -m cifar_ray.tune --config experiments/search_smoke.yaml" in output


def test_help_and_bad_input_answer_before_torch_is_imported(noisy_data, tmp_path):
    """The pipeline checks its flags, search space and output dir before it imports torch or
    Lightning (seconds on a small machine), and Ray only for its samplers, which check a
    valid-looking space: `--help` and a mistake answer at once."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  optim.momentum: {uniform: [0.8, 0.9]}\n")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "results.json").write_text("{}")
    data = str(noisy_data)
    # (Without --config, a local search is sized to this machine's GPUs first: torch.)
    calls = [["--help"], ["--data-dir", data, "--config", str(bad)],
             ["--data-dir", data, "--output-dir", str(finished), "--config",
              "experiments/search.yaml"]]
    codes, imported, stderr = mains_in_a_fresh_process("tune", calls)
    assert codes == [0, 2, 2] and set(imported) <= {"ray"}, (codes, imported, stderr)
    errors = stderr.strip().splitlines()
    assert len(errors) == 2, stderr
    assert "unknown config key 'optim.momentum'" in errors[0]
    assert errors[1].startswith(f"error: {finished} already holds a finished search"), errors[1]


def test_a_budget_stops_running_trials_at_its_deadline_and_more_adds_trials(
        noisy_data, tmp_path, sys_tmp, no_leftover_ray):
    """A 2-minute budget sized from an epoch estimate far too small (0.5 s): it buys 20-epoch
    trials, and the deadline, corrected by the trials' own epochs, stops those running, their
    results kept; the best is retrained in the time left. Then --resume --more 1 adds exactly
    one trial to the finished search, chooses over all and reports again."""
    out = tmp_path / "search"
    args = [*SMOKE, "--data-dir", str(noisy_data), "--output-dir", str(out), "--num-samples",
            "20", "--epochs", "20", "--grace-period", "1", "--retrain-epochs", "30",
            "--budget", "2m", "--plan-epoch-seconds", "0.5",
            "--try", "optim.lr=0.003,trainer.batch_size=64"]
    proc = run_cli("cifar_ray.tune", *args, env={"TMPDIR": str(sys_tmp)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "  it buys      about " in proc.stdout and "of up to 20 epochs" in proc.stdout
    assert re.search(r"budget: \d+ s of 2 min used", proc.stdout), proc.stdout[-3000:]
    trials = _read_trials(out)
    stopped = [t for t in trials if t["status"] == "stopped by the budget"]
    assert stopped and all(t["best_score"] and int(t["epochs"]) < 20 for t in stopped), trials
    assert [t["origin"] for t in trials].count("--try") == 1, trials
    results = json.loads((out / "results.json").read_text())
    budget = results["budget"]
    assert budget["trials_stopped_by_budget"] == len(stopped) and budget["epochs"] == 20
    assert budget["used_s"] < 1.5 * 120  # kept, give or take (docs/benchmarks.md: how close)
    assert 1 <= results["retrain_epochs"] < 30  # the time left bought fewer than the cap
    assert results["test_acc"] > 0.5  # the best was retrained, and learned
    assert "stopped by the budget" in (out / "report.html").read_text()
    page_before = (out / "report.html").stat().st_mtime_ns

    more = run_cli("cifar_ray.tune", *args, "--resume", "--more", "1", "--retrain-epochs", "1",
                   env={"TMPDIR": str(sys_tmp)})
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    after = _read_trials(out)
    assert len(after) == len(trials) + 1
    assert {t["trial_id"] for t in trials} < {t["trial_id"] for t in after}
    assert [t["round"] for t in after].count("1") == 1
    again = json.loads((out / "results.json").read_text())
    assert again["rounds"] == 2 and again["num_trials"] == len(after)
    best = max(after, key=lambda t: float(t["best_score"] or -1))
    assert again["best_score"] == pytest.approx(float(best["best_score"]))
    assert (out / "report.html").stat().st_mtime_ns > page_before
    assert (out / "search" / "more-1").is_dir()
