"""What runs inside one search trial: the trial function Tune calls, which runs a Ray Train
`TorchTrainer`, and the training loop on each of its workers.

    Tune --(sample: {"optim.lr": 0.003, ...})--> run_trial          (the trial's process)
        config.overlay(base, sample) -> a training Config -> TorchTrainer(train_worker)
    train_worker (each Ray Train worker): CifarDataModule + LitResNet9 + a Lightning Trainer
        with Ray's DDP strategy; EpochReports reports every epoch (metrics + checkpoint) to
        Ray Train, whose TuneReportCallback hands it to Tune and ASHA.

A run's folder is `train_runs/train-<trial id>/` under the search's storage: `epoch_NNNN/`
checkpoints (each holds `checkpoint.ckpt`, a Lightning checkpoint) and the workers' TensorBoard
logs.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from cifar_ray.config import Config, overlay
from cifar_ray.pl import pl
from cifar_ray.runtime import build_trainer

METRIC = "val/acc"  # what ASHA and the choice of the best trial go by
STARTUP = "time/startup_s"  # see EpochReports
CHECKPOINT_FILE = "checkpoint.ckpt"  # the Lightning checkpoint inside each Ray checkpoint
CHECKPOINT_PATH = "checkpoint_path"  # the key of a report's checkpoint (as Ray's Tune callback)


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
    # The device was resolved by the driver (this worker was given a GPU or not); Ray's
    # strategy and environment place each rank on its own.
    trainer = build_trainer(
        cfg.trainer.device, cfg.trainer.precision, devices="auto",
        max_epochs=cfg.trainer.epochs,
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[reports],  # it checkpoints every epoch
        logger=pl.loggers.TensorBoardLogger(cfg.trainer.output_dir, name="tensorboard",
                                            default_hp_metric=False),
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


def run_trial(sample: dict[str, Any], base: dict[str, Any], scaling: dict[str, Any],
              storage: str, max_failures: int) -> None:
    """The trial function: `sample` is Tune's draw from the search space, in config keys."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_started = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = overlay(Config.from_dict(base), sample)
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
