"""How a search sizes its trials to the machine: the GPU share that `gpus_per_worker: -1` picks,
and how many trials then run at once. A local Ray instance told it has 16 CPUs and one GPU
(Ray's resources are logical: nothing runs on the GPU here)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, search_env

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
from cifar_ray.config import load_yaml, apply_mapping
from cifar_ray.search.cluster import configure_auth, plan_resources
from cifar_ray.search.settings import SearchConfig
configure_auth("local")
import ray
ray.init(address="local", num_cpus=16, num_gpus=int(sys.argv[1]), include_dashboard=False)
try:
    results = []
    for share in json.loads(sys.argv[2]):
        cfg = SearchConfig()
        apply_mapping(cfg, load_yaml("experiments/search.yaml"), "search.yaml")
        cfg.tune.gpus_per_worker = share
        scaling, concurrent = plan_resources(cfg, ROOT)
        results.append({"gpu": scaling["resources_per_worker"]["GPU"],
                        "use_gpu": scaling["use_gpu"], "concurrent": concurrent})
    print("RESULT " + json.dumps(results))
finally:
    ray.shutdown()
"""


def _plan(gpus: int, shares: list[float], sys_tmp) -> tuple[list[dict], str]:
    proc = subprocess.run([sys.executable, "-c", f"from pathlib import Path; ROOT = Path('{ROOT}')\n"
                           + SCRIPT, str(gpus), json.dumps(shares)], cwd=ROOT, env=search_env(sys_tmp),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stdout


def test_auto_gives_each_trial_a_quarter_of_a_gpu_and_says_so(sys_tmp, no_leftover_ray):
    (auto, whole), out = _plan(1, [-1, 1], sys_tmp)
    # search.yaml: 4 CPUs per worker; 16 CPUs and a quarter GPU each: 4 trials at once.
    assert auto == {"gpu": 0.25, "use_gpu": True, "concurrent": 4}
    assert "each trial worker takes 0.25 GPU (auto: 4 trials per GPU) and 4 CPUs; 4 trials at a time" in out
    assert whole == {"gpu": 1.0, "use_gpu": True, "concurrent": 1}  # explicit: one GPU each


def test_without_gpus_auto_trains_on_cpus(sys_tmp, no_leftover_ray):
    """One CPU per trial without GPUs (cpus_per_worker: -1): 16 trials at once on 16 CPUs."""
    (auto,), out = _plan(0, [-1], sys_tmp)
    assert auto == {"gpu": 0.0, "use_gpu": False, "concurrent": 16}
    assert "GPU (auto" not in out


@pytest.mark.parametrize("cpus, gpus, workers, want", [
    (16, 1, 1, (4, 0.25, 4)),   # four trials on the GPU, the CPUs shared among them
    (2, 1, 1, (1, 0.25, 2)),    # a small GPU box (Colab): the CPUs bound the trials
    (64, 8, 1, (2, 0.25, 32)),  # 32 trials on 8 GPUs: 2 CPUs each
    (96, 8, 2, (3, 0.25, 16)),  # DDP trials: per worker
    (8, 0, 1, (1, 0.0, 8)),     # CPUs only: one each
])
def test_automatic_cpus_and_gpus_per_worker(cpus, gpus, workers, want):
    from cifar_ray.search.cluster import trials_that_fit
    from cifar_ray.search.settings import SearchConfig

    t = SearchConfig().tune
    t.workers_per_trial = workers
    gpus_per_worker, fits = trials_that_fit(t, cpus, gpus)
    assert (t.cpus_per_worker, gpus_per_worker, fits) == want


def test_a_search_this_machine_cannot_hold_is_one_line_before_any_download(tmp_path):
    """--plan exited 0 saying 'holds not one trial'; a real run downloaded CIFAR-10 and
    started Ray first."""
    import os

    from tests.conftest import run_cli

    cpus = len(os.sched_getaffinity(0))
    want = (f"error: a trial needs 999 CPUs and 0 GPUs (1 worker x 999 CPUs), but this machine "
            f"has {cpus} CPUs and 0 GPUs: give --cpus-per-worker {cpus}")
    plan = run_cli("cifar_ray.tune", "--plan", "--cpus-per-worker", "999", timeout=120)
    assert plan.returncode == 2 and plan.stderr.strip() == want, plan.stderr + plan.stdout
    data = tmp_path / "data"  # empty: CIFAR-10 would be downloaded into it
    run = run_cli("cifar_ray.tune", "--cpus-per-worker", "999", "--data-dir", str(data),
                  "--output-dir", str(tmp_path / "out"), timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == want, run.stderr[-2000:]
    assert not data.exists() and not (tmp_path / "out").exists()
