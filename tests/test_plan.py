"""The search's plan (plan.py, `python -m cifar_ray.tune --plan`) against Ray's own ASHA, and
the progress estimate (progress.Estimator) on made-up trials."""

import subprocess
import sys
import types

import pytest
from ray.tune.schedulers.async_hyperband import _Bracket

from cifar_ray.config import apply_mapping, load_yaml
from cifar_ray.search.plan import asha_rungs, expected_epochs, make_plan, training_gflop_per_image
from cifar_ray.search.progress import Estimator, SearchConsole
from cifar_ray.search.settings import SearchConfig
from tests.conftest import ROOT


def _config(path: str | None = None, **tune) -> SearchConfig:
    cfg = SearchConfig()
    if path:
        apply_mapping(cfg, load_yaml(ROOT / path), path)
    for key, value in tune.items():
        setattr(cfg.tune, key, value)
    cfg.validate()
    return cfg


def _ray_rungs(max_t: int, grace: int, factor: int) -> list[int]:
    """Ray's own rungs for one ASHA bracket, less one at max_t (it stops nothing)."""
    return sorted(m for m, _ in _Bracket(grace, max_t, factor, 0)._rungs if m < max_t)


@pytest.mark.parametrize("max_t, grace, factor", [
    (24, 2, 3), (3, 1, 2), (4, 4, 3), (27, 1, 3), (18, 2, 3), (100, 1, 4), (16, 1, 2)])
def test_the_rungs_are_rays(max_t, grace, factor):
    assert asha_rungs(max_t, grace, factor) == _ray_rungs(max_t, grace, factor)


def _ray_asha_trial_epochs(rewards: list[float], max_t: int, grace: int, factor: int) -> int:
    """Trial-epochs when Ray's ASHA bracket sees trials one after another, each trial's
    accuracy constant, stopping where the bracket says STOP."""
    bracket = _Bracket(grace, max_t, factor, 0)
    total = 0
    for i, reward in enumerate(rewards):
        trial = types.SimpleNamespace(trial_id=str(i))
        for epoch in range(1, max_t + 1):
            total += 1
            if bracket.on_result(trial, epoch, reward) == "STOP":
                break
    return total


def test_the_default_plan_matches_rays_asha(tmp_path):
    """`--plan` for the default search, without starting Ray (its samplers check the space)
    or reading data: ASHA's rungs and the trial-epoch
    bounds as computed here from Ray's scheduler, and the time from the given epoch seconds."""
    code = (
        "import sys, ray; ray.init = lambda *a, **k: sys.exit('ray.init called')\n"
        "from cifar_ray.tune import main\n"
        f"sys.exit(main(['--config', 'experiments/search.yaml', '--plan', '--data-dir', "
        f"'{tmp_path / 'nothing'}', '--max-concurrent', '4', '--gpus-per-worker', '0.25', "
        "'--plan-epoch-seconds', '10']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "nothing").exists()  # no download, no data dir
    text = proc.stdout
    rungs = _ray_rungs(24, 2, 3)
    assert rungs == [2, 6, 18]
    assert f"compares trials at epochs {', '.join(map(str, rungs))} of 24" in text
    # At most: Ray's ASHA stops no trial when each beats every one before it.
    most = _ray_asha_trial_epochs([i / 16 for i in range(16)], 24, 2, 3)
    assert most == 16 * 24
    # Expected: each rung keeps a third of the trials that reach it.
    alive, expected, position = 16.0, 0.0, 0
    for end in [*rungs, 24]:
        expected += alive * (end - position)
        alive, position = alive / 3, end
    assert f"at most {most} (no trial stopped), about {expected:.0f} if each rung keeps 1/3" in text
    assert "16, 4 at a time, each on 4 CPUs + 0.25 GPU" in text
    assert f"search about {expected * 10 / 4 / 60:.0f} min" in text
    assert f"GPU-hours    about {expected * 10 * 0.25 / 3600:.2g}" in text
    assert "!!" not in text  # a GPU search: no CPU warning


def test_a_random_order_stays_within_the_bounds():
    import random

    rng = random.Random(0)
    for _ in range(20):
        used = _ray_asha_trial_epochs([rng.random() for _ in range(16)], 24, 2, 3)
        assert 16 * 2 <= used <= 16 * 24


def test_the_cpu_warning_for_the_full_network_and_not_for_the_small_configs():
    full = make_plan(_config("experiments/search.yaml", cpus_per_worker=1), 2, 0.0, cpus_total=2)
    warning = full.cpu_warning()
    assert warning and "CPUs only" in warning and "experiments/search_smoke.yaml" in warning
    assert full.epoch_seconds > 600  # the full ResNet-9 on 45,000 images, on a core
    for path in ("experiments/search_smoke.yaml",):
        assert make_plan(_config(path), 2, 0.0, cpus_total=2).cpu_warning() is None
    assert make_plan(_config("experiments/search.yaml"), 4, 0.25).cpu_warning() is None


@pytest.mark.parametrize("size, res_blocks", [(32, 1), (64, 1), (32, 0), (32, 3)])
def test_the_flop_count_is_torchs(size, res_blocks):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cifar_ray.model import ResNet9

    model = ResNet9(width=16, res_blocks=res_blocks)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, size, size)).sum().backward()
    convs = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                if "convolution" in str(op))
    assert training_gflop_per_image(16, size, res_blocks) == pytest.approx(convs / 2 / 1e9,
                                                                          rel=0.01)


def test_expected_epochs_counts_what_is_left():
    rungs = [1, 2]  # max_t 3, reduction factor 2
    assert expected_epochs(0, rungs, 2, 3) == 1 + 0.5 + 0.25
    assert expected_epochs(1, rungs, 2, 3) == 1 * 1 + 0.5 * 1
    assert expected_epochs(2, rungs, 2, 3) == 1
    assert expected_epochs(3, rungs, 2, 3) == 0


def test_the_estimate_from_made_up_trials():
    """Two trials at once, 10 s start-up, 2 s per epoch at batch 64 and 4 s at 128."""
    plan = make_plan(_config("experiments/search_smoke.yaml"), 2, 0.0)
    estimator = Estimator(plan)
    assert estimator.remaining(0.0) is None  # nothing measured yet
    estimator.start("a", 64, 0.0)
    estimator.start("b", 128, 0.0)
    estimator.result("a", {"training_iteration": 1, "time/first_step_at": 10.0,
                           "time/reported_at": 12.0, "time/startup_s": 10.0}, 12.0)
    estimator.result("b", {"training_iteration": 1, "time/first_step_at": 10.0,
                           "time/reported_at": 14.0, "time/startup_s": 10.0}, 14.0)
    assert estimator.seconds_per_epoch(64) == 2 and estimator.seconds_per_epoch(128) == 4
    # a: 1.5 more epochs x 2 s, less the 2 s since its report; b: 1.5 x 4 s; two new
    # trials: 10 s + 1.75 epochs x 3 s (the mean) each; all shared by 2 slots.
    work = (1.5 * 2 - 2) + 1.5 * 4 + 2 * (10 + 1.75 * 3)
    assert estimator.remaining(14.0) == pytest.approx(work / 2)
    estimator.finish("a")
    estimator.finish("b")
    figures = estimator.line(14.0, 14.0)
    assert figures["trials_done"] == 2 and figures["trial_epochs"] == 2
    assert "2/4 trials done" in estimator.text(figures)


def test_the_search_seconds_add_up_over_sessions(tmp_path):
    """Tune saves the console's state with the experiment and hands it back on --resume."""
    plan = make_plan(_config("experiments/search_smoke.yaml"), 2, 0.0)
    first = SearchConsole(plan, tmp_path, {}, verbose=True, max_failures=2)
    first.setup()
    first._runtime["started"] -= 100  # as if it had run 100 s
    state = first.get_state()
    assert state["seconds"] == pytest.approx(100, abs=1) and state["sessions"] == 1
    second = SearchConsole(plan, tmp_path, {}, verbose=True, max_failures=2)
    second.set_state(state)
    second.setup()
    assert second.seconds() == pytest.approx(100, abs=1) and second.sessions == 2


def test_plan_flags_are_checked():
    proc = subprocess.run([sys.executable, "-m", "cifar_ray.tune", "--plan",
                           "--plan-epoch-seconds", "-3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --plan-epoch-seconds must be in (0, 86400], got -3.0"


def test_your_own_images_get_their_search_every_image_used(tmp_path):
    from tests.cifar_fixture import write_class_folders

    write_class_folders(tmp_path / "parts", n_train=300, n_test=20)
    (tmp_path / "parts" / "test").rename(tmp_path / "no-test")
    proc = subprocess.run([sys.executable, "-m", "cifar_ray.tune", "--plan", "--dataset", "folder",
                           "--data-dir", str(tmp_path / "parts")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, *rest = proc.stdout.splitlines()
    assert first == ("your own images: experiments/search_folder.yaml, every image used; no GPU "
                     "here: width 16, fitted to --budget 1h (give --width or --budget to change "
                     "them)")
    text = "\n".join(rest)
    # 300 less a fifth held out as the test set (no test/), less a tenth for validation
    assert "216 training + 24 validation images per trial-epoch; no test/ folder: a stratified " \
        "fifth of train/ is the test set" in text, text
    assert "metric       val/balanced_acc" in text and "searched     data.balance" in text
    assert "budget       60 min for the whole run" in text, text


def test_a_config_says_what_it_is_for():
    from cifar_ray.config import purpose_of

    assert purpose_of(ROOT / "experiments/search_smoke.yaml").endswith(
        "It checks the machinery, not what the recipe reaches.")
    assert purpose_of(ROOT / "experiments/search_folder.yaml").startswith("Your own images")
    assert purpose_of(ROOT / "nowhere.yaml") == ""
