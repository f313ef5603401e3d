"""`python -m cifar_ray.bench` on CPU: it runs end to end on small settings, prints its table and
writes every documented figure to JSON, with values that make sense; a section that fails or
runs out of time is recorded and the others still run."""

import json

import pytest

from cifar_ray.bench import DEFAULT_SECTIONS, SECTIONS
from tests.conftest import mains_in_a_fresh_process, run_cli

pytestmark = pytest.mark.slow


def test_bench_on_cpu_writes_every_section(noisy_data, tmp_path, sys_tmp, no_leftover_ray):
    out = tmp_path / "bench.json"
    proc = run_cli("cifar_ray.bench", "--device", "cpu", "--json", str(out), "--data-dir",
                   str(noisy_data), "--width", "8", "--batch-sizes", "32,16", "--steps", "3",
                   "--warmup", "1", "--search-trials", "1", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sections"] == list(DEFAULT_SECTIONS)
    for name in DEFAULT_SECTIONS:
        assert f"section_{name}_s" in report and f"{name}_error" not in report, name
    for key in ("plain_loop_images_s", "module_images_s", "albumentations_one_worker_images_s",
                "albumentations_all_workers_images_s", "tensor_path_images_s", "gradcam_images_s",
                "trial_overhead_s", "train_gflop_per_image", "achieved_tflops",
                "train_images_per_second", "search_wall_s", "search_training_s",
                "trial_epochs_per_s"):
        assert report[key] > 0, key
    assert set(report["by_batch_size"]) == {"32", "16"}
    assert all(row["module_ddp_images_s"] > 0 for row in report["by_batch_size"].values())
    assert report["module_images_s"] == report["by_batch_size"]["32"]["module_images_s"]
    assert report["framework_ratio"] == pytest.approx(
        report["module_images_s"] / report["plain_loop_images_s"])
    assert 0.2 < report["framework_ratio"] < 5
    # Lightning's loop runs more Python per step than the plain loop (hooks, closure, logging).
    assert 100 < report["plain_python_calls_per_step"] < report["module_python_calls_per_step"]
    assert len(report["trial_startups_s"]) == 1
    # The start-up's phases add up to it (each trial's; the medians roughly).
    phases = report["startup_phases_s"]
    assert set(phases) >= {"trial", "controller", "worker", "imports", "data", "lightning",
                           "first_step", "startup"}
    assert sum(v for k, v in phases.items() if k != "startup") == pytest.approx(
        phases["startup"], rel=0.5)
    # Some trial was training for part of the search, never for longer than the search ran.
    assert 0 < report["search_training_s"] <= report["search_wall_s"]
    # Width 8 is 1/64 of ResNet-9's FLOPs (channels squared): 2.3 GFLOP / 64 per image.
    assert 0.02 < report["train_gflop_per_image"] < 0.06
    assert 0 < report["train_seconds"] < report["train_wall_s"]  # the fit, within the command
    assert "peak_tflops" not in report  # CPU
    assert "framework ratio (module / plain)" in proc.stdout


def test_a_failing_section_is_recorded_and_the_others_still_run(noisy_data, tmp_path, sys_tmp,
                                                                no_leftover_ray):
    """The search cannot start Ray in 3 s: its section ends at the limit, with its error, its
    Ray processes stopped (no_leftover_ray), and the next section still runs and is written."""
    out = tmp_path / "bench.json"
    proc = run_cli("cifar_ray.bench", "--device", "cpu", "--json", str(out), "--data-dir",
                   str(noisy_data), "--width", "8", "--sections", "search,flops",
                   "--section-timeout", "3", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["search_error"] == "passed its limit of 3 s"
    assert report["train_gflop_per_image"] > 0 and "flops_error" not in report
    assert "search: FAILED: passed its limit of 3 s" in proc.stdout


def test_help_and_bad_flags_answer_before_torch_is_imported(tmp_path):
    calls = [["--help"], ["--sections", "framework,warp", "--data-dir", str(tmp_path)],
             ["--width", "-1", "--data-dir", str(tmp_path)],
             ["--recipe-size", "0", "--data-dir", str(tmp_path)],
             ["--recipe-seeds", "0", "--data-dir", str(tmp_path)]]
    codes, imported, stderr = mains_in_a_fresh_process("bench", calls)
    assert codes == [0, 2, 2, 2, 2] and imported == [], (codes, imported, stderr)
    errors = stderr.strip().splitlines()
    assert errors[-4].endswith("unknown section(s) warp; valid: " + ", ".join(SECTIONS)), stderr
    assert errors[-3] == "error: --width must be >= 0, got -1", stderr
    assert errors[-2].startswith("error: --recipe-size must be a multiple of 8 from 8 to 256")
    assert errors[-1] == "error: --recipe-seeds must be in [1, 100], got 0", stderr


def test_bench_refuses_cuda_where_there_is_none(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_cli("cifar_ray.bench", "--device", "cuda", "--data-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --device cuda: no CUDA device is available here"


def test_the_head_start_is_counted_in_trial_epochs_in_the_order_they_reported(tmp_path):
    from cifar_ray.measure import reports_in_order, trial_epochs_to

    for name, rows in {"run_trial_a": [(10.0, 0.2), (30.0, 0.9)],
                       "more-1/run_trial_b": [(20.0, 0.5), (40.0, 0.95)]}.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "result.json").write_text("".join(
            json.dumps({"time/reported_at": at, "val/acc": acc}) + "\n" for at, acc in rows))
    accuracies = reports_in_order(tmp_path)
    assert accuracies == [0.2, 0.5, 0.9, 0.95]
    assert trial_epochs_to(accuracies, 0.9) == 3 and trial_epochs_to(accuracies, 0.99) is None


def test_the_made_up_inspection_set_is_class_folders_of_grayscale_washers(tmp_path):
    import numpy as np

    from cifar_ray.data.image_folders import read_folders
    from cifar_ray.inspection import washer, write_inspection_set

    arrays = read_folders(write_inspection_set(tmp_path, n_train=200, n_test=60), quiet=True,
                          size=64)
    assert arrays.classes == ["faulty", "good"] and arrays.image_size == 64
    assert 0.2 < (arrays.train_labels == 0).mean() < 0.4  # about 30% faulty
    assert (arrays.train_images[..., 0] == arrays.train_images[..., 2]).all()  # grayscale
    # The fault is the only difference: the same draws with and without it differ in a few
    # pixels of the washer's face, never in the rest of the photo.
    good, bad = (washer(np.random.default_rng(5), 64, faulty) for faulty in (False, True))
    changed = (good.astype(int) - bad.astype(int)) != 0
    assert 0 < changed.sum() < 64 * 64 / 20


def test_the_pareto_comparison_counts_trial_epochs_to_the_other_searchs_hypervolume():
    from cifar_ray.pareto_bench import compare

    def trial(name, latency, accs, start):
        return {"trial": name, "epochs": len(accs), "val/acc": max(accs), "latency_ms": latency,
                "curve": list(enumerate(accs, 1)),
                "curve_at": [start + i for i in range(len(accs))]}

    # The same three models; early stopping ended the slow, poor one after one epoch.
    asha = [trial("a", 4.0, [0.5, 0.9], 0), trial("b", 1.0, [0.6, 0.7], 10),
            trial("c", 5.0, [0.3], 20)]
    full = [trial("a", 4.0, [0.5, 0.9], 0), trial("b", 1.0, [0.6, 0.7], 10),
            trial("c", 5.0, [0.3, 0.4], 20)]
    front = [{"trial": t, "config": {}, "val/acc": a, "latency_ms": l}
             for t, a, l in (("a", 0.9, 4.0), ("b", 0.7, 1.0))]
    compared = compare({"trials": asha, "front": front}, {"trials": full, "front": front})
    assert compared["trial_epochs"] == {"moasha": 5, "no_stopping": 6}
    assert compared["hypervolume"]["moasha"] == compared["hypervolume"]["no_stopping"]
    # The front is complete after the fourth epoch reported (b's second).
    assert compared["moasha_trial_epochs_to_final_hv_of_no_stopping"] == 4
    assert compared["fronts"]["moasha"]["points"] == 2
    assert compared["fronts"]["no_stopping"]["latency_span"] == 4.0


def test_the_gratings_cost_accuracy_at_half_the_size(tmp_path):
    import numpy as np

    from cifar_ray.data.image_folders import read_folders
    from cifar_ray.pareto_bench import grating, write_gratings

    arrays = read_folders(write_gratings(tmp_path, 32, n_train=100, n_test=20), quiet=True,
                          size=32)
    assert len(arrays.classes) == 10 and arrays.train_images.shape == (100, 32, 32, 3)
    # A fine grating's period is under 2 pixels at half the size: resampling flattens it
    # more than a coarse one.
    def contrast_kept(label):
        image = grating(np.random.default_rng(1), 32, label).astype(np.float32).mean(axis=2)
        half = image.reshape(16, 2, 16, 2).mean(axis=(1, 3))
        return half.std() / image.std()
    assert contrast_kept(0) < contrast_kept(5)
