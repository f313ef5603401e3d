"""The search's pipeline, stage by stage: prepare -> search -> choose -> retrain and test ->
analyse -> report (docs/architecture.md). `python -m cifar_ray.tune` checks its input and
calls `run`; each stage is a function that returns what the next one needs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cifar_ray import pick, tracking
from cifar_ray.config import overlay
from cifar_ray.console import CONSOLE_MARK, format_duration
from cifar_ray.data.arrays import ImageArrays
from cifar_ray.data.sources import load_dataset
from cifar_ray.errors import Interrupted, UserError
from cifar_ray.files import (
    MARKER,
    check_trusted,
    is_made,
    make_dir,
    remove_made,
    write_json,
    write_text,
)
from cifar_ray.names import CHECKPOINT_FILE, METRIC, MODE, PHASES, shown_name
from cifar_ray.output_dir import output_dir_lock
from cifar_ray.report import write_report
from cifar_ray.search.cluster import (
    configure_auth,
    machine_resources,
    plan_resources,
    shortfall,
    start_ray,
    trials_that_fit,
)
from cifar_ray.search.budget import (
    DECIDED,
    RETRAIN_EPOCH_S,
    BudgetClock,
    Sized,
    calibrate,
    parse_budget,
    plan_lines,
    sized_from_dict,
)
from cifar_ray.search.objectives import Constraint, front
from cifar_ray.search.plan import asha_rungs, image_counts, make_plan, space_lines
from cifar_ray.search.rounds import Session, rounds_of, run_rounds
from cifar_ray.search.seeds import SAVED_CONFIG, SEEDS_FILE, Seeds, remembered, save_seeds
from cifar_ray.search.settings import SearchConfig, describe, format_value
from cifar_ray.search.tuner import (
    STOPPED_BY_BUDGET,
    storage_dir,
    training_seconds,
    write_trials_csv,
)
from cifar_ray.signals import ctrl_c_stops_tune, stop_signals


@dataclass
class Prepared:
    """The data set, read once for every trial."""

    arrays: ImageArrays | None  # None once in Ray's object store (`share`)
    sizes: tuple[int, int]  # training images, validation images of its own
    started: float  # when the command started (time.perf_counter)


@dataclass
class Searched:
    rows: list[dict[str, Any]]  # one per trial (search.tuner.summarise_trials)
    best: dict[str, Any]  # the best row; its "config": the sample, in config keys
    scaling: dict[str, Any]  # one trial worker's resources: the retrain gets the same
    setup_seconds: float  # from the command's start to Tune's
    tune_seconds: float  # across resumes
    sessions: int
    seeds: Seeds | None = None  # what the search started from (--warm-start, --try)


@dataclass
class Asked:
    """What the command asked of this search besides its config."""

    resume: bool = False
    overwrite: bool = False
    verbose: bool = False
    sized: Sized | None = None  # what the budget buys (tune.size_to_budget)
    started_at: float | None = None  # when the command started (unix time): the budget's zero
    seeds: Seeds | None = None  # --warm-start's trials and --try's configs
    more: int = 0  # --more N: trials added after the search's last round
    config_file: str = ""  # --config, or the one tune chose for this machine
    purpose: str = ""  # what that file says it is for (config.purpose_of)


def run(cfg: SearchConfig, out: Path, asked: Asked) -> int:
    """The whole search in `out`, which the caller holds the lock of."""
    started = time.perf_counter()
    resume, overwrite = asked.resume, asked.overwrite
    with storage_lock(cfg, out):
        check_search_dir(out, cfg, resume, overwrite)
        clock = budget_clock(cfg, out, resume, asked.sized, asked.started_at)
        seeds_file = storage_dir(cfg, out) / cfg.tune.name / SEEDS_FILE
        if resume:
            asked.seeds = remembered(seeds_file, asked.seeds)
        if cfg.tracking.mlflow_uri:
            tracking.prepare_experiment(cfg.tracking)
        if cfg.tune.address == "local":
            check_resources(cfg, *machine_resources())
        prepared = prepare(cfg, started)
        # Every input is good: only now is the earlier search discarded (--overwrite).
        start_fresh_or_resume(out, cfg, resume, overwrite)
        if clock:
            clock.save()
        if asked.seeds and (asked.seeds.seeds or asked.seeds.tries):
            save_seeds(asked.seeds, seeds_file)
        return search_to_report(cfg, out, prepared, asked, clock)


def search_to_report(cfg: SearchConfig, out: Path, prepared: Prepared, asked: Asked,
                     clock: BudgetClock | None = None) -> int:
    with ray_session(cfg, out, asked.verbose) as stop:
        data = share(prepared)
        searched = search(cfg, out, prepared, data, asked.resume, asked.verbose, stop, clock,
                          asked.seeds, asked.more)
        after_search = time.perf_counter()
        final = retrain_remotely(cfg, searched, out, data, stop)
    results = summarise(cfg, out, searched, final)
    if asked.config_file:
        results["config_file"] = shown_name(asked.config_file, 400)
        results["purpose"] = shown_name(asked.purpose, 400)
    results["total_seconds"] = round(results["search_seconds"]
                                     + time.perf_counter() - after_search, 1)
    if clock and not asked.more:
        results["budget"] = budget_results(clock, searched)
        clock.save()
    report(cfg, out, results, searched, final["gradcam"])
    return 0


BUDGET_FILE = "cifar_ray_budget.json"  # in the experiment: what the budget bought, time used


def budget_clock(cfg: SearchConfig, out: Path, resume: bool, sized: Sized | None,
                 started_at: float | None) -> BudgetClock | None:
    """This session's clock: a new budget's, or a resumed search's, with the seconds its
    earlier sessions used (the time between them not counted)."""
    path = storage_dir(cfg, out) / cfg.tune.name / BUDGET_FILE
    if resume and len(rounds_of(path.parent)) > 1:
        return None  # extended with --more: its budget was spent on what it first ran
    if resume and cfg.tune.budget:
        try:
            saved = json.loads(path.read_text())
            sized, used = sized_from_dict(saved["sized"]), float(saved["used_s"])
        except FileNotFoundError:
            raise UserError(f"--resume: {path} is missing: the budget's time used is not "
                            "known; start again with --overwrite") from None
        except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
            raise UserError(f"--resume: {path} is damaged ({type(exc).__name__}); start again "
                            "with --overwrite") from None
        clock = BudgetClock(sized, used, started_at)
    elif sized is None:
        return None
    else:
        clock = BudgetClock(sized, 0.0, started_at)
    clock.path = path
    return clock


def retrain_in_time_left(cfg: SearchConfig, clock: BudgetClock, best: dict[str, Any],
                         sizes: tuple[int, int], use_gpu: bool) -> None:
    """The retrain's epochs from the time the search left; on this machine its cost is
    measured again, at the best configuration, now that no trial shares the machine (on a
    cluster, from the trials' epochs)."""
    images = min(cfg.data.limit_train or sum(sizes), sum(sizes))
    if cfg.tune.address == "local":
        final = overlay(cfg, best["config"])
        batch = final.trainer.batch_size if use_gpu else min(final.trainer.batch_size, 128)
        per_image = calibrate(final.model.width, batch, final.data.image_size,
                              "cuda" if use_gpu else "cpu", cfg.tune.cpus_per_worker,
                              res_blocks=final.model.res_blocks)
        clock.retrain_epoch_s = per_image * images + RETRAIN_EPOCH_S
    else:
        train, val = image_counts(cfg, sizes) or sizes
        clock.retrain_epoch_s = clock.epoch_s * images / (train + val / 3)
    epochs = clock.retrain_epochs()
    cfg.retrain.retrain_epochs = epochs
    print(f"{clock.text()}; the {format_duration(max(0.0, clock.left()))} left buy a "
          f"{epochs}-epoch retrain ({format_duration(clock.retrain_epoch_s)} an epoch)")
    clock.save()


def budget_results(clock: BudgetClock, searched: Searched) -> dict[str, Any]:
    s = clock.sized
    return {"budget_s": s.budget_s, "used_s": round(clock.used(), 1),
            "planned_s": round(s.expected_s or s.budget_s, 1),
            "planned_trials": s.trials, "trials": len(searched.rows),
            "trials_stopped_by_budget": sum(r["status"] == STOPPED_BY_BUDGET
                                            for r in searched.rows),
            "epochs": s.epochs, "grace_period": s.grace_period,
            "planned_retrain_epochs": s.retrain_epochs,
            "epoch_s_planned": round(s.costs.epoch_s, 2),
            "epoch_s_measured": round(clock.epoch_s, 2), "source": s.costs.source,
            "upper_bounds": s.bounds}


def check_resources(cfg: SearchConfig, cpus: int, gpus: int) -> tuple[float, int]:
    """A local search's trial must fit this machine's `cpus` and `gpus`: checked (and the
    automatic shares set) before any data is read. (GPUs per worker, trials at once.)"""
    gpus_per_worker, fits = trials_that_fit(cfg.tune, cpus, gpus)
    if not fits:
        raise UserError(shortfall(cfg.tune, cpus, gpus, gpus_per_worker)
                        .format(where="this machine"))
    return gpus_per_worker, fits


@contextlib.contextmanager
def storage_lock(cfg: SearchConfig, out: Path) -> Iterator[None]:
    """A search whose trials write outside the output dir (tune.storage) also holds a lock
    there, `.<tune.name>.lock`: no two searches write (or delete) one experiment."""
    storage = storage_dir(cfg, out)
    if storage == out:
        yield
        return
    with output_dir_lock(storage, "cifar_ray.tune", lock_name=f".{cfg.tune.name}.lock",
                         check=storage / cfg.tune.name):
        yield


@contextlib.contextmanager
def ray_session(cfg: SearchConfig, out: Path, verbose: bool) -> Iterator[Any]:
    """Ray started (or joined) for the body, with the workers' output in a log and a signal
    handler whose `stop` event the stages check; everything undone when the body ends."""
    configure_auth(cfg.tune.address)
    import ray

    tmp = out / "tmp"
    remove_made(out, tmp)  # a killed search's (only if it is the project's)
    make_dir(tmp)
    # Workers bind Unix sockets (107 bytes at most) under their TMPDIR: a short link to it.
    holder = Path(tempfile.mkdtemp(prefix="cifar_ray-"))
    (holder / "tmp").symlink_to(tmp)
    try:
        start_ray(cfg.tune, holder / "tmp")
        from cifar_ray.search.progress import route_worker_logs  # imports Ray

        if not verbose:
            route_worker_logs(out / "logs" / "workers.log")
            print(f"worker output (Ray Train, Lightning): {out / 'logs' / 'workers.log'} "
                  "(-v shows it here)")
        with stop_signals("stopping") as stop:
            yield stop
    finally:
        try:
            ray.shutdown()
        finally:
            shutil.rmtree(holder, ignore_errors=True)  # made by mkdtemp above: the link goes
            remove_made(out, tmp)


def prepare(cfg: SearchConfig, started: float) -> Prepared:
    """Read (download, validate) the data set once, before Ray starts."""
    data_dir = Path(cfg.data.data_dir).expanduser().resolve()
    cfg.data.data_dir = str(data_dir)  # absolute: Ray changes each trial's working directory
    arrays = load_dataset(cfg.data, cfg.largest_image_size())
    sizes = (len(arrays.train_labels), 0 if arrays.val_labels is None else len(arrays.val_labels))
    return Prepared(arrays, sizes, started)


def share(prepared: Prepared) -> list:
    """The data set into Ray's object store, which every trial's workers map it from; the
    driver's own copy is let go. [The reference]: in a list, Ray hands it on as it is."""
    import ray

    data = [ray.put(prepared.arrays)]
    prepared.arrays = None
    return data


def search(cfg: SearchConfig, out: Path, prepared: Prepared, data: list, resume: bool,
           verbose: bool, stop, clock: BudgetClock | None = None, seeds: Seeds | None = None,
           more: int = 0) -> Searched:
    """Tune's search over `cfg.search` (its rounds: search.rounds), its trials summarised in
    trials.csv, the best chosen; with a budget, its deadline kept (search.searchers)."""
    import ray

    scaling, concurrent = plan_resources(cfg, storage_dir(cfg, out))
    plan = make_plan(cfg, concurrent, scaling["resources_per_worker"]["GPU"],
                     cpus_total=ray.cluster_resources().get("CPU"), sizes=prepared.sizes)
    if clock:
        plan.epoch_seconds, plan.epoch_source = clock.epoch_s, clock.sized.costs.source
        plan.retrain_epoch_seconds = clock.retrain_epoch_s
    print(f"search ({cfg.tune.search_alg}) over {', '.join(cfg.search)}\n{plan.text()}\n"
          + "\n".join(space_lines(cfg) + (seeds.lines() if seeds else [])
                      + (plan_lines(clock.sized, clock.started) if clock else [])))
    if warning := plan.cpu_warning():
        print(warning, flush=True)
    setup_seconds = time.perf_counter() - prepared.started
    if stop.is_set():
        raise Interrupted("stopped before the search started; nothing to resume", stop.exit_code)
    session = Session(plan, concurrent, scaling, data[0], verbose, clock, seeds, more)
    with ctrl_c_stops_tune() as interrupted:
        rows, seconds, sessions = run_rounds(cfg, out, session, resume, interrupted)
    write_trials_csv(rows, list(cfg.search), out / "trials.csv")
    print(startup_summary(rows, seconds))
    best = choose(rows, storage_dir(cfg, out) / cfg.tune.name,
                  "the budget ran out first: give a larger --budget" if clock else "",
                  cfg.tune.metric, cfg.objectives(), cfg.constraints())
    if clock and not more:  # a --more command's retrain: --retrain-epochs
        retrain_in_time_left(cfg, clock, best, prepared.sizes, scaling["use_gpu"])
    print(f"best trial {best['trial_id']}: {cfg.tune.metric}={best['best_score']:.4f} "
          f"{describe(best['config'])}; "
          f"retraining for {cfg.retrain.retrain_epochs} epochs on train + validation")
    return Searched(rows, best, scaling, setup_seconds, seconds, sessions, seeds)


def choose(rows: list[dict[str, Any]], experiment: Path, why: str = "",
           metric: str = METRIC, objectives: list[str] = (),
           constraints: list[Constraint] = ()) -> dict[str, Any]:
    """The trial of the best score (tune.metric) at any epoch, over every round (the first
    of equals), among those that meet `constraints` (tune.pick): its row, and under "config"
    its sample, in config keys, as Tune drew it. None meets them: UserError naming the
    closest."""
    scored = [r for r in rows if r["best_score"] is not None]
    if not scored:
        raise UserError(f"no trial reported {metric}; {why or 'see the errors in ' + str(experiment)}")
    if constraints:
        # The most accurate that meets them is on the front whenever they bound costs above.
        meeting = [r for r in scored if all(c.holds(r.get(c.name)) for c in constraints)]
        if not meeting:  # the closest of the front: the nearest trade-offs there are
            closest = min(front(scored, objectives) or scored,
                          key=lambda r: sum(c.excess(r.get(c.name)) for c in constraints))
            values = ", ".join(f"{n} {format_value(closest.get(n))}" for n in objectives)
            raise UserError(f"--pick {', '.join(c.text() for c in constraints)}: no trial meets "
                            f"it; the closest is trial {shown_name(closest['trial_id'])} "
                            f"({values}); trials.csv has them all; choose again with --resume "
                            "--pick ...")
        scored = meeting
    return dict(max(scored, key=lambda r: r["best_score"] * (1 if MODE == "max" else -1)))


def retrain_remotely(cfg: SearchConfig, searched: Searched, out: Path, data: list,
                     stop) -> dict[str, Any]:
    """`retrain_and_analyse` as a Ray task with a trial worker's resources (a GPU node on a
    cluster), waited for while watching `stop`."""
    import ray

    finish = ray.remote(retrain_and_analyse).options(
        num_cpus=cfg.tune.cpus_per_worker,
        num_gpus=searched.scaling["resources_per_worker"]["GPU"])
    task = finish.remote(cfg, searched.best, out, data)
    while not ray.wait([task], timeout=0.5)[0]:
        if stop.is_set():
            ray.cancel(task, force=True)
            raise Interrupted("stopped during the retrain; run the same command with "
                              "--resume to finish (the search's trials are kept)",
                              stop.exit_code)
    try:
        return ray.get(task)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):  # one line for the user, not Ray's traceback
            raise exc.cause from None
        raise


def retrain_and_analyse(cfg: SearchConfig, best: dict[str, Any], out: Path,
                        data: list) -> dict[str, Any]:
    """The best sample laid over the base config (the overlay the trial made), trained on
    train + validation, tested once, its mistakes analysed; on a Ray worker."""
    import ray

    from cifar_ray import explain, training

    final = overlay(cfg, best["config"])
    final.trainer.epochs = cfg.retrain.retrain_epochs
    final.trainer.output_dir = str(out / "retrain")
    final.trainer.progress_bar = False
    final.data.val_size = 0  # train on train + validation; the test set is touched once
    init = None
    if cfg.retrain.init == "checkpoint" and not best["checkpoint"] and cfg.tune.budget:
        # The deadline may end a trial before its epoch's checkpoint is saved: the budget's
        # retrain still runs, from scratch.
        print(f"trial {best['trial_id']} left no checkpoint (the budget ended it): the retrain "
              "starts from scratch")
    elif cfg.retrain.init == "checkpoint":
        if not best["checkpoint"]:
            raise UserError(f"trial {best['trial_id']} left no checkpoint to retrain from; "
                            "use retrain.init: scratch")
        init = str(Path(best["checkpoint"]) / CHECKPOINT_FILE)
    arrays = ray.get(data[0])
    results = training.run(final, arrays=arrays, init_checkpoint=init, overwrite=True,
                           hparams=best["config"],
                           mlflow=tracking.retrain_logger(cfg.tracking, best["config"]),
                           line_prefix=CONSOLE_MARK + "retrain ", metric=cfg.tune.metric)
    report = explain.analyse(results["checkpoint"], final.data.data_dir, out / "gradcam",
                             split="test", arrays=arrays)
    return {"retrain": results, "gradcam": report,
            "footprint": pick.measure_export(cfg, results["checkpoint"], out, best["config"])}


def summarise(cfg: SearchConfig, out: Path, searched: Searched,
              final: dict[str, Any]) -> dict[str, Any]:
    """results.json's contents (without total_seconds, which the caller measures)."""
    best, rows, retrain = searched.best, searched.rows, final["retrain"]
    results = {
        "best_config": best["config"], "metric": cfg.tune.metric, "best_score": best["best_score"],
        "runner_up": runner_up(rows, best),
        "best_trial": best["trial_id"], "num_trials": len(rows),
        "trials_stopped_early": sum(r["status"] == "stopped early" for r in rows),
        **{key: retrain[key] for key in ("test_acc", "test_balanced_acc", "test_f1", "test_loss",
                                         "per_class_acc", "per_class", "checkpoint")},
        "gradcam_dir": final["gradcam"]["output_dir"],
        "retrain_epochs": cfg.retrain.retrain_epochs, "retrain_init": cfg.retrain.init,
        "search_alg": cfg.tune.search_alg,
        "search_seconds": round(searched.setup_seconds + searched.tune_seconds, 1),
        "tune_seconds": round(searched.tune_seconds, 1),
        "training_seconds": round(training_seconds(rows), 1),
        "startup_phases_s": median_phases(rows),
        "resumes": searched.sessions - 1,
        "trials_csv": str(out / "trials.csv"), "report": str(out / "report.html"),
        "mlflow_run_id": retrain["mlflow_run_id"],
        "experiment_dir": str(storage_dir(cfg, out) / cfg.tune.name),
        "rounds": 1 + max((r.get("round", 0) for r in rows), default=0),
        "seeded": seeded_results(searched.seeds),
        "config": cfg.to_dict(),
        **pick.pareto_results(cfg, rows, best, final.get("footprint")),
    }
    results["config"]["tracking"]["mlflow_uri"] = tracking.redacted(cfg.tracking.mlflow_uri)
    return results


def runner_up(rows: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any] | None:
    """The second-best trial (the report shows the best's margin over it), if any."""
    others = [r for r in rows if r["best_score"] is not None and r["trial_id"] != best["trial_id"]]
    second = max(others, key=lambda r: r["best_score"], default=None)
    return None if second is None else {"trial": second["trial_id"],
                                        "best_score": second["best_score"]}


def seeded_results(seeds: Seeds | None) -> dict[str, Any]:
    """results.json's account of the head start: seeded trials, those skipped, --try."""
    if seeds is None:
        return {}
    best = seeds.best()
    return {"trials": len(seeds.seeds), "from": sorted({s.source for s in seeds.seeds}),
            "best_score": best.value if best else None,
            "skipped": sum(seeds.skipped.values()), "skipped_why": dict(seeds.skipped),
            "tries": [" ".join(f"{k}={v}" for k, v in t.items()) for t in seeds.tries]}


def report(cfg: SearchConfig, out: Path, results: dict[str, Any], searched: Searched,
           gradcam_report: dict[str, Any]) -> None:
    """report.html, results.json, summary.md (and MLflow's copies); the closing lines."""
    t = cfg.tune
    page = write_report(out, results, searched.rows, cfg.space(),
                        asha_rungs(cfg.trainer.epochs, t.grace_period, t.reduction_factor),
                        gradcam_report)
    write_json(out / "results.json", results)
    write_text(out / "summary.md", summary_markdown(results))
    tracking.log_artifacts(cfg.tracking, results["mlflow_run_id"], [results["checkpoint"], page])
    best = searched.best
    print(f"\ndone: best {describe(best['config'])} ({t.metric} {best['best_score']:.4f}); "
          f"test_acc={results['test_acc']:.4f} test_balanced_acc={results['test_balanced_acc']:.4f}\n"
          f"  report:  {page}\n"
          f"  results: {out / 'results.json'}\n  summary: {out / 'summary.md'}\n"
          f"  model:   {results['checkpoint']}\n"
          f"  gradcam: {Path(gradcam_report['output_dir']) / 'index.html'}")
    if results.get("pick"):
        print(pick.pick_line(results["pick"]))


def median_phases(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The median seconds of each start-up phase over the trials that measured it."""
    out = {}
    for phase in [*PHASES, "startup"]:
        values = sorted(r[f"{phase}_s"] for r in rows if r[f"{phase}_s"] is not None)
        if values:
            out[phase] = round(statistics.median(values), 2)
    return out


def startup_summary(rows: list[dict[str, Any]], tune_seconds: float) -> str:
    """Two lines: where the trials' start-up went, and how much of the search was training."""
    phases = median_phases(rows)
    if "startup" not in phases:
        return "search: no trial reached its first training step"
    parts = ", ".join(f"{phase} {phases[phase]:.1f}" for phase in PHASES if phase in phases)
    busy = training_seconds(rows)
    return (f"trial start-up, median {phases['startup']:.1f} s: {parts}\n"
            f"search: {tune_seconds:.0f} s, of which some trial was training {busy:.0f} s "
            f"({busy / max(tune_seconds, 1e-9):.0%})")


def check_search_dir(out: Path, cfg: SearchConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a search already there unless told; with --overwrite, that the saved
    search is the project's to delete (start_fresh_or_resume deletes it, once every input is
    checked); with --resume, that its saved state is there, whole and trusted."""
    storage = storage_dir(cfg, out)
    experiment = storage / cfg.tune.name
    tmp = out / "tmp"  # Ray's temp files: deleted after the search, so only the project's
    if tmp.exists() and not is_made(tmp) or tmp.is_symlink():
        raise UserError(f"{tmp} is not the project's (no {MARKER} in it), and a search keeps "
                        "Ray's temp files there: move it away or choose another --output-dir")
    if experiment == out or tmp == experiment or tmp in experiment.parents:
        raise UserError(f"tune.storage {storage}: the experiment {experiment} would be the "
                        "output dir or inside its tmp/: give another storage")
    if overwrite:
        if experiment.exists() and not is_made(experiment):
            raise UserError(f"--overwrite: refusing to delete {experiment}: the project did not "
                            f"make it (no {MARKER} in it); move or delete it yourself")
        return
    if resume:
        check_saved_state(experiment)
        check_same_search(experiment, cfg)
        return
    if (out / "results.json").exists():
        raise UserError(f"{out} already holds a finished search (results.json); "
                        "pass --overwrite to start again or choose another --output-dir")
    if experiment.exists():
        raise UserError(f"{experiment.parent} holds an interrupted search ({experiment.name}/); "
                        "pass --resume to continue it or --overwrite to start again")


def start_fresh_or_resume(out: Path, cfg: SearchConfig, resume: bool, overwrite: bool) -> None:
    """--overwrite deletes the saved search (in tune.storage, else the output dir) and
    results.json; a new search's folder is made, marked as the project's (files.make_dir)."""
    storage = storage_dir(cfg, out)
    experiment = storage / cfg.tune.name
    if overwrite:
        remove_made(storage, experiment)
        remove_made(out, out / "results.json")
    if not resume:
        make_dir(experiment)
        write_json(experiment / SAVED_CONFIG, cfg.to_dict())


# What --resume may change: where and how fast it runs, not what its trials train.
# Keys added since a search may have started whose defaults are what it ran with (unlike the
# recipe's, which came with a stratified split: a search from before them is not resumed).
SAME_AT_DEFAULT = ("model.res_blocks", "tune.objectives", "tune.pick", "tune.latency_batch",
                   "tune.latency_table")
RESUMABLE = ("data.data_dir", "data.num_workers", "trainer.output_dir", "trainer.progress_bar",
             "tune.pick",
             "tune.address", "tune.storage", "tune.max_concurrent", "tune.cpus_per_worker",
             "tune.gpus_per_worker", "tune.max_failures", "retrain.", "tracking.")


def check_same_search(experiment: Path, cfg: SearchConfig) -> None:
    """--resume with settings that change what the trials train is refused in one line."""
    try:
        saved = json.loads((experiment / SAVED_CONFIG).read_text())
        if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
            raise ValueError("not a config's sections")
    except FileNotFoundError:
        return  # a search from before the settings were saved
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"--resume: {experiment / SAVED_CONFIG} is damaged ({exc}); start "
                        "again with --overwrite") from None
    budget = keep_budget(saved, cfg)
    if budget:  # what the budget decided, as it decided it
        for key in DECIDED[:2]:  # the retrain's: from the time left (or --retrain-epochs)
            section, name = key.split(".")
            if isinstance(value := saved.get(section, {}).get(name), int):
                setattr(getattr(cfg, section), name, value)
    now = json.loads(json.dumps(cfg.to_dict()))
    defaults = json.loads(json.dumps(SearchConfig().to_dict()))
    for section in sorted(set(saved) | set(now)):
        old, new = saved.get(section), now.get(section)
        names = set(old) | set(new) if isinstance(old, dict) and isinstance(new, dict) else {""}
        for name in sorted(names, key=str):
            key = f"{section}.{name}" if name else section
            before = old.get(name) if name else old
            after = new.get(name) if name else new
            if before != after and not key.startswith(RESUMABLE):
                missing = isinstance(old, dict) and name not in old or old is None
                if missing and key in SAME_AT_DEFAULT and after == defaults[section][name]:
                    continue
                if missing:
                    raise UserError(f"--resume: the search was started by an earlier version "
                                    f"of cifar_ray, without {shown_name(key)}: start again "
                                    "with --overwrite")
                raise UserError(f"--resume: the search was started with {shown_name(key)} = "
                                f"{shown_name(before)}, not {shown_name(after)}: resume with the "
                                "same settings, or start again with --overwrite")


def keep_budget(saved: dict[str, Any], cfg: SearchConfig) -> str:
    """A resumed search keeps the budget it started with (given again or not); another one is
    refused in one line. Returns that budget ('' for none)."""
    before = saved.get("tune", {}).get("budget") or ""
    given = cfg.tune.budget
    if before and (not given or parse_budget(given) == parse_budget(str(before))):
        cfg.tune.budget = before
    elif given:
        was = f"--budget {before}" if before else "no budget"
        raise UserError(f"--resume: the search was started with {was}, not --budget {given}: "
                        "resume without --budget (a resumed search keeps its own)")
    return cfg.tune.budget


def check_saved_state(experiment: Path) -> None:
    """--resume: the experiment's saved state must be there, read as JSON, and be trusted (Tune
    unpickles it: files.check_trusted); else a line saying what to do."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        raise UserError(f"--resume: no search to resume in {experiment}")
    check_trusted(experiment)
    try:
        json.loads(states[-1].read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"--resume: the search's saved state {states[-1]} is damaged ({exc}); "
                        "start again with --overwrite") from None


def summary_markdown(results: dict[str, Any]) -> str:
    best = results["best_config"]
    return f"""# Search summary

- trials: {results['num_trials']} ({results['trials_stopped_early']} stopped early by ASHA)
- best configuration: {', '.join(f'{key} = {format_value(value)}' for key, value in best.items())}
- best {results['metric']} during the search: {results['best_score']:.4f}
- retrained for {results['retrain_epochs']} epochs on train + validation (init: {results['retrain_init']})
- **test accuracy: {results['test_acc']:.4f}** (balanced {results['test_balanced_acc']:.4f}, macro F1 {results['test_f1']:.4f}, test loss {results['test_loss']:.4f})
- search time: {results['search_seconds']:.0f} s, total: {results['total_seconds']:.0f} s{resumed(results)}{budget_line(results)}{pick.pareto_lines(results)}

The whole run on one page: `report.html`. Files: `trials.csv`, `retrain/` (checkpoint
`{Path(results['checkpoint']).name}`, TensorBoard logs, `curves.png`), `gradcam/index.html`
(misclassified images and their GradCAMs).
"""


def budget_line(results: dict[str, Any]) -> str:
    b = results.get("budget")
    if not b:
        return ""
    return (f"\n- budget: {b['used_s']:.0f} s used of {b['budget_s']:.0f} s; it bought "
            f"{b['trials']} trials of up to {b['epochs']} epochs and a "
            f"{results['retrain_epochs']}-epoch retrain")


def resumed(results: dict[str, Any]) -> str:
    n = results["resumes"]
    return f" (over {n + 1} sessions: resumed {n} time{'s' if n > 1 else ''})" if n else ""
