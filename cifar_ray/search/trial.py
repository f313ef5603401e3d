"""What runs inside one search trial: the trial function Tune calls, which runs a Ray Train
trainer whose workers run `worker.train` (the Lightning loop).

    Tune --(sample: {"optim.lr": 0.003, ...})--> run_trial          (the trial's process)
        config.overlay(base, sample) -> a training Config -> Ray Train run of train_worker
    train_worker -> worker.train (each Ray Train worker): CifarDataModule + LitResNet9 + a
        Lightning Trainer; EpochReports reports every epoch (metrics + checkpoint) to Ray
        Train, whose TuneReportCallback hands it to Tune and ASHA.

One worker per trial (the default): Ray Train's plain DataParallelTrainer, and the worker
trains on its device alone. Several: a TorchTrainer, whose torch process group Lightning's
DDP strategy (Ray's) trains over. A one-worker trial needs no process group and no DDP, and
its trial process and controller then never import torch: 2-4 s less start-up per trial on
the 2-core VM (docs/benchmarks.md), and on a GPU no NCCL set-up and no DDP work per step.

This module is imported by the trial's process and by Ray Train's controller, neither of which
trains: it imports neither torch nor Lightning (seconds per process, paid by every trial
before its first step); the worker imports them when it starts (`worker.py`).

A run's folder is `train_runs/train-<trial id>/` under the search's storage: `epoch_NNNN_<session>/`
checkpoints (each holds `checkpoint.ckpt`, a Lightning checkpoint) and the workers' TensorBoard
logs.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from cifar_ray.config import Config, overlay
from cifar_ray.errors import full_disk
from cifar_ray.names import METRIC

# How often Ray Train's controller polls the trial's workers (seconds). A worker's report waits
# in a queue of one until the next poll, so Tune and ASHA got at most one epoch every 2 s (Ray's
# default), however fast the epochs: 8 epochs of 0.5 s, trained in 4.2 s, reached Tune over
# 15.7 s (docs/benchmarks.md), and a GPU epoch of CIFAR-10 takes about half a second. A poll
# is a small call to each worker. Ray's own environment variable, so a value set by the user wins.
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def train_worker(config: dict[str, Any]) -> None:
    """One trial's training on one Ray Train worker (rank 0 of 1, or one rank of a DDP group)."""
    entered = time.time()
    from cifar_ray.search import worker

    worker.train(config, entered)


def run_trial(sample: dict[str, Any], base: dict[str, Any], scaling: dict[str, Any],
              storage: str, max_failures: int, data: list | None = None) -> None:
    """The trial function: `sample` is Tune's draw from the search space, in config keys;
    `data`, when given, is [an object reference to the search's ImageArrays] (in a list, so
    that Ray hands the reference on rather than the arrays)."""
    trial_started = time.time()
    import ray.tune
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        WorkerGroupError,
    )
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer_class = DataParallelTrainer  # one worker: no process group (see the top)
    if scaling["num_workers"] > 1:
        from ray.train.torch import TorchTrainer as trainer_class  # imports torch

    # Read here by the trainer, which passes it on to its controller and workers.
    os.environ.setdefault(POLL_ENV, POLL_S)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = overlay(Config.from_dict(base), sample)
    # The Train run's own folder: its checkpoints, and the workers' TensorBoard logs.
    cfg.trainer.output_dir = str(Path(storage) / f"train-{trial_id}")
    trainer = trainer_class(
        train_worker,
        # session: this call of the trial function, as Tune sees it (see worker.EpochReports).
        train_loop_config={"config": cfg.to_dict(), "sample": sample, "data": data,
                           "session": uuid.uuid4().hex,
                           "trial_started": trial_started, "launched": time.time()},
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
    try:
        trainer.fit()
    except WorkerGroupError as exc:
        # A full disk: Tune gets the DiskFull itself, on which the search stops (retrying
        # fails the same way; progress.SearchConsole), not Ray Train's report of it.
        full = next(filter(None, map(full_disk, exc.worker_failures.values())), None)
        if full is None:
            raise
        raise full from None
