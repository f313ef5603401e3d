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
from cifar_ray.ray_cluster import configure_auth, plan_resources
from cifar_ray.search_config import SearchConfig
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
    (auto,), out = _plan(0, [-1], sys_tmp)
    assert auto == {"gpu": 0.0, "use_gpu": False, "concurrent": 4}
    assert "GPU (auto" not in out
