"""The recipe benchmark (`bench --sections recipe,recipe_cifar,recipe_search`): each trick of
the recipe alone and all together against the default, several seeds, by test accuracy and
balanced accuracy; and a search over the space for your own images against today's, at the
same trial-epochs. Each run is a real `cifar_ray.train` or `cifar_ray.tune` process."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

from cifar_ray.inspection import write_inspection_set
from cifar_ray.commands import ROOT, run_command

AUGMENT = ["--vflip-p", "0.5", "--rot90-p", "0.5", "--color-p", "0.5", "--affine-p", "0.5"]
TRICKS = {
    "default": [],
    "label smoothing 0.1": ["--label-smoothing", "0.1"],
    "EMA 0.95": ["--ema-decay", "0.95"],
    "TTA flips": ["--tta", "flips"],
    "augmentation": AUGMENT,
    "class weights": ["--balance", "weights"],
    "sampler": ["--balance", "sampler"],
}
TRICKS["all (weights)"] = [*TRICKS["label smoothing 0.1"], *TRICKS["EMA 0.95"],
                           *TRICKS["TTA flips"], *AUGMENT, *TRICKS["class weights"]]
CIFAR_TRICKS = ("default", "label smoothing 0.1", "EMA 0.95", "TTA flips")


def inspection_data(tmp: str, size: int) -> tuple[Path, list[str]]:
    """The made-up inspection set (inspection.py) in `tmp`, and the flags that train on it."""
    root = write_inspection_set(Path(tmp) / "inspection", size=size)
    return root, ["--dataset", "folder", "--image-size", str(size)]


def train_once(data_dir: Path, flags: list[str], seed: int, timeout: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="recipe-", dir="/tmp") as tmp:
        out = Path(tmp) / "run"
        run_command("cifar_ray.train", ["--data-dir", str(data_dir), "--output-dir", str(out),
                                        "--seed", str(seed), "--no-progress-bar", *flags],
                    timeout, tmp)
        results = json.loads((out / "results.json").read_text())
    return {key: results[key] for key in ("test_acc", "test_balanced_acc", "test_f1",
                                          "train_seconds")}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def compare_tricks(data_dir: Path, base: list[str], tricks: list[str], seeds: int,
                   timeout: float, record: Callable[[dict[str, Any]], None],
                   key: str) -> dict[str, Any]:
    """Every trick in `tricks` over `seeds` seeds; each finished trick goes to `record`."""
    out: dict[str, Any] = {key: {}, f"{key}_flags": base}
    for name in tricks:
        runs = [train_once(data_dir, [*base, *TRICKS[name]], seed, timeout)
                for seed in range(1, seeds + 1)]
        out[key][name] = {metric: spread([r[metric] for r in runs])
                          for metric in ("test_acc", "test_balanced_acc", "test_f1",
                                         "train_seconds")}
        out[key][name]["flags"] = TRICKS[name]
        record(out)
        print(f"  {name}: " + ", ".join(f"{m} {v['mean']:.4f} ± {v['sd']:.4f}"
                                        for m, v in out[key][name].items() if m != "flags"),
              flush=True)
    return out


def bench_recipe(size: int, width: int, epochs: int, seeds: int, timeout: float,
                 record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The tricks on the made-up inspection set."""
    with tempfile.TemporaryDirectory(prefix="inspection-", dir="/tmp") as tmp:
        data_dir, flags = inspection_data(tmp, size)
        base = [*flags, "--width", str(width), "--epochs", str(epochs), "--batch-size", "128",
                "--num-workers", "0"]
        return compare_tricks(data_dir, base, list(TRICKS), seeds, timeout, record,
                              "recipe_inspection")


def bench_recipe_cifar(data_dir: Path, width: int, epochs: int, seeds: int, timeout: float,
                       record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Whether the tricks help the CIFAR recipe on `data_dir` (CIFAR-10's files)."""
    base = ["--width", str(width), "--epochs", str(epochs), "--num-workers", "0",
            "--batch-size", "128"]
    return compare_tricks(data_dir, base, list(CIFAR_TRICKS), seeds, timeout, record,
                          "recipe_cifar")


def search_once(data_dir: Path, config: Path, flags: list[str], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="recipe-search-", dir="/tmp") as tmp:
        out = Path(tmp) / "search"
        wall = run_command("cifar_ray.tune", ["--config", str(config), "--data-dir",
                                              str(data_dir), "--output-dir", str(out), *flags],
                           timeout, tmp)
        results = json.loads((out / "results.json").read_text())
    return {"wall_s": round(wall, 1), "best_config": results["best_config"],
            "best_score": results["best_score"], "metric": results["metric"],
            **{key: results[key] for key in ("test_acc", "test_balanced_acc", "test_f1")}}


def bench_recipe_search(size: int, width: int, epochs: int, trials: int, timeout: float,
                        record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """experiments/search_folder.yaml's space against today's default space (lr, weight
    decay, batch size) on the inspection set: the same trials, every one running all its
    epochs (no ASHA stop), so both spend the same trial-epochs."""
    same = ["--num-samples", str(trials), "--epochs", str(epochs), "--grace-period",
            str(epochs), "--retrain-epochs", str(epochs), "--width", str(width),
            "--max-concurrent", "1", "--cpus-per-worker", "2", "--num-workers", "0",
            "--search-alg", "random", "--image-size", str(size)]
    out: dict[str, Any] = {"recipe_search": {}, "recipe_search_trial_epochs": trials * epochs}
    with tempfile.TemporaryDirectory(prefix="inspection-", dir="/tmp") as tmp:
        data_dir, _ = inspection_data(tmp, size)
        today = Path(tmp) / "today.yaml"  # the default space, on the same folder
        today.write_text("data:\n  dataset: folder\n")
        for name, config in (("today's space", today),
                             ("search_folder.yaml", ROOT / "experiments/search_folder.yaml")):
            out["recipe_search"][name] = search_once(data_dir, config, same, timeout)
            record(out)
    return out


def sections(args, width: int, data_dir: Path,
             record: Callable[[dict[str, Any]], None]) -> dict[str, Callable[[], dict]]:
    """The bench's recipe sections, from its flags (`bench -h`)."""
    limit = args.section_timeout
    return {
        "recipe": lambda: bench_recipe(args.recipe_size, width, args.train_epochs or 10,
                                       args.recipe_seeds, limit, record),
        "recipe_cifar": lambda: bench_recipe_cifar(data_dir, width, args.train_epochs or 24,
                                                   args.recipe_seeds, limit, record),
        "recipe_search": lambda: bench_recipe_search(args.recipe_size, width,
                                                     args.search_epochs or 6,
                                                     args.search_trials or 6, limit, record),
    }
