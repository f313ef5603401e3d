"""Inside one Ray Train worker of a search trial: the Lightning run, and every epoch's
metrics and checkpoint reported to Ray Train (and so to Tune and ASHA)."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import ray.train
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

from cifar_ray import footprint
from cifar_ray.config import Config, flat, overlay, plain
from cifar_ray.console import CONSOLE_MARK
from cifar_ray.data.datamodule import CifarDataModule
from cifar_ray.errors import CheckpointError
from cifar_ray.module import LitResNet9, averaging, load_module
from cifar_ray.names import (
    CHECKPOINT_FILE,
    CHECKPOINT_PATH,
    FIRST_STEP_AT,
    REPORTED_AT,
    STARTUP,
)
from cifar_ray.pl import pl
from cifar_ray.runtime import SnapshotCheckpointIO, build_trainer
from cifar_ray.search.objectives import LatencyTable
from cifar_ray.tracking import tensorboard_hparams


class EpochReports(pl.Callback):
    """Reports each epoch's metrics and checkpoint to Ray Train, keeping every report in the
    checkpoint with the Tune session that got it (docs/internals.md, "Resuming"), and the
    trial's start-up phase by phase, from `marks` (each phase's end)."""

    def __init__(self, session: str, run_dir: str, marks: dict[str, float],
                 io: SnapshotCheckpointIO, footprint: dict[str, float] | None = None):
        self.session, self.run_dir, self.marks, self.io = session, run_dir, marks, io
        self.footprint = footprint or {}  # what the model costs (footprint.measure)
        self.startup: dict[str, float] = {}
        self.first_step_at: float | None = None
        self.reports: list[dict[str, Any]] = []  # {"session": ..., "metrics": {...}} per epoch

    def state_dict(self) -> dict[str, Any]:
        return {"reports": self.reports}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reports = [dict(report) for report in state["reports"]]

    def on_fit_start(self, trainer, pl_module) -> None:
        # Called after Lightning restores callback state, even with no epoch left to train.
        self.marks["lightning"] = time.time()
        if any(report["session"] == self.session for report in self.reports):
            trial = Path(self.run_dir).name.removeprefix("train-")
            print(f"{CONSOLE_MARK}trial {trial}: its worker failed; Ray Train restarted it from "
                  f"its checkpoint of epoch {len(self.reports)}", flush=True)
        for report in self.reports:
            if report["session"] != self.session:
                report["session"] = self.session
                ray.train.report(report["metrics"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_step_at is None:
            self.first_step_at = self.marks["first_step"] = time.time()
            times = list(self.marks.values())  # trial start, then each phase's end
            self.startup = {f"time/{phase}_s": round(end - start, 3)
                            for phase, start, end in zip(list(self.marks)[1:], times, times[1:])}
            self.startup[STARTUP] = round(times[-1] - times[0], 2)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Unique to this session: an epoch trained again (after a damaged checkpoint) must not
        # share a name with the old one, which Ray Train would evict and delete.
        name = f"epoch_{trainer.current_epoch:04d}_{self.session[:8]}"
        folder = Path(self.run_dir) / name
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        metrics.update({"epoch": trainer.current_epoch, "step": trainer.global_step,
                        **self.footprint, **self.startup, FIRST_STEP_AT: self.first_step_at,
                        REPORTED_AT: time.time(), CHECKPOINT_PATH: str(folder)})
        self.reports.append({"session": self.session, "metrics": metrics})  # saved with it
        # Rank 0 snapshots the state; Ray Train's checkpoint thread writes it in place while
        # the next epoch trains (runtime.SnapshotCheckpointIO; docs/benchmarks.md).
        path = folder / CHECKPOINT_FILE
        trainer.save_checkpoint(path, weights_only=False)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if trainer.is_global_zero else None

        def write(written: ray.train.Checkpoint, _name: str) -> ray.train.Checkpoint:
            self.io.write(path)  # Ray Train's checkpoint thread: where `written` points
            return written
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=write,
                         # The "local" checkpoint is the written one: ASYNC would delete it.
                         delete_local_checkpoint_after_upload=False)


def process_started(launched: float) -> float:
    """When this worker process started, or `launched` if Ray had started it before the trial
    asked for it (an idle worker taken from Ray's pool)."""
    return max(launched, psutil.Process().create_time())


def train(config: dict[str, Any], entered: float) -> None:
    """The Lightning run of one Ray Train worker; `config` is trial.run_trial's loop config,
    `entered` when the training function started (before it imported this module)."""
    marks = {"start": config["trial_started"], "trial": config["launched"],
             "controller": process_started(config["launched"]), "worker": entered,
             "imports": time.time()}
    logging.getLogger(pl.__name__).setLevel(logging.WARNING)  # no per-trial banners
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch, harmless
    cfg = overlay(Config.from_dict(config["base"]), config["sample"])
    cfg.trainer.output_dir = config["output_dir"]
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    # The driver's arrays from Ray's object store (zero-copy), else this worker reads them.
    arrays = ray.get(config["data"][0]) if config.get("data") else None
    data = CifarDataModule(cfg, arrays)
    data.setup()
    marks["data"] = time.time()
    module = LitResNet9.from_config(cfg, data.classes, data.norm)
    # With several objectives, what the model costs: its shape decides it, not its weights, so
    # it is measured once, before training, and goes with every report (multi-objective ASHA).
    cost = {}  # rank 0's: Ray keeps its reports
    if config.get("costs") and ray.train.get_context().get_world_rank() == 0:
        table = config.get("latency_table")
        cost = footprint.measure(module, None if table else config.get("latency_batch"))
        if table:  # measured on the device it will run on, for this shape
            cost.update(LatencyTable.from_dict(table).lookup(flat(cfg)) or {})
    marks["footprint"] = time.time()
    io = SnapshotCheckpointIO()
    reports = EpochReports(config["session"], cfg.trainer.output_dir, marks, io, cost)
    logger = pl.loggers.TensorBoardLogger(cfg.trainer.output_dir, name="tensorboard",
                                          default_hp_metric=False)
    # Rank 0 alone: the HParams dashboard lists the trial, not each of its workers.
    if ray.train.get_context().get_world_rank() == 0:
        tensorboard_hparams(logger, {key: plain(value) for key, value in config["sample"].items()})
    # The driver resolved the device (Ray shows this process its own GPU, if any). Several
    # workers train with Ray's DDP strategy over TorchTrainer's process group; one, without.
    several = ray.train.get_context().get_world_size() > 1
    trainer = build_trainer(
        cfg.trainer.device, cfg.trainer.precision, devices="auto" if several else 1,
        max_epochs=cfg.trainer.epochs,
        callbacks=[reports, *averaging(cfg)],  # it checkpoints every epoch
        logger=logger,
        log_every_n_steps=1,
        plugins=[io, *([RayLightningEnvironment()] if several else [])],
        **({"strategy": RayDDPStrategy()} if several else {}),
    )
    if several:
        trainer = prepare_trainer(trainer)
    # A restarted worker group, or a resumed search: go on from the run's latest checkpoint.
    checkpoint = ray.train.get_checkpoint()
    start = None
    if checkpoint:
        start = usable_checkpoint(Path(checkpoint.path) / CHECKPOINT_FILE)
    trainer.fit(module, datamodule=data, weights_only=True,
                ckpt_path=str(start) if start else None)


def readable(path: Path) -> str | None:
    """None if `path` loads as a checkpoint, else why not."""
    if not path.is_file():
        return "missing"
    try:
        load_module(path)
    except CheckpointError as exc:
        return f"unreadable: {str(exc).removeprefix(f'{path}: ')[:200]}"
    return None


def usable_checkpoint(latest: Path) -> Path | None:
    """The checkpoint to go on from: Ray Train's latest, or, when that one was damaged or
    deleted (say, while the search was down), the newest earlier one of the run that loads;
    None: start the trial over. A fallback is one line on the search's console."""
    why = readable(latest)
    if why is None:
        return latest
    run_dir = latest.parent.parent
    earlier = sorted((p / CHECKPOINT_FILE for p in run_dir.glob("epoch_*")
                      if p.name < latest.parent.name), reverse=True)
    start = next((p for p in earlier if readable(p) is None), None)
    then = f"going on from {start.parent.name}" if start else "starting the trial over"
    trial = run_dir.name.removeprefix("train-")  # trial.run_trial names the run after its trial
    print(f"{CONSOLE_MARK}warning: trial {trial}: its checkpoint {latest} is {why}; {then}",
          flush=True)
    return start
