"""The pipeline: `python -m cifar_ray.tune [--config experiments/search.yaml] [--flags]`.

    search     Ray starts locally (or `--address` joins a cluster; ray_cluster.py); the data set
               is prepared once, here; Tune samples the config's `search:` space, each trial a
               Ray Train run, ASHA stopping the weak ones on validation accuracy (search.py,
               trial.py)
    retrain    the best trial's sample laid over the base config (`config.overlay`), trained on
               train + validation from its best checkpoint or from scratch (training.py)
    test       once, on the test set
    gradcam    the retrained model's mistakes and where it looked (gradcam.py)

Output dir:
    <name>/           Tune's experiment folder (what `--resume` restores)
    train_runs/       the trials' Ray Train runs and checkpoints
    trials.csv        one row per trial, a column per searched key
    retrain/          the final single run (best.ckpt, tensorboard/, curves.png, results.json)
    gradcam/          the misclassification report of the retrained model
    report.html       the whole run on one page (figures in report/)
    results.json      best config, search and test numbers, paths
    summary.md        the same, for people
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cifar_ray import cli, tracking
from cifar_ray.config import add_config_flags, overlay, parse_command
from cifar_ray.console import CONSOLE_MARK
from cifar_ray.data.sources import load_dataset
from cifar_ray.errors import Interrupted, UserError, cli_entry
from cifar_ray.files import remove_inside, write_json, write_text
from cifar_ray.output_dir import check_resume_or_overwrite, output_dir_lock
from cifar_ray.report import write_report
from cifar_ray.search.cluster import (
    AUTO_CPUS,
    concurrency,
    configure_auth,
    ctrl_c_stops_tune,
    machine_resources,
    plan_resources,
    shortfall,
    start_ray,
    stop_signals,
    trials_that_fit,
)
from cifar_ray.search.names import CHECKPOINT_FILE, METRIC, PHASES
from cifar_ray.search.plan import asha_rungs, make_plan
from cifar_ray.search.settings import (
    DISTRIBUTIONS,
    SearchConfig,
    describe,
    format_value,
    search_flag,
)
from cifar_ray.search.tuner import (
    run_search,
    storage_dir,
    summarise_trials,
    training_seconds,
    tune_space,
    write_trials_csv,
)


def retrain_and_analyse(cfg: SearchConfig, best: dict[str, Any], out: Path,
                        data: list) -> dict[str, Any]:
    """Runs on a Ray worker with one trial worker's resources (a GPU node on a cluster);
    `data`: [the object reference to the data set's arrays]."""
    import ray

    from cifar_ray import gradcam, tracking, training

    final = overlay(cfg, best["config"])  # the same overlay the trial made
    final.trainer.epochs = cfg.retrain.retrain_epochs
    final.trainer.output_dir = str(out / "retrain")
    final.trainer.progress_bar = False
    final.data.val_size = 0  # train on train + validation; the test set is touched once
    init = None
    if cfg.retrain.init == "checkpoint":
        if not best["checkpoint"]:
            raise UserError(f"trial {best['trial_id']} left no checkpoint to retrain from; "
                            "use retrain.init: scratch")
        init = str(Path(best["checkpoint"]) / CHECKPOINT_FILE)
    arrays = ray.get(data[0])
    results = training.run(final, arrays=arrays, init_checkpoint=init, overwrite=True,
                            hparams=best["config"],
                            mlflow=tracking.retrain_logger(cfg.tracking, best["config"]),
                            line_prefix=CONSOLE_MARK + "retrain ")
    report = gradcam.analyse(results["checkpoint"], final.data.data_dir, out / "gradcam",
                             split="test", arrays=arrays)
    return {"retrain": results, "gradcam": report}


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


def build_parser(cfg: SearchConfig) -> argparse.ArgumentParser:
    parser = cli.parser("tune", "Search the config's `search:` space (by default lr, weight "
                                "decay, batch size) with Ray Tune + ASHA, retrain the best on "
                                "the full training set, test it and explain its mistakes.",
                        usage="[--config YAML] [--search KEY=DIST:VALUES ...] [flags]")
    parser.add_argument("--search", action="append", default=[], metavar="KEY=DIST:VALUES",
                        help="one key of the search space, replacing that key of the YAML's "
                             "(repeatable): e.g. optim.lr=loguniform:1e-4,1e-1, "
                             "trainer.batch_size=choice:128,256,512; distributions: "
                             f"{', '.join(DISTRIBUTIONS)}")
    add_config_flags(parser, cfg)
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted search in the same output dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a search already in the output dir and start again")
    parser.add_argument("--plan", action="store_true",
                        help="print what the search would run (trials, ASHA's rungs, "
                             "trial-epochs, time) and exit: no Ray, no data")
    parser.add_argument("--plan-epoch-seconds", type=float, metavar="S",
                        help="with --plan: seconds one trial-epoch takes (e.g. from "
                             "python -m cifar_ray.bench), for the time and GPU-hours")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and Lightning's worker output and Tune's per-trial "
                             "tables on the console (otherwise in <output dir>/logs/)")
    return parser


def parse(argv: list[str] | None) -> tuple[SearchConfig, argparse.Namespace]:
    """The search's config from --config, --search and the flags, with the flags that a search
    would silently override refused (one line naming the way to do it)."""
    cfg = SearchConfig()
    cfg, args = parse_command(build_parser, cfg, argv)
    for text in args.search:
        key, spec = search_flag(text)
        cfg.search[key] = spec
    cfg.validate()  # the space again, with what --search changed
    flags = {dest: value for dest, value in vars(args).items()
             if "." in dest and value is not None}
    for key in cfg.search:
        if key in flags:
            flag = "--" + key.split(".", 1)[1].replace("_", "-")
            raise UserError(f"{flag} sets {key}, which the search samples: give its range with "
                            f"--search {key}=DISTRIBUTION:VALUES, or take it out of the search "
                            "space to fix it")
    if flags.get("trainer.devices", 1) != 1:
        raise UserError("--devices does nothing in a search: each trial's workers are "
                        "--workers-per-trial (with --gpus-per-worker each)")
    return cfg, args


def print_plan(cfg: SearchConfig, epoch_seconds: float | None) -> None:
    """--plan: the plan on this machine's resources, checked; or, for a cluster's --address
    or GPUs this machine lacks (--gpus-per-worker G), as the flags give them."""
    t = cfg.tune
    cpus, gpus = machine_resources() if t.address == "local" else (0, 0)
    here = t.address == "local" and not (t.gpus_per_worker > 0 and not gpus)
    if here:
        gpus_per_worker, fits = check_resources(cfg, cpus, gpus)
    else:  # resources unknown here: the automatic CPUs are those of a GPU trial, if it has one
        if t.cpus_per_worker < 0:
            t.cpus_per_worker = AUTO_CPUS if t.gpus_per_worker != 0 else 1
        gpus_per_worker, fits = trials_that_fit(t, 10**9, 10**9)
    plan = make_plan(cfg, concurrency(t, fits if here else 0), gpus_per_worker, epoch_seconds,
                     "given" if epoch_seconds else "")
    print(plan.text())
    if here and not t.max_concurrent:
        print(f"  (this machine, {cpus} CPUs and {gpus} GPUs, holds {fits} at a time; for "
              "another, give --max-concurrent N and --gpus-per-worker G)")
    if warning := plan.cpu_warning(starting=False):
        print(warning)


def check_resources(cfg: SearchConfig, cpus: int, gpus: int) -> tuple[float, int]:
    """A local search's trial must fit this machine's `cpus` and `gpus`: checked (and the
    automatic shares set) before any data is read or downloaded. (GPUs per worker, trials at
    once.)"""
    gpus_per_worker, fits = trials_that_fit(cfg.tune, cpus, gpus)
    if not fits:
        raise UserError(shortfall(cfg.tune, cpus, gpus, gpus_per_worker)
                        .format(where="this machine"))
    return gpus_per_worker, fits


def check_output_dir(out: Path, cfg: SearchConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a search already there unless told; --overwrite deletes the saved search
    where the search writes it (tune.storage, else the output dir), and nothing outside."""
    storage = storage_dir(cfg, out)
    experiment = storage / cfg.tune.name
    if overwrite:
        for root, path in ((storage, experiment), (storage, storage / "train_runs"),
                           (out, out / "results.json")):
            remove_inside(root, path)
        return
    if resume:
        check_saved_state(experiment)
        return
    if (out / "results.json").exists():
        raise UserError(f"{out} already holds a finished search (results.json); "
                        "pass --overwrite to start again or choose another --output-dir")
    if experiment.exists():
        raise UserError(f"{experiment.parent} holds an interrupted search ({experiment.name}/); "
                        "pass --resume to continue it or --overwrite to start again")


def check_saved_state(experiment: Path) -> None:
    """--resume: the experiment's saved state must be there and read as JSON; a damaged one is
    a line saying what to do (Tune's own error is a long traceback)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        raise UserError(f"--resume: no search to resume in {experiment}")
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
- best validation accuracy during the search: {results['best_val_acc']:.4f}
- retrained for {results['retrain_epochs']} epochs on train + validation (init: {results['retrain_init']})
- **test accuracy: {results['test_acc']:.4f}** (test loss {results['test_loss']:.4f})
- search time: {results['search_seconds']:.0f} s, total: {results['total_seconds']:.0f} s{resumed(results)}

The whole run on one page: `report.html`. Files: `trials.csv`, `retrain/` (checkpoint
`{Path(results['checkpoint']).name}`, TensorBoard logs, `curves.png`), `gradcam/index.html`
(misclassified images and their GradCAMs).
"""


def resumed(results: dict[str, Any]) -> str:
    n = results["resumes"]
    return f" (over {n + 1} sessions: resumed {n} time{'s' if n > 1 else ''})" if n else ""


# The searches `tune` chooses between when no --config is given (sized_to_this_machine).
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FULL, QUICK = EXPERIMENTS / "search.yaml", EXPERIMENTS / "search_smoke.yaml"


def sized_to_this_machine(argv: list[str]) -> list[str]:
    """Without --config, a local search is sized to this machine: the full search where there
    is a GPU, the quick CPU search (minutes) where there is none; one line says which, and how
    to get the other. `-h`, a cluster's --address and an install without experiments/ (the
    built-in defaults are the full search) are left as they are."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    first.add_argument("--address", default="local")
    first.add_argument("-h", "--help", action="store_true")
    given, _ = first.parse_known_args(argv)
    if given.config or given.help or given.address != "local" or not QUICK.is_file():
        return argv
    gpus = machine_resources()[1]
    chosen, other = (FULL, QUICK) if gpus else (QUICK, FULL)
    what = (f"{gpus} GPU{'s' if gpus > 1 else ''} here: the full search" if gpus
            else "no GPU here: the quick CPU search (a few minutes)")
    print(f"{what}, {_shown_path(chosen)}; for the {'quick check' if gpus else 'full search'} "
          f"give --config {_shown_path(other)}", flush=True)
    return ["--config", str(chosen), *argv]


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, args = parse(sized_to_this_machine(argv))
    check_resume_or_overwrite(args.resume, args.overwrite)
    # First: nothing below may pickle or print a password the URI holds.
    tracking.take_credentials(cfg.tracking, local_ray=cfg.tune.address == "local")
    if args.plan_epoch_seconds is not None and args.plan_epoch_seconds <= 0:
        raise UserError(f"--plan-epoch-seconds must be > 0, got {args.plan_epoch_seconds}")
    if args.plan:
        print_plan(cfg, args.plan_epoch_seconds)
        return 0
    out = Path(cfg.trainer.output_dir).expanduser().resolve()
    cfg.trainer.output_dir = str(out)
    with output_dir_lock(out, "cifar_ray.tune"):
        return pipeline(cfg, out, args)


def pipeline(cfg: SearchConfig, out: Path, args: argparse.Namespace) -> int:
    """Search, retrain, test, GradCAM, report: the command's work, in its output dir."""
    searched = list(cfg.search)
    experiment = storage_dir(cfg, out) / cfg.tune.name
    check_output_dir(out, cfg, args.resume, args.overwrite)
    if cfg.tracking.mlflow_uri:
        tracking.prepare_experiment(cfg.tracking)
    start = time.perf_counter()

    if cfg.tune.address == "local":
        check_resources(cfg, *machine_resources())
    # Prepare (download / validate / read) the data set once, before any trial starts.
    data_dir = Path(cfg.data.data_dir).expanduser().resolve()
    cfg.data.data_dir = str(data_dir)  # absolute: Ray changes each trial's working directory
    arrays = load_dataset(cfg.data)
    sizes = (len(arrays.train_labels), 0 if arrays.val_labels is None else len(arrays.val_labels))

    configure_auth(cfg.tune.address)
    import ray

    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    # The workers' TMPDIR: where Ray's Lightning glue stages checkpoints (kept in the run's
    # folder) and DataLoader workers bind Unix sockets, whose paths hold 107 bytes: a deep
    # output dir failed the retrain ("AF_UNIX path too long"), so a short link to it.
    holder = Path(tempfile.mkdtemp(prefix="cifar_ray-"))
    (holder / "tmp").symlink_to(tmp)
    start_ray(cfg.tune, holder / "tmp")
    from cifar_ray.search.progress import SearchConsole, route_worker_logs  # imports Ray

    if not args.verbose:
        route_worker_logs(out / "logs" / "workers.log")
        print(f"worker output (Ray Train, Lightning): {out / 'logs' / 'workers.log'} "
              "(-v shows it here)")

    # Outside the search (ctrl_c_stops_tune has its own), a signal sets `stop`, which the
    # driver checks before the search and while it waits for the retrain.
    signals = contextlib.ExitStack()
    stop = signals.enter_context(stop_signals("stopping"))
    try:
        data = ray.put(arrays)  # read once; every trial's workers map it from the object store
        del arrays
        scaling, concurrent = plan_resources(cfg, storage_dir(cfg, out))
        plan = make_plan(cfg, concurrent, scaling["resources_per_worker"]["GPU"],
                         cpus_total=ray.cluster_resources().get("CPU"), sizes=sizes)
        print(f"search ({cfg.tune.search_alg}) over {', '.join(searched)}\n{plan.text()}")
        if warning := plan.cpu_warning():
            print(warning, flush=True)
        setup_seconds = time.perf_counter() - start
        if stop.is_set():
            raise Interrupted("stopped before the search started; nothing to resume",
                              stop.exit_code)
        with ctrl_c_stops_tune() as interrupted:
            console = SearchConsole(plan, out, tune_space(cfg), args.verbose,
                                    cfg.tune.max_failures, interrupted)
            grid = run_search(cfg, out, args.resume, concurrent, scaling, data, console,
                              args.verbose)
        if full := interrupted.full_disk:
            raise UserError(f"the search stopped: no space left to write {full.path} "
                            f"({full.reason}); its state is saved in {experiment}: "
                            "free some space and run the same command with --resume")
        if interrupted.is_set():
            raise Interrupted(f"search interrupted; its state is saved in {experiment}: "
                              f"run the same command with --resume to continue",
                              interrupted.exit_code)
        # Across resumes: the search's seconds are kept with Tune's state (SearchConsole).
        tune_seconds = console.seconds()
        search_seconds = setup_seconds + tune_seconds
        after_search = time.perf_counter()
        rows = summarise_trials(grid, searched, cfg.trainer.epochs)
        write_trials_csv(rows, searched, out / "trials.csv")
        print(startup_summary(rows, tune_seconds))
        scored = [r for r in rows if r["best_val_acc"] is not None]
        if not scored:
            raise UserError(f"no trial reported {METRIC}; see the errors in {experiment}")
        best = max(scored, key=lambda r: r["best_val_acc"])
        best["config"] = {key: best[key] for key in searched}
        print(f"best trial {best['trial_id']}: val_acc={best['best_val_acc']:.4f} "
              f"{describe(best['config'])}; "
              f"retraining for {cfg.retrain.retrain_epochs} epochs on train + validation")
        finish = ray.remote(retrain_and_analyse).options(
            num_cpus=cfg.tune.cpus_per_worker,
            num_gpus=scaling["resources_per_worker"]["GPU"])
        task = finish.remote(cfg, best, out, [data])
        while not ray.wait([task], timeout=0.5)[0]:
            if stop.is_set():
                ray.cancel(task, force=True)
                raise Interrupted("stopped during the retrain; run the same command with "
                                  "--resume to finish (the search's trials are kept)",
                                  stop.exit_code)
        try:
            final = ray.get(task)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):  # one line for the user, not Ray's traceback
                raise exc.cause from None
            raise
    finally:
        signals.close()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(holder, ignore_errors=True)  # this process's own folder: the link goes

    retrain, gradcam_report = final["retrain"], final["gradcam"]
    results = {
        "best_config": best["config"],
        "best_val_acc": best["best_val_acc"],
        "best_trial": best["trial_id"],
        "num_trials": len(rows),
        "trials_stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "test_acc": retrain["test_acc"],
        "test_loss": retrain["test_loss"],
        "per_class_acc": retrain["per_class_acc"],
        "checkpoint": retrain["checkpoint"],
        "gradcam_dir": gradcam_report["output_dir"],
        "retrain_epochs": cfg.retrain.retrain_epochs,
        "retrain_init": cfg.retrain.init,
        "search_alg": cfg.tune.search_alg,
        "search_seconds": round(search_seconds, 1),
        "tune_seconds": round(tune_seconds, 1),
        "training_seconds": round(training_seconds(rows), 1),
        "startup_phases_s": median_phases(rows),
        "total_seconds": round(search_seconds + time.perf_counter() - after_search, 1),
        "resumes": console.sessions - 1,
        "trials_csv": str(out / "trials.csv"),
        "report": str(out / "report.html"),
        "mlflow_run_id": retrain["mlflow_run_id"],
        "experiment_dir": str(experiment),
        "config": cfg.to_dict(),
    }
    results["config"]["tracking"]["mlflow_uri"] = tracking.redacted(cfg.tracking.mlflow_uri)
    t = cfg.tune
    page = write_report(out, results, rows, cfg.space(),
                        asha_rungs(cfg.trainer.epochs, t.grace_period, t.reduction_factor),
                        gradcam_report)
    write_json(out / "results.json", results)
    write_text(out / "summary.md", summary_markdown(results))
    tracking.log_artifacts(cfg.tracking, retrain["mlflow_run_id"], [results["checkpoint"], page])
    print(f"\ndone: best {describe(best['config'])} (val_acc {best['best_val_acc']:.4f}); "
          f"test_acc={results['test_acc']:.4f}\n"
          f"  report:  {page}\n"
          f"  results: {out / 'results.json'}\n  summary: {out / 'summary.md'}\n"
          f"  model:   {results['checkpoint']}\n  gradcam: {Path(gradcam_report['output_dir']) / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
