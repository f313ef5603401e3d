"""`python -m cifar_ray.bench [--device cpu|cuda] [--json OUT]`: how fast this project trains,
augments, starts trials and explains, on this machine. Prints a table; `--json` writes it.

  framework   training images/s of the project's LightningModule (Lightning's fit loop) and of
              a plain PyTorch loop over the same model, batch size, precision and device, fed
              the same in-memory batches: `framework_ratio` = module / plain.
  augment     images/s of the Albumentations recipe (one process, and a DataLoader with one
              worker per CPU) and of the batched tensor path on the device (augment.py's tensor engine).
  tune        a small real search (`python -m cifar_ray.tune`, 2 trials of 1 epoch): each
              trial's start to its first training step (`trial_overhead_s`: the median).
  gradcam     GradCAM images/s (the gradcam stage's CAM on the default layer).
  flops       training FLOPs per image (counted by torch's FlopCounterMode), the achieved
              TFLOP/s of the module, and on CUDA the device's measured peak (a large bf16
              matmul) and the fraction of it reached.

Numbers go in docs/benchmarks.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from cifar_ray.config import AugmentConfig, Config
from cifar_ray.augment import augment_batch, normalize, train_transform
from cifar_ray.cifar_files import SPECS, load_dataset
from cifar_ray.data import ImageArrayDataset, available_cpus
from cifar_ray.errors import UserError, cli_entry
from cifar_ray.files import write_json
from cifar_ray.model import ResNet9
from cifar_ray.module import LitResNet9
from cifar_ray.pl import pl
from cifar_ray.runtime import build_trainer

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Training: the LightningModule vs a plain loop


def synthetic_batches(n: int, batch: int, device: torch.device, seed: int = 0):
    """`n` normalised (B, 3, 32, 32) batches with labels, already on the device."""
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return [(torch.randn(batch, 3, 32, 32, generator=gen).to(device, memory_format=fmt),
             torch.randint(0, 10, (batch,), generator=gen).to(device)) for _ in range(n)]


def plain_loop_seconds(batches, width: int, device: torch.device, warmup: int) -> float:
    """Seconds for the batches after `warmup`: Adam + OneCycleLR, bf16 autocast on CUDA."""
    torch.manual_seed(0)
    model = ResNet9(10, width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
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
    """Wall time from the start of batch `warmup` to the end of the last batch."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.start, self.end = warmup, device, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.end = time.perf_counter()


def module_seconds(batches, width: int, device: torch.device, warmup: int) -> float:
    """The same, through the project's LitResNet9 and Lightning's fit loop."""
    torch.manual_seed(0)
    clock = _StepClock(warmup, device)
    trainer = build_trainer(device.type, max_epochs=1, callbacks=[clock])
    trainer.fit(LitResNet9(width=width), train_dataloaders=_Iterable(batches))
    return clock.end - clock.start


def bench_framework(device: torch.device, width: int, batch: int, steps: int,
                    warmup: int) -> dict[str, Any]:
    batches = synthetic_batches(warmup + steps, batch, device)
    images = steps * batch
    plain, module = [], []
    for _ in range(2):  # alternate, keep each one's best: less noise from the machine
        plain.append(images / plain_loop_seconds(batches, width, device, warmup))
        module.append(images / module_seconds(batches, width, device, warmup))
    return {"plain_loop_images_s": max(plain), "module_images_s": max(module),
            "framework_ratio": max(module) / max(plain)}


# ---------------------------------------------------------------------------------------------
# Augmentation


def bench_augment(images: np.ndarray, labels: np.ndarray, device: torch.device,
                  batch: int) -> dict[str, Any]:
    aug, spec = AugmentConfig(), SPECS["cifar10"]
    transform = train_transform(aug, spec, seed=0)
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
    augment_batch(stacked, aug, spec.mean, spec.std)  # warm-up
    repeats = 20
    gpu = repeats * len(stacked) / timed(
        lambda: [augment_batch(stacked, aug, spec.mean, spec.std) for _ in range(repeats)], device)
    return {"albumentations_one_worker_images_s": one,
            "albumentations_all_workers_images_s": everyone, "albumentations_workers": workers,
            "tensor_path_images_s": gpu, "tensor_path_speedup": gpu / everyone}


# ---------------------------------------------------------------------------------------------
# Tune: trial start to first training step


def bench_tune(data_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as tmp:
        out = Path(tmp) / "search"
        cmd = [sys.executable, "-m", "cifar_ray.tune", "--config",
               str(ROOT / "experiments/search_smoke.yaml"), "--data-dir", str(data_dir),
               "--output-dir", str(out), "--num-samples", "2", "--epochs", "1",
               "--grace-period", "1", "--retrain-epochs", "1", "--limit-train", "512",
               "--val-size", "256", "--num-workers", "0"]
        env = dict(os.environ, TMPDIR=tmp)  # Ray's sockets: a short path
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"the benchmark search failed: {last}")
        with open(out / "trials.csv") as f:
            startups = [float(row["startup_s"]) for row in csv.DictReader(f) if row["startup_s"]]
    if not startups:
        raise UserError("the benchmark search reported no trial start-up times")
    return {"trial_overhead_s": statistics.median(startups), "trial_startups_s": startups}


# ---------------------------------------------------------------------------------------------
# GradCAM


def bench_gradcam(images: np.ndarray, device: torch.device, width: int) -> dict[str, Any]:
    """The gradcam stage's own CAM call (one GradCAM object, reused) on 64 test images."""
    from pytorch_grad_cam import GradCAM

    from cifar_ray.gradcam import DEFAULT_LAYER, compute_cams, target_layer

    module = LitResNet9(width=width).to(device).eval()
    spec = SPECS["cifar10"]
    x = normalize(torch.from_numpy(images[:64]).permute(0, 3, 1, 2), spec.mean, spec.std)  # (64, 3, 32, 32)
    classes = [0] * len(x)
    with GradCAM(model=module, target_layers=[target_layer(module, DEFAULT_LAYER)]) as cam:
        compute_cams(module, x[:8], classes[:8], DEFAULT_LAYER, device, cam)  # warm-up
        seconds = timed(lambda: compute_cams(module, x, classes, DEFAULT_LAYER, device, cam), device)
    return {"gradcam_images_s": len(x) / seconds}


# ---------------------------------------------------------------------------------------------
# FLOPs and the device's peak


def train_flops_per_image(width: int) -> float:
    """Forward + backward FLOPs of one training image, counted by torch (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ResNet9(10, width).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with FlopCounterMode(display=False) as counter:
        F.nll_loss(model(x), y).backward()
    return counter.get_total_flops() / len(x)


def peak_bf16_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b  # warm-up
    seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n ** 3 * repeats / seconds / 1e12


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    on_gpu = device.type == "cuda"
    width = args.width or (64 if on_gpu else 16)
    batch = args.batch_size or (512 if on_gpu else 128)
    steps = args.steps or (50 if on_gpu else 8)
    cfg = Config()
    cfg.data.data_dir = str(Path(args.data_dir).expanduser().resolve())
    arrays = load_dataset(cfg.data)
    torch.set_num_threads(available_cpus())
    logging.getLogger(pl.__name__).setLevel(logging.WARNING)  # no banners between the sections
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({available_cpus()} cores)",
        "torch": torch.__version__, "width": width, "batch_size": batch, "steps": steps,
    }
    sections = [("framework", lambda: bench_framework(device, width, batch, steps, args.warmup)),
                ("augment", lambda: bench_augment(arrays.train_images, arrays.train_labels,
                                                  device, batch)),
                ("gradcam", lambda: bench_gradcam(arrays.test_images, device, width)),
                ("tune", lambda: bench_tune(Path(cfg.data.data_dir)))]
    for name, section in sections:
        print(f"bench: {name} ...", flush=True)
        report.update(section())

    flops = train_flops_per_image(width)
    report["train_gflop_per_image"] = flops / 1e9
    report["achieved_tflops"] = report["module_images_s"] * flops / 1e12
    report["peak_tflops"] = peak_bf16_tflops(device) if on_gpu else None
    report["fraction_of_peak"] = (report["achieved_tflops"] / report["peak_tflops"]
                                  if on_gpu else None)
    return report


ROWS = [  # (key, label, format)
    ("plain_loop_images_s", "training, plain PyTorch loop", "{:,.0f} images/s"),
    ("module_images_s", "training, LightningModule", "{:,.0f} images/s"),
    ("framework_ratio", "framework ratio (module / plain)", "{:.3f}"),
    ("albumentations_one_worker_images_s", "augmentation, Albumentations, 1 process", "{:,.0f} images/s"),
    ("albumentations_all_workers_images_s", "augmentation, Albumentations, all workers", "{:,.0f} images/s"),
    ("tensor_path_images_s", "augmentation, tensor path on the device", "{:,.0f} images/s"),
    ("tensor_path_speedup", "tensor path / Albumentations (all workers)", "{:.1f}x"),
    ("trial_overhead_s", "trial start to first step (median)", "{:.1f} s"),
    ("gradcam_images_s", "GradCAM", "{:,.0f} images/s"),
    ("train_gflop_per_image", "training GFLOP per image", "{:.3f}"),
    ("achieved_tflops", "achieved by the module", "{:.3f} TFLOP/s"),
    ("peak_tflops", "device peak (bf16 matmul)", "{:.1f} TFLOP/s"),
    ("fraction_of_peak", "fraction of peak", "{:.1%}"),
]


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, ResNet-9 width {report['width']}, "
             f"batch {report['batch_size']}"]
    for key, label, fmt in ROWS:
        value = report.get(key)
        lines.append(f"  {label:<46} {'-' if value is None else fmt.format(value)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--data-dir", default="data",
                        help="CIFAR-10 (downloaded there if missing), for real images")
    parser.add_argument("--width", type=int, default=0, help="ResNet-9 width (0: 64 on CUDA, 16 on CPU)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: 512 on CUDA, 128 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed training steps (0: 50 on CUDA, 8 on CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("width", "batch_size", "steps", "warmup"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    report = run(args)
    print(table(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
