"""`python -m cifar_ray.bench` on CPU: it runs end to end on small settings, prints its table and
writes every documented figure to JSON, with values that make sense."""

import json

import pytest

from cifar_ray.bench import ROWS
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_bench_on_cpu_writes_every_field(noisy_data, tmp_path, sys_tmp, no_leftover_ray):
    out = tmp_path / "bench.json"
    proc = run_cli("cifar_ray.bench", "--device", "cpu", "--json", str(out), "--data-dir",
                   str(noisy_data), "--width", "8", "--batch-size", "32", "--steps", "3",
                   "--warmup", "1", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key, label, _ in ROWS:
        assert key in report, key
        assert label in proc.stdout
    for key in ("plain_loop_images_s", "module_images_s", "albumentations_one_worker_images_s",
                "albumentations_all_workers_images_s", "tensor_path_images_s", "gradcam_images_s",
                "trial_overhead_s", "train_gflop_per_image", "achieved_tflops"):
        assert report[key] > 0, key
    assert report["framework_ratio"] == pytest.approx(
        report["module_images_s"] / report["plain_loop_images_s"])
    assert 0.2 < report["framework_ratio"] < 5
    assert len(report["trial_startups_s"]) == 2
    # Width 8 is 1/64 of ResNet-9's FLOPs (channels squared): 2.3 GFLOP / 64 per image.
    assert 0.02 < report["train_gflop_per_image"] < 0.06
    assert report["peak_tflops"] is None and report["fraction_of_peak"] is None  # CPU


def test_bench_refuses_cuda_where_there_is_none(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_cli("cifar_ray.bench", "--device", "cuda", "--data-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --device cuda: no CUDA device is available here"
