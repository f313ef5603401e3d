"""What `python -m cifar_ray.bench` measures, section by section (`run`), each section
recorded even when another fails; what each number means: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import logging
import pstats
import signal
import statistics
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from cifar_ray.config import AugmentConfig, Config
from cifar_ray.data.augment import augment_batch, normalize, train_transform
from cifar_ray.data.cifar_files import SPECS
from cifar_ray.data.datamodule import ImageArrayDataset, available_cpus
from cifar_ray.data.sources import load_dataset
from cifar_ray import pareto_bench, recipe_bench
from cifar_ray.commands import ROOT, run_command
from cifar_ray.errors import UserError
from cifar_ray.files import write_json
from cifar_ray.model import ResNet9
from cifar_ray.module import LitResNet9, adam_options
from cifar_ray.names import DEFAULT_CAM_LAYER
from cifar_ray.pl import pl
from cifar_ray.runtime import build_trainer, resolve_device

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def synthetic_batches(n: int, batch: int, device: torch.device, seed: int = 0, size: int = 32):
    """`n` normalised (B, 3, size, size) batches with labels, already on the device."""
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return [(torch.randn(batch, 3, size, size, generator=gen).to(device, memory_format=fmt),
             torch.randint(0, 10, (batch,), generator=gen).to(device)) for _ in range(n)]


def plain_loop_seconds(batches, width: int, device: torch.device, warmup: int) -> float:
    """Seconds for the batches after `warmup`: Adam + OneCycleLR, bf16 autocast on CUDA."""
    torch.manual_seed(0)
    model = ResNet9(10, width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), **adam_options(0.01, 1e-4))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=len(batches),
                                                    anneal_strategy="linear")
    start = 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.nll_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    sync(device)
    return time.perf_counter() - start


class _Iterable:
    """The batches as one loader (Lightning would read a plain list as one loader per item)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class _StepClock(pl.Callback):
    """Wall time of the warm-up batches, and of the timed ones (the GPU drained at both ends
    only); on CUDA with `count_syncs`, the host-device synchronisations of the timed steps."""

    def __init__(self, warmup: int, device: torch.device, count_syncs: bool = False):
        self.warmup, self.device, self.count_syncs = warmup, device, count_syncs
        self.fit_start = self.start = self.end = 0.0
        self.syncs: list[str] = []
        self._recording = None

    def on_train_start(self, trainer, pl_module) -> None:
        sync(self.device)
        self.fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
            if self.count_syncs and self.device.type == "cuda":
                self._recording = warnings.catch_warnings(record=True)
                self.syncs = self._recording.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:  # the steps' end, not the epoch's
            if self._recording is not None:
                torch.cuda.set_sync_debug_mode("default")
                self._recording.__exit__(None, None, None)
                self.syncs = [str(w.message) for w in self.syncs
                              if "prototype feature" not in str(w.message)]
                self._recording = None
            sync(self.device)
            self.end = time.perf_counter()


def module_run(batches, width: int, device: torch.device, warmup: int, compile: str = "off",
               count_syncs: bool = False, ddp: bool = False) -> _StepClock:
    """The same batches through LitResNet9 and Lightning's fit loop; with `ddp`, under DDP with
    one rank (what a trial with several workers adds to each step)."""
    torch.manual_seed(0)
    clock = _StepClock(warmup, device, count_syncs)
    options: dict[str, Any] = {}
    if ddp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        options["strategy"] = pl.strategies.DDPStrategy(process_group_backend=backend)
    trainer = build_trainer(device.type, max_epochs=1, callbacks=[clock], **options)
    module = LitResNet9(model={"width": width})
    module.compile_mode = compile
    trainer.fit(module, train_dataloaders=_Iterable(batches))
    return clock


def python_calls_per_step(run: Callable[[list], Any], device: torch.device) -> float:
    """Python calls per training step of `run(batches)` (cProfile, a 30- less a 10-step run,
    over 20): the host's work per step, which a fast GPU waits on, independent of load."""
    short, long = synthetic_batches(10, 4, device), synthetic_batches(30, 4, device)
    run(short)
    counts = []
    for batches in (short, long):
        profile = cProfile.Profile()
        profile.runcall(run, batches)
        counts.append(pstats.Stats(profile).total_calls)
    return (counts[1] - counts[0]) / 20


def bench_framework(device: torch.device, width: int, batches_sizes: list[int], steps: int,
                    warmup: int, size: int = 32) -> dict[str, Any]:
    """At each batch size: the plain loop and the module, alternated twice (each one's best
    kept), then the module under DDP with one rank. The first batch size is the headline."""
    out: dict[str, Any] = {"by_batch_size": {}}
    for batch in batches_sizes:
        batches = synthetic_batches(warmup + steps, batch, device, size=size)
        images = steps * batch
        plain, module, syncs = [], [], None
        for attempt in range(2):
            plain.append(images / plain_loop_seconds(batches, width, device, warmup))
            clock = module_run(batches, width, device, warmup, count_syncs=attempt == 0)
            module.append(images / (clock.end - clock.start))
            syncs = clock.syncs if attempt == 0 else syncs
        clock = module_run(batches, width, device, warmup, ddp=True)
        row = {"plain_loop_images_s": max(plain), "module_images_s": max(module),
               "framework_ratio": max(module) / max(plain),
               "module_ddp_images_s": images / (clock.end - clock.start)}
        if device.type == "cuda":
            row["syncs_in_timed_steps"] = len(syncs)
            row["sync_examples"] = syncs[:2]
        out["by_batch_size"][str(batch)] = row
        del batches
    out.update(out["by_batch_size"][str(batches_sizes[0])])
    out["plain_python_calls_per_step"] = python_calls_per_step(
        lambda b: plain_loop_seconds(b, 1, device, 1), device)
    out["module_python_calls_per_step"] = python_calls_per_step(
        lambda b: module_run(b, 1, device, 1), device)
    return out


def bench_compile(device: torch.device, width: int, batch: int, steps: int,
                  warmup: int, size: int = 32) -> dict[str, Any]:
    """The module with trainer.compile: images/s after `warmup` steps, and the warm-up's
    seconds (tracing, compiling, recording CUDA graphs)."""
    batches = synthetic_batches(warmup + steps, batch, device, size=size)
    out: dict[str, Any] = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        clock = module_run(batches, width, device, warmup, compile=mode)
        key = mode.replace("-", "_")
        out[f"compile_{key}_images_s"] = steps * batch / (clock.end - clock.start)
        out[f"compile_{key}_warmup_s"] = clock.start - clock.fit_start
    return out


def bench_augment(images: np.ndarray, labels: np.ndarray, device: torch.device,
                  batch: int) -> dict[str, Any]:
    aug, norm = AugmentConfig(), SPECS["cifar10"].norm
    transform = train_transform(aug, norm, seed=0, size=images.shape[1])
    n = min(len(images), 2000)
    one = n / timed(lambda: [transform(image=images[i]) for i in range(n)], device)

    workers = available_cpus()
    loader = torch.utils.data.DataLoader(
        ImageArrayDataset(images, labels, transform), batch_size=batch, shuffle=True,
        num_workers=workers, persistent_workers=True)
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    count = min(len(loader) - 1, max(4, 4 * workers))
    seconds = timed(lambda: [next(batches) for _ in range(count)], device)
    everyone = count * batch / seconds

    stacked = torch.from_numpy(images[:batch]).permute(0, 3, 1, 2).contiguous().to(device)
    augment_batch(stacked, aug, norm)  # warm-up
    repeats = 20
    gpu = repeats * len(stacked) / timed(
        lambda: [augment_batch(stacked, aug, norm) for _ in range(repeats)], device)
    return {"albumentations_one_worker_images_s": one,
            "albumentations_all_workers_images_s": everyone, "albumentations_workers": workers,
            "tensor_path_images_s": gpu, "tensor_path_speedup": gpu / everyone}


def bench_train(data_dir: Path, on_gpu: bool, epochs: int, timeout: float,
                size: int = 32) -> dict[str, Any]:
    """`python -m cifar_ray.train` with the default recipe (on a CPU a small one)."""
    small = [] if on_gpu else ["--width", "16", "--limit-train", "2000", "--val-size", "500",
                                 "--batch-size", "128", "--num-workers", "0"]
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as tmp:
        out = Path(tmp) / "train"
        wall = run_command("cifar_ray.train", ["--data-dir", str(data_dir), "--output-dir",
                                               str(out), "--epochs", str(epochs),
                                               "--image-size", str(size),
                                               "--no-progress-bar", *small], timeout, tmp)
        results = json.loads((out / "results.json").read_text())
    return {"train_images_per_second": results["train_images_per_second"],
            "train_seconds": results["train_seconds"], "train_wall_s": round(wall, 1),
            "train_epochs": epochs, "train_test_acc": results["test_acc"]}


def bench_search(data_dir: Path, on_gpu: bool, shares: list[float], trials: int, epochs: int,
                 timeout: float, record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One real search per GPU share, every trial running all `epochs`, a 1-epoch retrain (on
    a CPU, the smoke search); each search's numbers go to `record` as soon as it ends."""
    out: dict[str, Any] = {"by_share": {}}
    for share in shares if on_gpu else [0.0]:
        if on_gpu:
            plan = ["--config", str(ROOT / "experiments/search.yaml"), "--gpus-per-worker",
                    str(share), "--max-concurrent", str(max(1, round(1 / share))),
                    "--cpus-per-worker", "2"]
        else:
            plan = ["--config", str(ROOT / "experiments/search_smoke.yaml"), "--limit-train",
                    "512", "--val-size", "256", "--num-workers", "0"]
        with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as tmp:
            search = Path(tmp) / "search"
            wall = run_command("cifar_ray.tune", [
                *plan, "--data-dir", str(data_dir), "--output-dir", str(search),
                "--num-samples", str(trials), "--epochs", str(epochs), "--grace-period",
                str(epochs), "--retrain-epochs", "1"], timeout, tmp)
            results = json.loads((search / "results.json").read_text())
            with open(search / "trials.csv") as f:
                rows = list(csv.DictReader(f))
        startups = [float(r["startup_s"]) for r in rows if r["startup_s"]]
        if not startups:
            raise UserError("the benchmark search reported no trial start-up times")
        trial_epochs = sum(int(r["epochs"]) for r in rows)
        out["by_share"][str(share)] = {
            "search_wall_s": results["tune_seconds"],
            "search_training_s": results["training_seconds"],
            "search_wall_over_training": results["tune_seconds"] / max(results["training_seconds"], 1e-9),
            "trial_epochs": trial_epochs,
            "trial_epochs_per_s": trial_epochs / results["tune_seconds"],
            "trial_overhead_s": statistics.median(startups), "trial_startups_s": startups,
            "startup_phases_s": results["startup_phases_s"], "command_wall_s": round(wall, 1)}
        record({"by_share": out["by_share"]})
    best = max(out["by_share"], key=lambda k: out["by_share"][k]["trial_epochs_per_s"])
    out.update(out["by_share"][best], best_share=float(best))
    return out


# A space where most learning rates fail (too slow or diverging) and the search matters.
WIDE_SPACE = ["--search", "optim.lr=loguniform:1e-6,1", "--search",
              "optim.weight_decay=loguniform:1e-6,1e-2"]


def small_search(on_gpu: bool) -> list[str]:
    if on_gpu:
        return ["--config", str(ROOT / "experiments/search.yaml"), *WIDE_SPACE]
    return ["--config", str(ROOT / "experiments/search_smoke.yaml"), "--num-workers", "0",
            *WIDE_SPACE]


def bench_budget(data_dir: Path, on_gpu: bool, budgets: list[str], timeout: float,
                 record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """A search per budget, with caps it cannot reach (200 trials of up to 30 epochs, a
    30-epoch retrain): the command's wall time against the budget, and what the budget was
    planned to buy against what it bought."""
    out: dict[str, Any] = {"by_budget": {}}
    for budget in budgets:
        with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as tmp:
            search = Path(tmp) / "search"
            wall = run_command("cifar_ray.tune", [
                *small_search(on_gpu), "--data-dir", str(data_dir), "--output-dir", str(search),
                "--budget", budget, "--num-samples", "200", "--epochs", "30",
                "--retrain-epochs", "30"], timeout, tmp)
            results = json.loads((search / "results.json").read_text())
        b = results["budget"]
        out["by_budget"][budget] = {
            "budget_s": b["budget_s"], "wall_s": round(wall, 1),
            "overrun": round(wall / b["budget_s"] - 1, 3), "used_s": b["used_s"],
            "planned_s": b.get("planned_s"),
            "wall_over_plan": round(wall / b.get("planned_s", b["budget_s"]) - 1, 3),
            "trials_planned": b["planned_trials"], "trials": b["trials"],
            "stopped_by_budget": b["trials_stopped_by_budget"], "epochs": b["epochs"],
            "epoch_s_planned": b["epoch_s_planned"], "epoch_s_measured": b["epoch_s_measured"],
            "retrain_epochs_planned": b["planned_retrain_epochs"],
            "retrain_epochs": results["retrain_epochs"], "test_acc": results["test_acc"]}
        record({"by_budget": out["by_budget"]})
    return out


def reports_in_order(experiment: Path) -> list[float]:
    """Every epoch's validation accuracy that a search's trials reported, in the order they
    reported it (all rounds)."""
    reports = []
    for results in experiment.glob("**/run_trial_*/result.json"):
        for line in results.read_text().splitlines():
            row = json.loads(line)
            reports.append((row["time/reported_at"], row["val/acc"]))
    return [acc for _, acc in sorted(reports)]


def trial_epochs_to(accuracies: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(accuracies) if acc >= target), None)


def bench_head_start(data_dir: Path, on_gpu: bool, seeds: int, trials: int, epochs: int,
                     timeout: float, record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Optuna's TPE, cold and warm-started from the cold search of the next seed: the
    trial-epochs each takes to reach the cold search's final best validation accuracy; then
    --resume --more `trials` on the first cold search against a new search of twice the
    trials."""
    out: dict[str, Any] = {"by_seed": {}}
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as tmp:
        def search(name: str, *extra: str) -> float:
            return run_command("cifar_ray.tune", [
                *small_search(on_gpu), "--data-dir", str(data_dir), "--output-dir",
                str(Path(tmp) / name), "--search-alg", "optuna", "--num-samples", str(trials),
                "--epochs", str(epochs), "--grace-period", "1", "--retrain-epochs", "1",
                *extra], timeout, tmp)

        cold_wall = [search(f"cold{k}", "--search-seed", str(k)) for k in range(seeds)]
        for k in range(seeds):
            search(f"warm{k}", "--search-seed", str(k), "--warm-start",
                   str(Path(tmp) / f"cold{(k + 1) % seeds}"))
            cold = reports_in_order(Path(tmp) / f"cold{k}" / "search")
            warm = reports_in_order(Path(tmp) / f"warm{k}" / "search")
            target = max(cold)
            out["by_seed"][str(k)] = {"target_val_acc": target,
                                      "cold_trial_epochs": trial_epochs_to(cold, target),
                                      "warm_trial_epochs": trial_epochs_to(warm, target),
                                      "cold_wall_s": round(cold_wall[k], 1)}
            record({"by_seed": out["by_seed"]})
        more = search("cold0", "--search-seed", "0", "--resume", "--more", str(trials))
        double = search("double", "--search-seed", "0", "--num-samples", str(2 * trials))
        out.update(more_wall_s=round(cold_wall[0] + more, 1), more_round_wall_s=round(more, 1),
                   new_search_wall_s=round(double, 1))
    return out


def bench_gradcam(images: np.ndarray, device: torch.device, width: int,
                  batch: int = 256) -> dict[str, Any]:
    """The gradcam stage's own CAM call on up to 2,048 test images in batches of `batch`,
    each batch shape warmed up first."""
    from cifar_ray.explain import compute_cams

    module = LitResNet9(model={"width": width}).to(device).eval()
    spec = SPECS["cifar10"]
    x = normalize(torch.from_numpy(images[:2048]).permute(0, 3, 1, 2), spec.norm)  # (N, 3, s, s)
    chunks = list(torch.split(x, batch))
    for chunk in {len(c): c for c in chunks}.values():  # warm-up, once per shape
        compute_cams(module, chunk, [0] * len(chunk), DEFAULT_CAM_LAYER, device)
    seconds = timed(lambda: [compute_cams(module, c, [0] * len(c), DEFAULT_CAM_LAYER, device)
                             for c in chunks], device)
    return {"gradcam_images_s": len(x) / seconds, "gradcam_batch_size": batch}


def train_flops_per_image(width: int, size: int = 32) -> float:
    """Forward + backward FLOPs of one training image, counted by torch (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ResNet9(10, width).train()
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    with FlopCounterMode(display=False) as counter:
        F.nll_loss(model(x), y).backward()
    return counter.get_total_flops() / len(x)


def peak_bf16_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b  # warm-up
    seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n ** 3 * repeats / seconds / 1e12





class SectionTimeout(Exception):
    pass


def run_section(name: str, section: Callable[[], dict[str, Any]], limit: float) -> dict[str, Any]:
    """One section's numbers, or its error: a failure or a section past `limit` seconds is
    recorded, never lost with the rest."""
    def expire(signum, frame):
        raise SectionTimeout(f"passed its limit of {limit:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    started = time.perf_counter()
    try:
        result = section()
    except (Exception, SectionTimeout) as exc:  # noqa: BLE001 (recorded, then the next section)
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"bench: {name} failed: {message}", flush=True)
        traceback.print_exc(limit=4)
        result = {f"{name}_error": message}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    result[f"section_{name}_s"] = round(time.perf_counter() - started, 1)
    return result


def bench_flops(report: dict[str, Any], width: int, size: int,
                device: torch.device) -> dict[str, Any]:
    """FLOPs per training image; with the framework section's speed, the TFLOP/s achieved."""
    per_image = train_flops_per_image(width, size)
    out = {"train_gflop_per_image": per_image / 1e9}
    if "module_images_s" in report:
        out["achieved_tflops"] = report["module_images_s"] * per_image / 1e12
    if device.type == "cuda":
        out["peak_tflops"] = peak_bf16_tflops(device)
        if "achieved_tflops" in out:
            out["fraction_of_peak"] = out["achieved_tflops"] / out["peak_tflops"]
    return out


def run(args: argparse.Namespace, sections: list[str]) -> dict[str, Any]:
    device = torch.device(resolve_device(args.device))
    on_gpu = device.type == "cuda"
    width = args.width or (64 if on_gpu else 16)
    sizes = args.batch_sizes or ([512, 256, 128] if on_gpu else [128])
    batch = sizes[0]
    steps = args.steps or (50 if on_gpu else 8)
    cfg = Config()
    cfg.data.data_dir = str(Path(args.data_dir).expanduser().resolve())
    cfg.data.image_size = size = args.image_size
    cfg.validate()
    arrays = load_dataset(cfg.data)
    data_dir = Path(cfg.data.data_dir)
    torch.set_num_threads(available_cpus())
    logging.getLogger(pl.__name__).setLevel(logging.WARNING)  # no banners between the sections
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({available_cpus()} cores)",
        "torch": torch.__version__, "width": width, "batch_size": batch, "steps": steps,
        "image_size": size,
        "sections": sections,
    }

    def record(partial: dict[str, Any]) -> None:
        report.update(partial)
        if args.json:
            write_json(args.json, report)

    available = {
        "framework": lambda: bench_framework(device, width, sizes, steps, args.warmup, size),
        "compile": lambda: (bench_compile(device, width, batch, steps, args.warmup, size) if on_gpu
                            else {"compile_note": "CUDA only"}),
        "augment": lambda: bench_augment(arrays.train_images, arrays.train_labels, device, batch),
        "gradcam": lambda: bench_gradcam(arrays.test_images, device, width,
                                         batch=1024 if on_gpu else 256),
        "flops": lambda: bench_flops(report, width, size, device),
        "train": lambda: bench_train(data_dir, on_gpu, args.train_epochs or (24 if on_gpu else 1),
                                     args.section_timeout, size),
        "budget": lambda: bench_budget(data_dir, on_gpu, args.budgets, args.section_timeout,
                                       record),
        "headstart": lambda: bench_head_start(data_dir, on_gpu, 3, args.search_trials or 6,
                                              args.search_epochs or 4, args.section_timeout,
                                              record),
        **recipe_bench.sections(args, width, data_dir, record),
        **pareto_bench.sections(args, record),
        "search": lambda: bench_search(data_dir, on_gpu, args.search_shares,
                                       args.search_trials or (8 if on_gpu else 2),
                                       args.search_epochs or (4 if on_gpu else 1),
                                       args.section_timeout, record),
    }
    for name in sections:
        print(f"bench: {name} ...", flush=True)
        record(run_section(name, available[name], args.section_timeout))  # nothing measured is lost
    return report
