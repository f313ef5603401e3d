"""What a search will cost, before it starts (`python -m cifar_ray.tune --plan`), from the
config alone: trials, concurrency, ASHA's rungs and the trial-epochs they allow (at most, and
as successive halving expects), the retrain, and time (README.md, "The search")."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from cifar_ray.config import range_text
from cifar_ray.data.arrays import val_count
from cifar_ray.console import format_duration
from cifar_ray.names import METRIC, METRICS, shown_name
from cifar_ray.search.objectives import OBJECTIVES

# CIFAR-10 and CIFAR-100 both have 50,000 training images (cifar_files.py reads them).
CIFAR_TRAIN_IMAGES = 50_000
# One CPU core's fp32 training throughput on ResNet-9 (docs/benchmarks.md): only to warn
# before a CPU search; on a GPU the first epochs measure it.
CPU_GFLOPS_PER_CORE = 47.0
WARN_CPU_HOURS = 3.0  # a CPU search estimated past this many hours is announced loudly


def asha_rungs(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA compares trials: Ray's own rule (one bracket of
    `async_hyperband._Bracket`), less a rung at max_t, where there is nothing left to cut."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in range(count)
            if grace_period * reduction_factor ** k < max_t]


def expected_epochs(epoch: int, rungs: list[int], reduction_factor: int, max_t: int) -> float:
    """Epochs a trial now at `epoch` is expected to train from here on, if each rung ahead
    keeps 1/reduction_factor of the trials that reach it (0: a new trial)."""
    total, position, alive = 0.0, epoch, 1.0
    for rung in rungs:
        if rung > epoch:
            total += alive * (rung - position)
            alive /= reduction_factor
            position = rung
    return total + alive * (max_t - position)


def training_gflop_per_image(width: int, size: int = 32, res_blocks: int = 1) -> float:
    """Training FLOPs (forward + backward, 3x the forward) of ResNet-9 at `width` per `size`
    square image: its 3x3 convolutions (model.py; two per residual block), whose positions
    grow with the pixels. Width 16 at 32: 0.143, as torch's FLOP counter."""
    w, n = width, res_blocks
    convs = [(32 * 32, 3, w), (32 * 32, w, 2 * w), *[(16 * 16, 2 * w, 2 * w)] * (2 * n),
             (16 * 16, 2 * w, 4 * w), (8 * 8, 4 * w, 8 * w),
             *[(4 * 4, 8 * w, 8 * w)] * (2 * n)]  # (output positions, in, out) before pooling
    flops = [2 * positions * c_in * c_out * 9 for positions, c_in, c_out in convs]
    # No gradient for the image itself: the first convolution's backward is half the others'.
    return (3 * sum(flops) - flops[0]) * (size / 32) ** 2 / 1e9


SHAPE_KEYS = ("model.width", "data.image_size", "model.res_blocks")  # what the FLOPs follow


def mean_gflop_per_image(cfg) -> float:
    """training_gflop_per_image averaged over the searched values of SHAPE_KEYS (a choice's
    values, a randint's range, else the config's own): what an average trial costs."""
    space = cfg.space()
    values = []
    for key in SHAPE_KEYS:
        section, name = key.split(".")
        kind, args = space.get(key, ("choice", [getattr(getattr(cfg, section), name)]))
        values.append(list(range(args[0], args[1])) if kind == "randint" else
                      args if kind == "choice" else [getattr(getattr(cfg, section), name)])
    grid = [training_gflop_per_image(w, s, n) for w in values[0] for s in values[1]
            for n in values[2]]
    return sum(grid) / len(grid)


def image_counts(cfg, sizes: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(training, validation) images per search epoch: from `sizes` (the data set read), else
    the config (and a listing of class folders); None when that needs the data."""
    d = cfg.data
    if sizes:
        total, val = sizes
    elif d.dataset == "folder":
        from cifar_ray.data.image_folders import TEST_SHARE, is_image

        root = Path(d.data_dir).expanduser()
        count = {split: sum(1 for p in (root / split).rglob("*") if p.is_file() and is_image(p))
                 for split in ("train", "val") if (root / split).is_dir()}
        if not count.get("train"):
            return None
        total, val = count["train"], count.get("val", 0)
        if not (root / "test").is_dir():  # image_folders holds out a share as the test set
            total -= total // TEST_SHARE
    else:
        total, val = CIFAR_TRAIN_IMAGES, 0
    if not val:
        val = min(val_count(d.val_size, total), total)
        total -= val
    train = min(d.limit_train, total) if d.limit_train else total
    return train, val


@dataclass
class SearchPlan:
    trials: int
    concurrent: int
    workers: int  # per trial
    cpus: float  # per worker
    gpus: float  # per worker
    max_t: int
    grace_period: int
    reduction_factor: int
    retrain_epochs: int
    images: tuple[int, int] | None  # (train, val) per search epoch
    epoch_seconds: float | None = None  # one trial-epoch, at this concurrency
    epoch_source: str = ""  # where epoch_seconds came from
    retrain_epoch_seconds: float | None = None  # one retrain epoch, when known apart
    metric: str = METRIC  # tune.metric
    objectives: tuple = ()  # tune.objectives, when several
    pick: str = ""  # tune.pick
    latency_table: str = ""  # tune.latency_table
    test_held: bool = False  # class folders without test/: a fifth of train/ held out

    @property
    def rungs(self) -> list[int]:
        return asha_rungs(self.max_t, self.grace_period, self.reduction_factor)

    @property
    def most_trial_epochs(self) -> int:
        return self.trials * self.max_t

    @property
    def expected_trial_epochs(self) -> float:
        return self.trials * expected_epochs(0, self.rungs, self.reduction_factor, self.max_t)

    def search_seconds(self, trial_epochs: float) -> float | None:
        """Wall seconds for `trial_epochs` with `concurrent` trials at once (start-ups aside)."""
        if self.epoch_seconds is None:
            return None
        return trial_epochs * self.epoch_seconds / self.concurrent

    def retrain_seconds(self) -> float | None:
        if self.retrain_epoch_seconds is not None:
            return self.retrain_epochs * self.retrain_epoch_seconds
        if self.epoch_seconds is None or not self.images:
            return None
        train, val = self.images  # the retrain trains on both, without validation
        return self.retrain_epochs * self.epoch_seconds * (train + val) / (train + val / 3)

    def gpu_hours(self, trial_epochs: float) -> float | None:
        if self.epoch_seconds is None or not self.gpus:
            return None
        return trial_epochs * self.epoch_seconds * self.workers * self.gpus / 3600

    def cpu_warning(self, starting: bool = True) -> str | None:
        """The loud block for a search that would train for hours on CPUs alone, else None
        (`starting`: the search goes on after it)."""
        expected = self.search_seconds(self.expected_trial_epochs)
        if self.gpus or expected is None or expected < WARN_CPU_HOURS * 3600:
            return None
        bar, longest = "!" * 78, self.search_seconds(self.most_trial_epochs)
        return (f"{bar}\n!! This search trains on CPUs only and would take about "
                f"{format_duration(expected)} (up to {format_duration(longest)}).\n"
                "!! To check the machinery in minutes, try: "
                "python -m cifar_ray.tune --config experiments/search_smoke.yaml\n"
                "!! For the real search, use a GPU machine or cluster (README: the cluster).\n"
                + ("!! Going on; Ctrl-C stops the search cleanly.\n" if starting else "")
                + bar)

    def objective_lines(self) -> list[str]:
        if not self.objectives:
            return []
        lines = ["  objectives   " + ", ".join(f"{n} ({OBJECTIVES[n][0]})" for n in self.objectives)
                 + ": each trial measures what its model costs before it trains"
                 + (f" (latencies: {shown_name(self.latency_table)})" if self.latency_table
                    else "")]
        return lines + [f"  pick         the most accurate trial with {self.pick}"] if self.pick \
            else lines

    def text(self) -> str:
        """The plan block every search prints before its first trial."""
        on = f"{self.cpus:g} CPU{'s' if self.cpus != 1 else ''}"
        on += f" + {self.gpus:g} GPU" if self.gpus else ""
        workers = f"{self.workers} workers x " if self.workers > 1 else ""
        rungs = ", ".join(map(str, self.rungs)) or "none (grace period >= epochs)"
        expected, most = self.expected_trial_epochs, self.most_trial_epochs
        lines = [
            "plan:",
            f"  trials       {self.trials}, {self.concurrent} at a time, each on {workers}{on}",
            f"  metric       {self.metric} ({METRICS[self.metric]}): "
            + ("the checkpoints go by it; the pick is the front's best by it" if self.objectives
               else "ASHA, the checkpoints and the choice of the best go by it"),
            *self.objective_lines(),
            f"  ASHA         compares trials at epochs {rungs} of {self.max_t}; each rung keeps "
            f"the best 1/{self.reduction_factor}"
            + (" by Pareto rank, ties by crowding distance" if self.objectives else ""),
            f"  trial-epochs at most {most} (no trial stopped), about {expected:.0f} if each rung "
            f"keeps 1/{self.reduction_factor}",
        ]
        if self.images:
            train, val = self.images
            lines.append(f"  data         {train:,} training + {val:,} validation images per "
                         "trial-epoch" + ("; no test/ folder: a stratified fifth of train/ is "
                                          "the test set" if self.test_held else ""))
        lines.append(f"  retrain      {self.retrain_epochs} epochs of the best configuration on "
                     "train + validation, then the test and GradCAM")
        if self.epoch_seconds is None:
            lines.append("  time         measured from the first epochs (for an estimate now: "
                         "--plan --plan-epoch-seconds S)")
            return "\n".join(lines)
        lines.append(f"  epoch        {format_duration(self.epoch_seconds)} per trial-epoch "
                     f"({self.epoch_source})")
        likely, longest = self.search_seconds(expected), self.search_seconds(most)
        time_line = (f"  time         search about {format_duration(likely)} (at most "
                     f"{format_duration(longest)}) at {self.concurrent} at a time, plus trial "
                     "start-ups")
        if (retrain := self.retrain_seconds()) is not None:
            time_line += f"; retrain about {format_duration(retrain)}"
        lines.append(time_line)
        if (hours := self.gpu_hours(expected)) is not None:
            lines.append(f"  GPU-hours    about {hours:.2g} (at most {self.gpu_hours(most):.2g}) "
                         "for the search")
        return "\n".join(lines)


def make_plan(cfg, concurrent: int, gpus_per_worker: float, epoch_seconds: float | None = None,
              epoch_source: str = "", cpus_total: float | None = None,
              sizes: tuple[int, int] | None = None) -> SearchPlan:
    """The plan of `cfg` (a SearchConfig) with `concurrent` trials at once; without
    `epoch_seconds` or a GPU, the epoch is estimated from FLOPs on `cpus_total` cores."""
    t, d = cfg.tune, cfg.data
    plan = SearchPlan(
        trials=t.num_samples, concurrent=concurrent, workers=t.workers_per_trial,
        cpus=t.cpus_per_worker, gpus=gpus_per_worker, max_t=cfg.trainer.epochs,
        grace_period=t.grace_period, reduction_factor=t.reduction_factor,
        retrain_epochs=cfg.retrain.retrain_epochs, images=image_counts(cfg, sizes),
        epoch_seconds=epoch_seconds, epoch_source=epoch_source, metric=t.metric,
        objectives=tuple(cfg.objectives()) if len(cfg.objectives()) > 1 else (), pick=t.pick,
        latency_table=t.latency_table,
        test_held=d.dataset == "folder" and not (Path(d.data_dir).expanduser() / "test").is_dir())
    if epoch_seconds is None and not gpus_per_worker and plan.images:
        train, val = plan.images
        per_image = mean_gflop_per_image(cfg)
        cores_total = cpus_total or os.cpu_count() or 1
        cores = t.workers_per_trial * t.cpus_per_worker
        # Trials at once share the cores when they ask for more than there are.
        shared = min(cores, cores_total / concurrent)
        plan.epoch_seconds = per_image * (train + val / 3) / (shared * CPU_GFLOPS_PER_CORE)
        plan.retrain_epoch_seconds = (per_image * (train + val)
                                      / (min(cores, cores_total) * CPU_GFLOPS_PER_CORE))
        shape = ("averaged over the searched shapes" if set(SHAPE_KEYS) & set(cfg.search)
                 else f"at width {cfg.model.width}")
        plan.epoch_source = (f"estimated: {per_image:.2f} GFLOP per training image {shape}, "
                             f"{CPU_GFLOPS_PER_CORE:g} GFLOP/s per CPU core, "
                             f"{shared:.3g} core{'s' if shared != 1 else ''} per trial")
    return plan


def space_lines(cfg) -> list[str]:
    """What will be searched: each key's distribution and range, and the searcher and its seed."""
    t = cfg.tune
    how = ("Optuna's TPE (random at first, then learning from the finished trials)"
           if t.search_alg == "optuna" else "random sampling")
    lines = [f"  searcher     {t.search_alg}: {how}, seed {t.search_seed}"]
    for key, (name, args) in cfg.space().items():
        lines.append(f"  searched     {key}: {range_text(name, args)}")
    return lines
