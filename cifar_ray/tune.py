"""The search: `python -m cifar_ray.tune [--config experiments/search.yaml] [--flags]`.

    1. Ray starts locally (or `--address` joins a running cluster); the data set is prepared
       once, here, before any trial starts.
    2. Ray Tune samples lr, weight decay and batch size from the config's `search:` section and
       schedules trials with ASHA on validation accuracy. Each trial is a Ray Train
       `TorchTrainer` (W workers, DDP when W > 1) running the Lightning module with Ray's
       strategy and environment; `EpochReports` reports each epoch to Ray Train and
       `TuneReportCallback` hands it to Tune.
    3. The best trial's configuration is retrained on train + validation (from its best
       checkpoint, or from scratch), tested once, and analysed with GradCAM.

Output dir:
    <name>/           Tune's experiment folder (what `--resume` restores)
    train_runs/       the trials' Ray Train runs and checkpoints
    trials.csv        one row per trial
    retrain/          the final single run (best.ckpt, tensorboard/, curves.png, results.json)
    gradcam/          the misclassification report of the retrained model
    results.json      best config, search and test numbers, paths
    summary.md        the same, for people
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

from cifar_ray.config import Config, SearchConfig, add_config_flags, resolve
from cifar_ray.data import ensure_dataset, read_cifar
from cifar_ray.errors import ConfigError, UserError, cli_entry
from cifar_ray.files import write_json, write_text
from cifar_ray.pl import pl
from cifar_ray.train import precision

METRIC = "val/acc"
STARTUP = "time/startup_s"  # see EpochReports
CHECKPOINT_FILE = "checkpoint.ckpt"  # the Lightning checkpoint inside each Ray checkpoint
CHECKPOINT_PATH = "checkpoint_path"  # the key of a report's checkpoint (as Ray's Tune callback)
HEAD_NODE = "node:__internal_head__"  # a resource only the Ray head node has


class Interrupted(UserError):
    exit_code = 130


# ---------------------------------------------------------------------------------------------
# What runs on each Ray Train worker


class EpochReports(pl.Callback):
    """Reports each epoch's metrics and checkpoint to Ray Train (and, through Ray's
    TuneReportCallback, to Tune and ASHA), and keeps every report in the checkpoint, marked
    with the Tune session of the trial that received it.

    Why the marks: Tune saves its experiment state every few seconds, while Ray Train resumes a
    run of the same name from that run's latest checkpoint. A driver killed between two saves
    leaves trials that Tune's state lists as not started (on `--resume` they start a new
    session, counting epochs from zero) whose Train runs went on, perhaps to their last epoch.
    Such a run resumes past the epochs this session never received (a finished one reports
    nothing at all, which Tune rejects). So once the checkpoint is restored, the epochs in it
    that this session has not received are reported first, in order: Tune sees every epoch
    once, whatever the lag. A worker group Ray Train restarts within the same session replays
    nothing, since its checkpoint's reports carry this session's mark.

    Also measures `time/startup_s`: seconds from the trial function's start to this worker's
    first training step (Ray Train's controller, the worker group, imports, data, Lightning's
    setup), what each trial pays before it trains.
    """

    def __init__(self, session: str, trial_started: float, run_dir: str):
        self.session, self.trial_started, self.run_dir = session, trial_started, run_dir
        self.startup_s: float | None = None
        self.reports: list[dict[str, Any]] = []  # {"session": ..., "metrics": {...}} per epoch

    def state_dict(self) -> dict[str, Any]:
        return {"reports": self.reports}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reports = [dict(report) for report in state["reports"]]

    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning restores callback state before this hook, and calls it even when the
        # restored run has no epoch left to train.
        import ray.train

        for report in self.reports:
            if report["session"] != self.session:
                report["session"] = self.session
                ray.train.report(report["metrics"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.startup_s is None:
            self.startup_s = round(time.time() - self.trial_started, 2)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Validation has run by now: its metrics are in callback_metrics too.
        import ray.train

        name = f"epoch_{trainer.current_epoch:04d}"  # a name the reports can point to
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        metrics.update({"epoch": trainer.current_epoch, "step": trainer.global_step,
                        STARTUP: self.startup_s, CHECKPOINT_PATH: str(Path(self.run_dir) / name)})
        self.reports.append({"session": self.session, "metrics": metrics})
        with tempfile.TemporaryDirectory(prefix="report-") as folder:  # saved with this report
            trainer.save_checkpoint(Path(folder) / CHECKPOINT_FILE, weights_only=False)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)


def train_worker(config: dict[str, Any]) -> None:
    """One trial's training on one Ray Train worker (rank 0 of 1, or one rank of a DDP group)."""
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from cifar_ray.data import CifarDataModule
    from cifar_ray.module import LitResNet9

    logging.getLogger(pl.__name__).setLevel(logging.WARNING)  # no per-trial banners
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch, harmless
    cfg = Config.from_dict(config["config"])
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    data = CifarDataModule(cfg)
    data.setup()
    module = LitResNet9.from_config(cfg, data.classes)
    reports = EpochReports(config["session"], config["trial_started"], cfg.trainer.output_dir)
    trainer = pl.Trainer(
        max_epochs=cfg.trainer.epochs,
        accelerator="gpu" if cfg.trainer.accelerator == "gpu" else "cpu",
        devices="auto",
        precision=cfg.trainer.precision,
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[reports],
        logger=pl.loggers.TensorBoardLogger(cfg.trainer.output_dir, name="tensorboard",
                                            default_hp_metric=False),
        enable_checkpointing=False,  # EpochReports checkpoints every epoch
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer = prepare_trainer(trainer)
    # Set when Ray Train restarts a failed worker group, or resumes this run after the search
    # was interrupted: go on from the run's latest checkpoint.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.fit(module, datamodule=data, weights_only=True,
                        ckpt_path=os.path.join(folder, CHECKPOINT_FILE))
    else:
        trainer.fit(module, datamodule=data)


# ---------------------------------------------------------------------------------------------
# What runs for each Tune trial: a Ray Train run with the trial's hyperparameters


def run_trial(params: dict[str, Any], base: dict[str, Any], scaling: dict[str, Any],
              storage: str, max_failures: int) -> None:
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_started = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = Config.from_dict(base)
    cfg.optim.lr = float(params["lr"])
    cfg.optim.weight_decay = float(params["weight_decay"])
    cfg.trainer.batch_size = int(params["batch_size"])
    # The Train run's own folder: its checkpoints, and the workers' TensorBoard logs.
    cfg.trainer.output_dir = str(Path(storage) / f"train-{trial_id}")
    trainer = TorchTrainer(
        train_worker,
        # session: this call of the trial function, as Tune sees it (see EpochReports).
        train_loop_config={"config": cfg.to_dict(), "trial_started": trial_started,
                           "session": uuid.uuid4().hex},
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=storage,
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=max_failures),
            # Keep the best epoch's checkpoint for the retrain; Ray also keeps the latest.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                               checkpoint_score_order="max"),
        ),
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------
# Ray: start or join, with authentication on


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's long connection timeout, on a HOST:PORT nobody serves."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address must be local, auto or HOST:PORT, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}") from None


def configure_auth(address: str) -> None:
    """Token authentication for a local Ray instance, decided before Ray is imported (Ray reads
    these variables once, at import).

    A local instance gets a fresh random token in this process's environment, which Ray's
    processes inherit: it is never printed, and never written into the home directory. A
    token the user already provides (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) is kept. Joining a
    cluster uses the token set up for that cluster, as Ray documents.
    """
    if address != "local":
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def start_ray(settings, temp_dir: Path) -> None:
    """Start a local Ray instance (see configure_auth) or join a cluster."""
    import ray

    # Ray's Lightning callback stages checkpoints under the temp dir: keep them in the run's.
    env = {"TMPDIR": str(temp_dir)}
    if settings.address == "local":
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env}, log_to_driver=True)
        return
    if settings.address != "auto":
        _check_reachable(settings.address)
    try:
        ray.init(address=settings.address, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot join the Ray cluster at '{settings.address}': {first}") from None


LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "overlay", "tmpfs", "apfs"}


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` (its deepest mount point), from /proc/mounts."""
    path, best, kind = path.resolve(), "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        mount = fields[1].replace("\\040", " ")
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind


def search_storage(cfg: SearchConfig, out: Path) -> Path:
    """Where trials write: tune.storage, else the output dir."""
    return Path(cfg.tune.storage).expanduser().resolve() if cfg.tune.storage else out


def plan_resources(cfg: SearchConfig) -> tuple[dict[str, Any], int]:
    """Each trial's ScalingConfig and how many trials run at once.

    A local instance must hold a trial now. A cluster may not yet: its autoscaler adds nodes when
    trials ask for them, so there the search goes on and the trials wait (the GPU count is then
    best given explicitly, `gpus_per_worker: 1`, since "auto" can only see the nodes up now).
    """
    import ray

    t = cfg.tune
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    print(f"ray: {'local instance' if t.address == 'local' else 'cluster ' + t.address}, "
          f"{nodes} node(s), {cpus:g} CPUs, {gpus:g} GPUs")
    gpus_per_worker = (1.0 if gpus else 0.0) if t.gpus_per_worker < 0 else t.gpus_per_worker
    need_cpu, need_gpu = t.workers_per_trial * t.cpus_per_worker, t.workers_per_trial * gpus_per_worker
    fits = int(cpus // need_cpu)
    if need_gpu:
        fits = min(fits, int(gpus // need_gpu))
    if not fits:
        shortfall = (f"a trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs "
                     f"({t.workers_per_trial} workers), but the cluster has {cpus:g} CPUs "
                     f"and {gpus:g} GPUs")
        if t.address == "local":
            raise UserError(shortfall)
        print(f"{shortfall} now: trials wait for the cluster's autoscaler to add nodes")
    concurrent = min(t.max_concurrent or fits or t.num_samples, t.num_samples)
    storage = search_storage(cfg, Path(cfg.trainer.output_dir))
    if nodes > 1 and (kind := filesystem_type(storage)) in LOCAL_FILESYSTEMS:
        print(f"warning: results go to {storage}, on a local disk ({kind}): nodes on other "
              "machines cannot write there; put the output dir (or tune.storage) on storage "
              "every node mounts (NFS, EFS)")
    scaling = {"num_workers": t.workers_per_trial, "use_gpu": gpus_per_worker > 0,
               "resources_per_worker": {"CPU": t.cpus_per_worker, "GPU": gpus_per_worker}}
    return scaling, max(1, concurrent)


# ---------------------------------------------------------------------------------------------
# The search


@contextlib.contextmanager
def ctrl_c_stops_tune() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) during the search: the first one asks Tune to stop gracefully (save its
    state, stop the trials, return), through Tune's own SIGUSR1 handler; a second one aborts.
    Tune's SIGINT handler is turned off so that the event yielded here tells afterwards
    whether the search was interrupted: neither the trials' statuses nor their last results
    tell that reliably."""
    interrupted = threading.Event()

    def on_sigint(sig, frame) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        print("\nstopping the search (Ctrl-C again to abort) ...", flush=True)
        interrupted.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGINT, on_sigint)
    # Until Tune installs its SIGUSR1 handler, SIGUSR1 must not kill the process.
    previous_usr1 = signal.signal(signal.SIGUSR1, lambda sig, frame: None)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGUSR1, previous_usr1)


def trial_base_config(cfg: SearchConfig, use_gpu: bool) -> dict[str, Any]:
    """The training config every trial starts from (the trial adds lr / wd / batch size)."""
    base = cfg.training_config()
    base.data.num_workers = max(0, cfg.tune.cpus_per_worker - 1)  # the worker's own CPU trains
    base.trainer.accelerator = "gpu" if use_gpu else "cpu"
    base.trainer.precision = precision(base)  # resolved here: workers see their own devices
    base.trainer.progress_bar = False
    return base.to_dict()


def run_search(cfg: SearchConfig, out: Path, resume: bool, concurrent: int,
               scaling: dict[str, Any]):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s, t = cfg.search, cfg.tune
    storage = search_storage(cfg, out)
    trainable = tune.with_parameters(
        run_trial, base=trial_base_config(cfg, scaling["use_gpu"]),
        scaling=scaling, storage=str(storage / "train_runs"), max_failures=t.max_failures)
    # The trial function and its Ray Train controller only wait on the Train workers, which
    # reserve the real resources. They hold no CPU and live on the head node: losing a worker
    # node then costs only the workers on it, which Ray Train restarts from the last checkpoint.
    # (Concurrency is bounded by max_concurrent_trials.)
    trainable = tune.with_resources(trainable, {"CPU": 0, HEAD_NODE: 0.001})
    experiment = storage / t.name
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise UserError(f"--resume: no search to resume in {experiment}")
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        space = {"lr": tune.loguniform(*s.lr), "weight_decay": tune.loguniform(*s.weight_decay),
                 "batch_size": tune.choice(s.batch_size)}
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=t.num_samples,
                max_concurrent_trials=concurrent,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.trainer.epochs,
                                        grace_period=t.grace_period,
                                        reduction_factor=t.reduction_factor),
                search_alg=BasicVariantGenerator(random_state=t.search_seed)),
            run_config=tune.RunConfig(
                name=t.name, storage_path=str(storage),
                # A trial whose own process dies (its node lost) is started again; its Ray
                # Train run then goes on from the run's latest checkpoint in storage.
                failure_config=tune.FailureConfig(max_failures=t.max_failures),
                # Tune saves its experiment state (which trials finished) every ~10 s, but
                # copies it to storage only every sync_period (default 300 s): a killed driver
                # would resume from a state minutes old and run finished trials again.
                sync_config=tune.SyncConfig(sync_period=10)),
        )
    return tuner.fit()


def summarise_trials(grid, max_t: int) -> list[dict[str, Any]]:
    """One row per trial, with its best validation accuracy and the checkpoint of that epoch."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        best_acc, best_ckpt = None, None
        if history is not None and METRIC in history:
            scored = history.dropna(subset=[METRIC]).sort_values(METRIC, ascending=False,
                                                                 kind="stable")
            if len(scored):
                best_acc = float(scored[METRIC].iloc[0])
                # Ray keeps the best-scoring checkpoint, but among equal scores it may have
                # kept a later epoch's: take the best epoch whose checkpoint is still there.
                kept = [p for p in scored.get(CHECKPOINT_PATH, []) if isinstance(p, str)
                        and (Path(p) / CHECKPOINT_FILE).is_file()]
                best_ckpt = kept[0] if kept else None
        startup = None  # from the first report (a restarted worker group measures its own)
        if history is not None and STARTUP in history and history[STARTUP].notna().any():
            startup = round(float(history[STARTUP].dropna().iloc[0]), 2)
        epochs = int(result.metrics.get("training_iteration", 0)) if result.metrics else 0
        status = "error" if result.error else ("completed" if epochs >= max_t else "stopped early")
        rows.append({
            "trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name,
            "lr": result.config.get("lr"), "weight_decay": result.config.get("weight_decay"),
            "batch_size": result.config.get("batch_size"), "epochs": epochs,
            "best_val_acc": best_acc, "status": status, "checkpoint": best_ckpt,
            "startup_s": startup,
        })
    return rows


def write_trials_csv(rows: list[dict[str, Any]], target: Path) -> None:
    buffer = io.StringIO()
    fields = ["trial_id", "lr", "weight_decay", "batch_size", "epochs", "best_val_acc", "status",
              "startup_s"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(target, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# After the search: retrain the best configuration, test it, explain its mistakes


def retrain_and_analyse(cfg: SearchConfig, best: dict[str, Any], out: Path) -> dict[str, Any]:
    """Runs on a Ray worker with one trial worker's resources (a GPU node on a cluster)."""
    from cifar_ray import gradcam, train

    final = cfg.training_config()
    final.optim.lr, final.optim.weight_decay = best["lr"], best["weight_decay"]
    final.trainer.batch_size = best["batch_size"]
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
    results = train.run(final, init_checkpoint=init, overwrite=True)
    report = gradcam.analyse(results["checkpoint"], final.data.data_dir, out / "gradcam",
                             split="test")
    return {"retrain": results, "gradcam": report}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Search lr / weight decay / batch size with Ray Tune + ASHA, retrain the "
                    "best on the full training set, test it and explain its mistakes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(parser, SearchConfig())
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted search in the same output dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a search already in the output dir and start again")
    return parser


def check_output_dir(out: Path, cfg: SearchConfig, resume: bool, overwrite: bool) -> None:
    experiment = out / cfg.tune.name
    if overwrite:
        for path in (experiment, out / "train_runs", out / "results.json"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return
    if resume:
        return
    if (out / "results.json").exists():
        raise UserError(f"{out} already holds a finished search (results.json); "
                        "pass --overwrite to start again or choose another --output-dir")
    if experiment.exists():
        raise UserError(f"{out} holds an interrupted search ({experiment.name}/); "
                        "pass --resume to continue it or --overwrite to start again")


def summary_markdown(results: dict[str, Any]) -> str:
    best = results["best_config"]
    return f"""# Search summary

- trials: {results['num_trials']} ({results['trials_stopped_early']} stopped early by ASHA)
- best configuration: lr = {best['lr']:.3g}, weight decay = {best['weight_decay']:.3g}, batch size = {best['batch_size']}
- best validation accuracy during the search: {results['best_val_acc']:.4f}
- retrained for {results['retrain_epochs']} epochs on train + validation (init: {results['retrain_init']})
- **test accuracy: {results['test_acc']:.4f}** (test loss {results['test_loss']:.4f})
- search time: {results['search_seconds']:.0f} s, total: {results['total_seconds']:.0f} s

Files: `trials.csv`, `retrain/` (checkpoint `{Path(results['checkpoint']).name}`, TensorBoard
logs, `curves.png`), `gradcam/index.html` (misclassified images and their GradCAMs).
"""


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(SearchConfig(), args)
    if cfg.trainer.output_dir == "outputs/train":
        cfg.trainer.output_dir = "outputs/search"
    out = Path(cfg.trainer.output_dir).expanduser().resolve()
    cfg.trainer.output_dir = str(out)
    check_output_dir(out, cfg, args.resume, args.overwrite)
    start = time.perf_counter()

    # Prepare (download / validate) the data set once, before any trial starts.
    data_dir = Path(cfg.data.data_dir).expanduser().resolve()
    read_cifar(ensure_dataset(data_dir, cfg.data.dataset), cfg.data.dataset)
    cfg.data.data_dir = str(data_dir)  # absolute: Ray changes each trial's working directory

    configure_auth(cfg.tune.address)
    import ray

    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    start_ray(cfg.tune, tmp)
    try:
        scaling, concurrent = plan_resources(cfg)
        print(f"search: {cfg.tune.num_samples} trials, {concurrent} at a time, "
              f"{cfg.tune.workers_per_trial} worker(s) each; ASHA max_t={cfg.trainer.epochs} "
              f"grace={cfg.tune.grace_period} reduction={cfg.tune.reduction_factor}")
        with ctrl_c_stops_tune() as interrupted:
            grid = run_search(cfg, out, args.resume, concurrent, scaling)
        if interrupted.is_set():
            raise Interrupted(f"search interrupted; its state is saved in {out / cfg.tune.name}: "
                              f"run the same command with --resume to continue")
        search_seconds = time.perf_counter() - start
        rows = summarise_trials(grid, cfg.trainer.epochs)
        write_trials_csv(rows, out / "trials.csv")
        scored = [r for r in rows if r["best_val_acc"] is not None]
        if not scored:
            raise UserError(f"no trial reported {METRIC}; see the errors in {out / cfg.tune.name}")
        best = max(scored, key=lambda r: r["best_val_acc"])
        print(f"best trial {best['trial_id']}: val_acc={best['best_val_acc']:.4f} lr={best['lr']:.3g} "
              f"weight_decay={best['weight_decay']:.3g} batch_size={best['batch_size']}; "
              f"retraining for {cfg.retrain.retrain_epochs} epochs on train + validation")
        finish = ray.remote(retrain_and_analyse).options(
            num_cpus=cfg.tune.cpus_per_worker,
            num_gpus=1 if scaling["use_gpu"] else 0)
        try:
            final = ray.get(finish.remote(cfg, best, out))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):  # one line for the user, not Ray's traceback
                raise exc.cause from None
            raise
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    retrain, report = final["retrain"], final["gradcam"]
    results = {
        "best_config": {k: best[k] for k in ("lr", "weight_decay", "batch_size")},
        "best_val_acc": best["best_val_acc"],
        "best_trial": best["trial_id"],
        "num_trials": len(rows),
        "trials_stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "test_acc": retrain["test_acc"],
        "test_loss": retrain["test_loss"],
        "per_class_acc": retrain["per_class_acc"],
        "checkpoint": retrain["checkpoint"],
        "gradcam_dir": report["output_dir"],
        "retrain_epochs": cfg.retrain.retrain_epochs,
        "retrain_init": cfg.retrain.init,
        "search_seconds": round(search_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "trials_csv": str(out / "trials.csv"),
        "experiment_dir": str(out / cfg.tune.name),
        "config": cfg.to_dict(),
    }
    write_json(out / "results.json", results)
    write_text(out / "summary.md", summary_markdown(results))
    print(f"\ndone: best lr={best['lr']:.3g} weight_decay={best['weight_decay']:.3g} "
          f"batch_size={best['batch_size']} (val_acc {best['best_val_acc']:.4f}); "
          f"test_acc={results['test_acc']:.4f}\n"
          f"  results: {out / 'results.json'}\n  summary: {out / 'summary.md'}\n"
          f"  model:   {results['checkpoint']}\n  gradcam: {Path(report['output_dir']) / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
