"""`bench --sections pareto`: a search of accuracy against latency on made-up gratings,
twice over the same trials (random search, one seed): with multi-objective ASHA, and
with no early stopping. It measures the front (its points, its span in latency), the
trial-epochs multi-objective ASHA took to reach the hypervolume the other search ended with
(both against one reference point), and the pick's latency measured again after export."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from cifar_ray.commands import run_command
from cifar_ray.files import write_bytes
from cifar_ray.search.objectives import hypervolume_history, minimised, reference

OBJECTIVES = ["val/acc", "latency_ms"]
PICK = "latency_ms <= 1"
SPACE = ["model.width=choice:4,8,16,32", "model.res_blocks=choice:0,1",
         "optim.lr=loguniform:0.002,0.02", "trainer.batch_size=choice:64"]

def grating(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """One (size, size, 3) uint8 image of class `label` (of 10): a grating at one of five
    angles 36 degrees apart, fine (a 3-pixel period at 32 pixels) or coarse (7), at a random
    phase, contrast and tint, on noise. Halving the image blurs the fine ones away, and telling
    the angles apart takes a network some capacity: accuracy has a price."""
    angle, period = np.pi * (label % 5) / 5, (3.0 if label < 5 else 7.0) * size / 32
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period
                  + rng.uniform(0, 2 * np.pi))
    gray = 128 + rng.uniform(20, 60) * wave + rng.normal(0, 40, (size, size))
    tint = rng.uniform(0.6, 1.0, 3)
    return np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)


def write_gratings(root: Path, size: int, n_train: int = 2000, n_test: int = 500) -> Path:
    """train/<class>/ and test/<class>/ PNGs of `grating`s, ten classes, under `root`."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            label = i % 10
            png = cv2.imencode(".png", grating(rng, size, label))[1].tobytes()
            write_bytes(root / split / f"class{label}" / f"{i:05d}.png", png)
    return root


def search(data_dir: Path, flags: list[str], tmp: str, timeout: float) -> dict[str, Any]:
    out = Path(tmp) / "search"
    wall = run_command("cifar_ray.tune", ["--data-dir", str(data_dir), "--output-dir", str(out),
                                          "--overwrite", *flags], timeout, tmp)
    results = json.loads((out / "results.json").read_text())
    return {"wall_s": round(wall, 1), **{k: results[k] for k in (
        "front", "trials", "pick", "hypervolume", "test_balanced_acc")}}

def epochs_to_reach(history: list[tuple[int, float]], target: float) -> int | None:
    return next((epochs for epochs, hv in history if hv >= target - 1e-9), None)

def compare(asha: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Both searches' hypervolume against the reference point of all their trials."""
    rows = [{"trial_id": t["trial"], **t} for t in asha["trials"] + full["trials"]]
    ref = reference(minimised([r for r in rows if r.get(OBJECTIVES[0]) is not None],
                              OBJECTIVES), OBJECTIVES)
    histories = {name: hypervolume_history([{"trial_id": t["trial"], **t} for t in s["trials"]],
                                           OBJECTIVES, ref)
                 for name, s in (("moasha", asha), ("no_stopping", full))}
    if not all(histories.values()):
        return {"error": "a search has no trial with every objective"}
    target = histories["no_stopping"][-1][1]

    def spread(search: dict[str, Any]) -> dict[str, Any]:
        latencies = [f["latency_ms"] for f in search["front"]]
        return {"points": len(latencies), "latency_span": round(max(latencies) / min(latencies), 2)
                if latencies else None,
                "front": [{k: f[k] for k in ("trial", "config", *OBJECTIVES)}
                          for f in search["front"]]}
    return {
        "reference": [round(float(v), 4) for v in ref],
        "hypervolume": {name: round(h[-1][1], 4) for name, h in histories.items()},
        "trial_epochs": {name: h[-1][0] for name, h in histories.items()},
        "moasha_trial_epochs_to_final_hv_of_no_stopping":
            epochs_to_reach(histories["moasha"], target),
        "fronts": {"moasha": spread(asha), "no_stopping": spread(full)},
    }


def bench_pareto(size: int, epochs: int, trials: int, timeout: float,
                 record: Callable[[dict[str, Any]], None], grace: int = 1) -> dict[str, Any]:
    out: dict[str, Any] = {"pareto": {}}
    with tempfile.TemporaryDirectory(prefix="pareto-", dir="/tmp") as tmp:
        data_dir = write_gratings(Path(tmp) / "gratings", size)
        space = [*SPACE, f"data.image_size=choice:{size // 2},{size}"]
        config = Path(tmp) / "pareto.yaml"  # its own config: none of the folder default's flags
        config.write_text("data:\n  dataset: folder\ntrainer:\n  device: cpu\n")
        common = ["--config", str(config), "--objectives", ",".join(OBJECTIVES), "--pick", PICK,
                  *(f for key in space for f in ("--search", key)), "--num-samples", str(trials),
                  "--epochs", str(epochs), "--retrain-epochs", str(epochs),
                  "--search-alg", "random", "--max-concurrent", "2", "--cpus-per-worker", "1",
                  "--num-workers", "0", "--reduction-factor", "3"]
        runs = {}
        for name, rung in (("moasha", min(grace, epochs)), ("no_stopping", epochs)):
            runs[name] = search(data_dir, [*common, "--grace-period", str(rung)], tmp, timeout)
            out["pareto"][name] = {k: runs[name][k] for k in ("wall_s", "hypervolume", "pick",
                                                             "test_balanced_acc")}
            record(out)
        out["pareto"]["compared"] = compare(runs["moasha"], runs["no_stopping"])
    return out

def sections(args, record: Callable[[dict[str, Any]], None]) -> dict[str, Callable[[], dict]]:
    return {"pareto": lambda: bench_pareto(args.pareto_size, args.search_epochs or 4,
                                           args.search_trials or 12, args.section_timeout,
                                           record, args.pareto_grace)}
