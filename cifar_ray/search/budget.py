"""How long the whole run may take (`--budget 20m`): the run sized to it from the cost of an
epoch here, and the clock the search's deadline and the retrain ask (README.md, "A
deadline"). No Ray; torch only in `calibrate`."""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from dataclasses import dataclass, field

from cifar_ray.console import format_duration
from cifar_ray.errors import ConfigError, UserError
from cifar_ray.files import write_json
from cifar_ray.search.plan import (
    asha_rungs,
    expected_epochs,
    mean_gflop_per_image,
    training_gflop_per_image,
)

UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
MAX_BUDGET_S = 30 * 86400
# Seconds besides the epochs' images: to the first trial, a trial's start-up, the retrain's
# start + test + GradCAM + report, an epoch's checkpoint and report (docs/benchmarks.md,
# "A deadline"); a search's trials replace the start-up and epoch as they report.
OVERHEADS = {"cpu": {"setup": 12.0, "startup": 22.0, "finish": 20.0, "epoch": 1.5},
             "gpu": {"setup": 30.0, "startup": 45.0, "finish": 40.0, "epoch": 1.0}}
RETRAIN_EPOCH_S = 1.0  # a retrain epoch's besides its images (no validation, no report)
RETRAIN_SHARE = 0.35  # of the budget's epochs at most, when the user's retrain_epochs cost more
DECIDED = ("trainer.epochs", "tune.grace_period", "retrain.retrain_epochs")  # by the budget


def parse_budget(text: str) -> float | None:
    """'20m', '2h', '1.5h', '90s' -> seconds; '' -> None (no budget). ConfigError otherwise."""
    if not text.strip():
        return None
    match = re.fullmatch(r"\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise ConfigError(f"tune.budget {text!r}: expected a duration such as 20m, 2h or 1.5h")
    number, unit = float(match[1]), match[2].lower()
    if number <= 0:
        raise ConfigError(f"tune.budget {text!r}: a budget must be more than 0, e.g. 20m")
    if not unit:
        raise ConfigError(f"tune.budget {text!r}: give its unit: {match[1]}m, {match[1]}h or "
                          f"{match[1]}s")
    if unit not in UNITS:
        raise ConfigError(f"tune.budget {text!r}: unknown unit '{unit}' (s, m, h or d)")
    seconds = number * UNITS[unit]
    if seconds > MAX_BUDGET_S:
        raise ConfigError(f"tune.budget {text!r}: at most {MAX_BUDGET_S // 86400} days")
    return seconds


@dataclass
class Costs:
    """What the run's parts cost here, in seconds."""

    epoch_s: float  # one trial-epoch (training + validation), with the trials at once
    retrain_epoch_s: float  # one retrain epoch on train + validation
    startup_s: float
    setup_s: float
    finish_s: float
    source: str  # where epoch_s came from

    def least_budget(self) -> float:
        """One trial to its first rung at epoch 1, and a one-epoch retrain."""
        return (self.setup_s + self.startup_s + self.epoch_s + self.retrain_epoch_s
                + self.finish_s)


@dataclass
class Sized:
    """What a budget buys: the settings it decides and the trials it is expected to run."""

    budget_s: float
    epochs: int
    grace_period: int
    retrain_epochs: int
    trials: int  # expected to start before the search's share ends
    trials_cap: int
    concurrent: int
    costs: Costs
    bounds: dict[str, int] = field(default_factory=dict)  # the user's values: upper bounds
    capped: list[str] = field(default_factory=list)
    expected_s: float = 0.0  # the whole run's, as planned: the budget, or less where caps bind

    def retrain_s(self) -> float:
        return self.retrain_epochs * self.costs.retrain_epoch_s

    def search_end(self) -> float:
        """Seconds after the command's start at which the search's share ends."""
        return self.budget_s - self.costs.finish_s - self.retrain_s()


def size_run(budget_s: float, costs: Costs, epochs_cap: int, trials_cap: int,
             retrain_cap: int, grace: int, factor: int, concurrent: int) -> Sized:
    """The most epochs (at most the user's) at which the search's share still holds two
    rounds of trials at once, and the retrain epochs the rest buys (at most the user's);
    UserError naming the least budget that works when even one trial and a retrain do not fit."""
    least = costs.least_budget()
    if budget_s < least:
        raise UserError(f"--budget {format_duration(budget_s)} is too small here for one trial "
                        f"to reach its first rung and a one-epoch retrain: give at least "
                        f"--budget {_ceil_text(least)} ({costs.source})")
    usable = budget_s - costs.setup_s - costs.finish_s
    retrain = max(1, min(retrain_cap, int(RETRAIN_SHARE * usable // costs.retrain_epoch_s)))
    while retrain > 1 and usable - retrain * costs.retrain_epoch_s < costs.startup_s + costs.epoch_s:
        retrain -= 1
    search_s = usable - retrain * costs.retrain_epoch_s
    wanted = min(trials_cap, max(4, 2 * concurrent))
    for epochs in range(epochs_cap, 0, -1):
        g = min(grace, epochs)
        fit = trials_that_fit(search_s, costs, epochs, g, factor, concurrent)
        if fit >= wanted or epochs == 1:
            break
    trials = max(1, min(trials_cap, fit))
    # Where the caps bind, the search ends early and the retrain takes what it leaves.
    full, later = trial_seconds(costs, epochs, g, factor)
    searching = min(search_s, full + max(0, trials - concurrent) * later / concurrent)
    spare = usable - searching
    retrain_then = max(1, min(retrain_cap, int(spare // costs.retrain_epoch_s)))
    expected = (costs.setup_s + searching + retrain_then * costs.retrain_epoch_s
                + costs.finish_s)
    chosen = {"tune.num_samples": (trials_cap, trials), "trainer.epochs": (epochs_cap, epochs),
              "retrain.retrain_epochs": (retrain_cap, retrain)}
    return Sized(budget_s, epochs, g, retrain, trials, trials_cap, concurrent, costs,
                 bounds={key: cap for key, (cap, _) in chosen.items()},
                 capped=[key for key, (cap, used) in chosen.items() if used >= cap],
                 expected_s=min(budget_s, expected))


def trial_seconds(costs: Costs, epochs: int, grace: int, factor: int) -> tuple[float, float]:
    """(A first trial's seconds, a later one's): the first train all `epochs` (ASHA has no
    one to compare them with yet), the later as many as its rungs are expected to leave."""
    later = expected_epochs(0, asha_rungs(epochs, grace, factor), factor, epochs)
    return (costs.startup_s + epochs * costs.epoch_s,
            costs.startup_s + later * costs.epoch_s)


def trials_that_fit(search_s: float, costs: Costs, epochs: int, grace: int, factor: int,
                    concurrent: int) -> int:
    """Trials that end within `search_s`, `concurrent` at once."""
    full, later = trial_seconds(costs, epochs, grace, factor)
    if full > search_s:
        return 0
    return concurrent + int((search_s - full) * concurrent // later)


def _ceil_text(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes}m" if minutes < 120 else f"{math.ceil(minutes / 6) / 10:g}h"


def plan_lines(sized: Sized, started_at: float | None = None) -> list[str]:
    """The plan's budget block: what the budget buys and, given the start, when the run ends."""
    c = sized.costs
    search = sized.search_end() - c.setup_s
    expected = sized.expected_s or sized.budget_s
    ends = (f"; ends by {time.strftime('%H:%M', time.localtime(started_at + expected))}"
            if started_at is not None else "")
    if expected < 0.95 * sized.budget_s:
        ends += f" (about {format_duration(expected)}: your upper bounds leave the rest)"
    lines = [f"  budget       {format_duration(sized.budget_s)} for the whole run{ends}: "
             f"search {format_duration(search)}, retrain {format_duration(sized.retrain_s())}, "
             f"start {format_duration(c.setup_s)}, test + GradCAM + report "
             f"{format_duration(c.finish_s)}",
             f"  it buys      about {sized.trials} trials of up to {sized.epochs} epochs "
             f"(first rung at {sized.grace_period}), a {sized.retrain_epochs}-epoch retrain; "
             f"from {format_duration(c.epoch_s)} per trial-epoch ({c.source}) and "
             f"{format_duration(c.startup_s)} per trial start-up",
             "  deadline     no trial starts that cannot reach its first rung before the "
             "search's share ends; then running trials stop, their results kept"]
    bounds = ", ".join(f"{key} {value}" + (" (reached)" if key in sized.capped else "")
                       for key, value in sized.bounds.items())
    lines.append(f"  upper bounds {bounds}: the budget decides these, never past your values")
    return lines


class BudgetClock:
    """The run's seconds against its budget over every session (downtime not counted), and
    the estimates the deadline asks, corrected by the trials' measurements."""

    path = None  # where save() writes: the experiment's cifar_ray_budget.json

    def __init__(self, sized: Sized, used_before: float = 0.0, started: float | None = None):
        self.sized = sized
        self.used_before = used_before
        self.started = time.time() if started is None else started
        self.epoch_s = sized.costs.epoch_s
        self.startup_s = sized.costs.startup_s
        self.retrain_epoch_s = sized.costs.retrain_epoch_s

    def used(self) -> float:
        return self.used_before + time.time() - self.started

    def save(self) -> None:
        """What the budget bought and the time used so far, for a resumed run."""
        if self.path is not None:
            write_json(self.path, {"sized": sized_to_dict(self.sized),
                                   "used_s": round(self.used(), 1)})

    def left(self) -> float:
        return self.sized.budget_s - self.used()

    def search_left(self) -> float:
        """Seconds until the search's share ends, with the retrain at its measured cost."""
        retrain = self.sized.retrain_epochs * self.retrain_epoch_s
        return self.sized.budget_s - self.sized.costs.finish_s - retrain - self.used()

    def may_start(self) -> bool:
        """Whether a trial started now reaches its first rung before the search's share ends."""
        return self.search_left() >= self.startup_s + self.sized.grace_period * self.epoch_s

    def measured(self, epoch_seconds: list[float], startups: list[float]) -> None:
        """The trials' measured epochs and start-ups replace the estimates."""
        if epoch_seconds:
            self.epoch_s = statistics.median(epoch_seconds)
        if startups:
            self.startup_s = statistics.median(startups)

    def retrain_epochs(self) -> int:
        """The retrain's epochs that the time left buys (at most the user's, at least 1)."""
        left = self.left() - self.sized.costs.finish_s
        cap = self.sized.bounds.get("retrain.retrain_epochs", self.sized.retrain_epochs)
        return max(1, min(cap, int(left // self.retrain_epoch_s)))

    def text(self) -> str:
        return (f"budget: {format_duration(self.used())} of {format_duration(self.sized.budget_s)}"
                f" used, search's share ends in {format_duration(max(0.0, self.search_left()))}")


def calibrate(width: int, batch: int, size: int, device: str, threads: int,
              steps: int = 6, res_blocks: int = 1) -> float:
    """Seconds per training image of ResNet-9 here: the median of `steps` Adam steps on random
    images after one untimed, on `threads` CPU threads as a trial's worker."""
    import torch

    from cifar_ray.model import ResNet9

    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _median_step(ResNet9(10, width, res_blocks).to(device).train(), batch, size,
                            device, steps)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"timing the network at batch {batch} ran out of GPU memory: give "
                        "--plan-epoch-seconds S (one trial-epoch's seconds)") from None
    finally:
        torch.set_num_threads(previous)
        if device == "cuda":
            torch.cuda.empty_cache()  # none kept from the trials' GPUs


def _median_step(model, batch: int, size: int, device: str, steps: int) -> float:
    import torch
    from torch.nn import functional as F

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = F.nll_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) / batch


def estimate_costs(cfg, images: tuple[int, int], concurrent: int, gpus_per_worker: float,
                   cores: float, given_epoch_s: float | None = None) -> Costs:
    """The run's costs for `cfg` (a SearchConfig) on `images` (training, validation per
    epoch): from `given_epoch_s`, else a
    calibration of the network on this machine, the trials at once sharing it."""
    t = cfg.tune
    on_gpu = gpus_per_worker > 0
    overhead = OVERHEADS["gpu" if on_gpu else "cpu"]
    train, val = images
    epoch_images = train + val / 3  # validation is a forward pass: about a third of a step
    if given_epoch_s:
        epoch_s, source = given_epoch_s, "given"
        retrain_s = given_epoch_s * (train + val) / epoch_images
    else:
        # The smallest batch searched: the slowest per image (on a CPU, 128 is as slow).
        name, batches = cfg.space().get("trainer.batch_size", ("choice", [cfg.trainer.batch_size]))
        batch = min(batches) if name == "choice" else cfg.trainer.batch_size
        size, m = cfg.largest_image_size(), cfg.model
        per_image = calibrate(m.width, batch if on_gpu else min(batch, 128), size,
                              "cuda" if on_gpu else "cpu", t.cpus_per_worker,
                              res_blocks=m.res_blocks) / t.workers_per_trial
        # Searched shapes: their mean FLOPs against the network timed.
        per_image *= mean_gflop_per_image(cfg) / training_gflop_per_image(m.width, size,
                                                                           m.res_blocks)
        # Trials at once share the machine: the cores they ask past those there are, or a GPU.
        shared = (min(concurrent, 1 / gpus_per_worker) if on_gpu
                  else max(1.0, concurrent * t.workers_per_trial * t.cpus_per_worker / cores))
        epoch_s = per_image * epoch_images * shared + overhead["epoch"]
        retrain_s = per_image * (train + val) + RETRAIN_EPOCH_S  # alone, on both
        source = (f"calibrated here: {per_image * 1e3:.2g} ms per training image at batch "
                  f"{batch}, {overhead['epoch']:g} s per epoch besides")
    return Costs(epoch_s, retrain_s, overhead["startup"], overhead["setup"], overhead["finish"],
                 source)


def sized_to_dict(sized: Sized) -> dict:
    return dataclasses.asdict(sized)


def sized_from_dict(saved: dict) -> Sized:
    """The Sized a search saved (cifar_ray_budget.json); TypeError or ValueError if damaged."""
    values = dict(saved)
    values["costs"] = Costs(**values["costs"])
    sized = Sized(**values)
    numbers = [sized.budget_s, sized.costs.epoch_s, sized.costs.retrain_epoch_s]
    if not all(isinstance(n, (int, float)) and 0 < n < math.inf for n in numbers):
        raise ValueError("not a budget's figures")
    return sized


def apply_sized(cfg, sized: Sized) -> None:
    """The settings the budget decides, on `cfg` (a SearchConfig): tune.num_samples stays the
    cap, the deadline decides how many start."""
    cfg.trainer.epochs = sized.epochs
    cfg.tune.grace_period = sized.grace_period
    cfg.retrain.retrain_epochs = sized.retrain_epochs
