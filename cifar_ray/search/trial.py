"""One search trial: the function Tune calls with its sample, which runs a Ray Train trainer
whose workers run `worker.train`. One worker (the default) trains alone on its device, with no
process group; several train with DDP over a TorchTrainer's. Imported by the trial's process
and by Ray Train's controller, which do not train: no torch, no Lightning here."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from cifar_ray.errors import full_disk
from cifar_ray.names import METRIC, MODE

# How often Ray Train's controller polls the workers: a report waits for the next poll, and
# Ray's default poll held back short epochs (docs/benchmarks.md). A user's value wins.
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def train_worker(config: dict[str, Any]) -> None:
    """One trial's training on one Ray Train worker (rank 0 of 1, or one rank of a DDP group)."""
    entered = time.time()
    from cifar_ray.search import worker

    worker.train(config, entered)


def run_trial(sample: dict[str, Any], base: dict[str, Any], scaling: dict[str, Any],
              storage: str, max_failures: int, data: list | None = None,
              metric: str = METRIC, costs: bool = False,
              latency_batch: int | None = None, latency_table: dict | None = None) -> None:
    """The trial function: `sample` is Tune's draw from the search space, in config keys;
    `data`: [an object reference to the search's ImageArrays] (a list: Ray passes it on);
    `metric`: tune.metric, by which its best checkpoint is kept; `costs`: measure what the
    model costs (footprint.measure), its latency too at batch 1 and `latency_batch`, or from
    `latency_table` (objectives.LatencyTable's)."""
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
    trainer = trainer_class(
        train_worker,
        # The sample as Tune drew it; each worker lays it over `base`. session: this call
        # of the trial function (see worker.EpochReports).
        train_loop_config={"base": base, "sample": sample, "data": data,
                           "output_dir": str(Path(storage) / f"train-{trial_id}"),
                           "session": uuid.uuid4().hex, "costs": costs,
                           "latency_batch": latency_batch, "latency_table": latency_table,
                           "trial_started": trial_started, "launched": time.time()},
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=storage,
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=max_failures),
            # Keep the best epoch's checkpoint for the retrain; Ray also keeps the latest.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                               checkpoint_score_order=MODE),
        ),
    )
    try:
        trainer.fit()
    except WorkerGroupError as exc:
        # A full disk: Tune gets the DiskFull itself, on which the search stops.
        full = next(filter(None, map(full_disk, exc.worker_failures.values())), None)
        if full is None:
            raise
        raise full from None
