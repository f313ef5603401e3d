"""The search stage: Ray Tune samples the config's `search:` space, each sample a trial
(`trial.run_trial`), ASHA stopping the weak ones; then one row per trial from the ResultGrid.
A searched key keeps its config name throughout: {"optim.lr": ...}."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_ray import tracking
from cifar_ray.config import plain, resolve_precision
from cifar_ray.errors import UserError
from cifar_ray.files import write_text
from cifar_ray.names import (
    CHECKPOINT_FILE,
    CHECKPOINT_PATH,
    FIRST_STEP_AT,
    METRIC,
    MODE,
    PHASES,
    REPORTED_AT,
    STARTUP,
)
from cifar_ray.search.cluster import HEAD_NODE
from cifar_ray.search.objectives import FOOTPRINT, LATENCY, read_latency_table
from cifar_ray.search.settings import SearchConfig, ray_sampler
from cifar_ray.search.trial import run_trial


def storage_dir(cfg: SearchConfig, out: Path) -> Path:
    """Where trials write: tune.storage, else the output dir."""
    return Path(cfg.tune.storage).expanduser().resolve() if cfg.tune.storage else out


def tune_space(cfg: SearchConfig) -> dict[str, Any]:
    """The search space as Tune's sampling helpers (tune.loguniform(...), tune.choice([...]))."""
    return {key: ray_sampler(name, args) for key, (name, args) in cfg.space().items()}


def trial_base_config(cfg: SearchConfig, use_gpu: bool) -> dict[str, Any]:
    """The training config every trial starts from (each trial lays its sample over it)."""
    base = cfg.training_config()
    base.data.num_workers = max(0, cfg.tune.cpus_per_worker - 1)  # the worker's own CPU trains
    # The device the trial's workers are given (each sees only its own).
    base.trainer.device = "cuda" if use_gpu else "cpu"
    base.trainer.precision = resolve_precision(base.trainer.device, base.trainer.precision)
    base.trainer.progress_bar = False
    return base.to_dict()


@dataclass
class Round:
    """One Tune experiment of the search: the first at <storage>/<tune.name>, each --more
    round in a folder of its own inside it (more-1, more-2, ...)."""

    where: Path
    samples: int
    seed: int  # the searcher's: a --more round's differs, so that it draws new samples
    seeds: list = field(default_factory=list)  # earlier trials (search.seeds.Seed)
    first: list = field(default_factory=list)  # configs run first (--try's, the earlier best)
    curves: dict = field(default_factory=dict)  # a --more round's: ASHA's rungs seeded


def run_search(cfg: SearchConfig, out: Path, resume: bool, concurrent: int,
               scaling: dict[str, Any], data=None, console=None, verbose: bool = False,
               stopper=None, round_: Round | None = None):
    """Run (or resume) one Tune experiment of the search (`round_`, by default the first) to
    its end; return Tune's ResultGrid. `data`: an object reference to the data set's arrays;
    `console`: the search's SearchConsole; `stopper`: the budget's DeadlineStopper, whose
    clock the searcher asks too."""
    from ray import tune

    from cifar_ray.search.searchers import make_scheduler, make_searcher

    t = cfg.tune
    storage = storage_dir(cfg, out)
    round_ = round_ or Round(storage / t.name, t.num_samples, t.search_seed)
    trainable = tune.with_parameters(
        run_trial, base=trial_base_config(cfg, scaling["use_gpu"]), metric=t.metric,
        scaling=scaling, storage=str(storage / t.name / "train_runs"), max_failures=t.max_failures,
        data=[data] if data is not None else None,
        costs=len(cfg.objectives()) > 1,
        latency_batch=t.latency_batch if set(LATENCY) & set(cfg.objectives()) else None,
        latency_table=read_latency_table(t.latency_table).to_dict() if t.latency_table else None)
    # Trial functions and Train controllers only wait: no CPU, on the head node, so a lost
    # worker node costs only its workers (restarted from the last checkpoint).
    trainable = tune.with_resources(trainable, {"CPU": 0, HEAD_NODE: 0.001})
    callbacks = [*tracking.tune_callbacks(cfg.tracking), *([console] if console else [])]
    verbosity = 2 if verbose else 0  # 0: the console's own lines and Tune's table, no blocks
    if resume:
        return restored(round_.where, trainable, console, verbosity, stopper).fit()
    clock = stopper.clock if stopper else None
    objectives = cfg.objectives()
    tuner = tune.Tuner(
        trainable,
        param_space=tune_space(cfg),
        tune_config=tune.TuneConfig(
            # Several objectives: the scheduler and the searcher each hold them all.
            **({"metric": t.metric, "mode": MODE} if len(objectives) == 1 else {}),
            num_samples=round_.samples,
            scheduler=make_scheduler(cfg.trainer.epochs, t.grace_period, t.reduction_factor,
                                     round_.curves, objectives),
            search_alg=make_searcher(t.search_alg, round_.seed, round_.samples, concurrent,
                                     clock, round_.seeds, round_.first, objectives)),
        run_config=tune.RunConfig(
            name=round_.where.name, storage_path=str(round_.where.parent), callbacks=callbacks,
            verbose=verbosity, stop=stopper,
            # A trial whose process dies is started again, from its run's checkpoint.
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            # Copy Tune's state to storage every 10 s (not 300): a killed driver resumes
            # from a recent state instead of running finished trials again.
            sync_config=tune.SyncConfig(sync_period=10)),
    )
    return tuner.fit()


def finished_results(where: Path):
    """The ResultGrid of a round that ran to its end (read as --resume reads it: trusted)."""
    from ray import tune

    return tune.Tuner.restore(str(where), trainable=run_trial).get_results()


def restored(experiment: Path, trainable, console, verbosity: int, stopper=None):
    """The interrupted search's Tuner, with its searcher's state and callbacks (MLflow) and
    this session's console, stopper and clock in the place of those it was saved with."""
    from ray import tune

    if not tune.Tuner.can_restore(str(experiment)):
        raise UserError(f"--resume: no search to resume in {experiment}")
    try:
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    except Exception as exc:  # a damaged state file: what to do, not Ray's traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--resume: the search's saved state in {experiment} cannot be "
                        f"read ({type(exc).__name__}: {first[:200]}); start again with "
                        "--overwrite") from None
    # Tune restores callbacks' state by position; ray 2.60 has no public setter for them.
    run_config = tuner._local_tuner.get_run_config()
    run_config.callbacks = [console if type(c).__name__ == "SearchConsole" else c
                            for c in run_config.callbacks or []]
    run_config.verbose = verbosity
    if stopper is not None:
        run_config.stop = stopper
        tuner._local_tuner._tune_config.search_alg.clock = stopper.clock
    return tuner


STOPPED_BY_BUDGET = "stopped by the budget"


def summarise_trials(grid, searched: list[str], max_t: int, budget_stopped=(),
                     metric: str = METRIC, objectives=()) -> list[dict[str, Any]]:
    """One row per trial: its sample (a column per searched key), epochs, best score (of
    `metric`, tune.metric) and the checkpoint of that epoch, status (`budget_stopped`: the trials the
    budget's deadline stopped), start-up seconds, its curve and when each point was reported;
    with several `objectives`, a column for each (the score: the best score)."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        best_acc, best_ckpt = None, None
        if history is not None and metric in history:
            scored = history.dropna(subset=[metric]).sort_values(metric, ascending=False,
                                                                 kind="stable")
            if len(scored):
                best_acc = float(scored[metric].iloc[0])
                # Among equal scores Ray may keep a later epoch's: the first kept one.
                kept = [p for p in scored.get(CHECKPOINT_PATH, []) if isinstance(p, str)
                        and (Path(p) / CHECKPOINT_FILE).is_file()]
                best_ckpt = kept[0] if kept else None
        # Start-up: from the first report (a restarted worker group measures its own).
        first = {key: reported(history, key, 0)
                 for key in (STARTUP, *(f"time/{p}_s" for p in PHASES))}
        spans = training_spans(history)
        epochs = int(result.metrics.get("training_iteration", 0)) if result.metrics else 0
        curve, curve_at = [], []  # (epoch, score) for every epoch reported, and when
        if history is not None and metric in history and "training_iteration" in history:
            at = history[REPORTED_AT] if REPORTED_AT in history else [None] * len(history)
            points = [(int(epoch), float(acc), t) for epoch, acc, t
                      in zip(history["training_iteration"], history[metric], at) if acc == acc]
            curve = [(epoch, acc) for epoch, acc, _ in points]
            curve_at = [t for _, _, t in points]
        status = "error" if result.error else ("completed" if epochs >= max_t else "stopped early")
        if status == "stopped early" and trial_id(result) in budget_stopped:
            status = STOPPED_BY_BUDGET
        rows.append({
            "trial_id": trial_id(result),
            **{key: plain(result.config.get(key)) for key in searched},
            "config": {key: plain(result.config.get(key)) for key in searched},
            "epochs": epochs, "best_score": best_acc, "status": status,
            "checkpoint": best_ckpt, "startup_s": _round(first[STARTUP]),
            **{f"{phase}_s": _round(first[f"time/{phase}_s"]) for phase in PHASES},
            "train_s": _round(sum(end - start for start, end in spans)) if spans else None,
            "spans": spans, "curve": curve, "curve_at": curve_at,
            **({name: best_acc if name == metric else counted(name, reported(history, name, -1))
                for name in objectives} if len(objectives) > 1 else {}),
        })
    return rows


def counted(name: str, value: float | None) -> float | int | None:
    """Parameters and FLOPs are counts (Tune's history holds them as floats)."""
    return int(value) if name in ("params", "flops") and value is not None else value


def trial_id(result) -> str:
    """A Tune Result's trial id (its folder's name when it reported nothing)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def reported(history, key: str, index: int) -> float | None:
    """The `index`-th value a trial reported under `key` (0: the first, -1: the last)."""
    if history is None or key not in history or not history[key].notna().any():
        return None
    return float(history[key].dropna().iloc[index])


def training_spans(history) -> list[tuple[float, float]]:
    """(start, end) unix times of each epoch a trial trained, from its previous report (or
    its worker's first step) to its report: the trial's training time without downtime."""
    if history is None or REPORTED_AT not in history or FIRST_STEP_AT not in history:
        return []
    spans, previous = [], float("-inf")
    for end, first_step in zip(history[REPORTED_AT], history[FIRST_STEP_AT]):
        if end != end or first_step != first_step:  # NaN: a row without the times
            continue
        start = max(previous, first_step)
        if end > start:
            spans.append((float(start), float(end)))
        previous = end
    return spans


def training_seconds(rows: list[dict[str, Any]]) -> float:
    """Seconds in which at least one trial was training (the union of their epochs)."""
    spans = sorted(span for r in rows for span in r["spans"])
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def write_trials_csv(rows: list[dict[str, Any]], searched: list[str], target: Path) -> None:
    buffer = io.StringIO()
    costs = [name for name in FOOTPRINT if rows and name in rows[0]]
    fields = ["trial_id", *searched, "epochs", "best_score", *costs, "status", "origin", "round",
              "startup_s",
              *(f"{phase}_s" for phase in PHASES), "train_s"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(target, buffer.getvalue())
