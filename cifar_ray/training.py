"""One training run as a function, `run(cfg)`: fit with validation each epoch, test the best
checkpoint once, write the outputs (train.py lists them). The search's retrain calls it too."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

from cifar_ray.config import Config
from cifar_ray.console import format_duration
from cifar_ray.data.arrays import ImageArrays
from cifar_ray.data.datamodule import CifarDataModule
from cifar_ray.files import write_json
from cifar_ray.module import LitResNet9, averaging, check_resumable, load_module
from cifar_ray.names import METRIC, MODE
from cifar_ray.output_dir import resume_point
from cifar_ray.pl import pl
from cifar_ray.plots import plot_curves
from cifar_ray.runtime import build_trainer, device_name, resolve_device
from cifar_ray.tracking import tensorboard_hparams

# We size DataLoader workers deliberately (see CifarDataModule.num_workers).
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# The TensorBoard logger creates the output dir first; checkpoints beside the logs are intended.
warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")


class EpochHistory(pl.Callback):
    """Keeps each epoch's logged train/val metrics, for curves.png and results.json."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.first_epoch = 0  # > 0 when this session resumed a run

    # Saved in every checkpoint, so a resumed run keeps the epochs it ran before.
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.first_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Lightning runs validation before this hook, so both stages' metrics are here.
        row = {"epoch": trainer.current_epoch + 1}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("train/", "val/")):
                row[key] = float(value)
        self.rows.append(row)


class EpochLines(pl.Callback):
    """One line per epoch when there is no progress bar: metrics and time left. `prefix`:
    CONSOLE_MARK + 'retrain ' in a search, so the line reaches its console from a Ray worker."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.started, self.first_epoch = 0.0, 0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started, self.first_epoch = time.perf_counter(), trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        per_epoch = (time.perf_counter() - self.started) / (done - self.first_epoch)
        metrics = " ".join(f"{key}={float(value):.4f}" for key, value
                           in sorted(trainer.callback_metrics.items())
                           if key.startswith(("train/", "val/")))
        print(f"{self.prefix}epoch {done}/{trainer.max_epochs}: {metrics}; {per_epoch:.1f} s/epoch, "
              f"about {format_duration(per_epoch * (trainer.max_epochs - done))} left", flush=True)


def run(cfg: Config, arrays: ImageArrays | None = None, init_checkpoint: str | Path | None = None,
        overwrite: bool = False, resume: bool = False, hparams: dict[str, Any] | None = None,
        mlflow=None, line_prefix: str = "", metric: str = METRIC) -> dict[str, Any]:
    """Train, test the best checkpoint, write the outputs; return the results. `hparams`: for
    TensorBoard's HParams tab; `mlflow`: an MLflow logger; `line_prefix`: see EpochLines;
    `metric`: what the best checkpoint goes by (names.METRICS)."""
    out = Path(cfg.trainer.output_dir).expanduser().resolve()
    resume_from = resume_point(out, overwrite, resume)
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    data = CifarDataModule(cfg, arrays)
    if arrays is None:
        data.prepare_data()
    data.setup()
    module = LitResNet9.from_config(cfg, data.classes, data.norm)
    if resume_from is not None:
        check_resumable(resume_from, cfg, data.classes, metric)
    if init_checkpoint is not None:  # the best trial's: the same network, through every gate
        module.load_state_dict(load_module(init_checkpoint).state_dict())
    trainer, best_checkpoint, history = build(cfg, data, out, hparams, mlflow, line_prefix, metric)
    start = time.perf_counter()
    # weights_only: resuming reads tensors and plain values only, like every load here.
    trainer.fit(module, datamodule=data, ckpt_path=resume_from, weights_only=True)
    train_seconds = time.perf_counter() - start
    results = test_best(cfg, data, trainer, out / "best.ckpt", history, train_seconds)
    score = best_checkpoint.best_model_score
    results["val_score"] = float(score) if len(data.val_set) and score is not None else None
    results["metric"] = metric
    results["mlflow_run_id"] = mlflow.run_id if mlflow else None
    plot_curves(history.rows, out / "curves.png")
    write_json(out / "results.json", results)
    return results


def build(cfg: Config, data: CifarDataModule, out: Path, hparams: dict[str, Any] | None,
          mlflow, line_prefix: str, metric: str = METRIC) -> tuple[pl.Trainer, pl.callbacks.ModelCheckpoint,
                                              EpochHistory]:
    """The Trainer with its checkpoints, logs and callbacks (see `run` for the arguments)."""
    has_val = len(data.val_set) > 0
    # best.ckpt: the best `metric` (without validation, the latest epoch); last.ckpt: every
    # epoch, for --resume (Lightning's `save_last` writes it only in a best epoch).
    best = pl.callbacks.ModelCheckpoint(
        dirpath=out, filename="best", monitor=metric if has_val else "epoch", mode=MODE,
        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    last = pl.callbacks.ModelCheckpoint(dirpath=out, filename="last", save_top_k=1,
                                        enable_version_counter=False)
    history = EpochHistory()
    batches = math.ceil(data.train_images_per_epoch() / cfg.trainer.batch_size)
    tensorboard = pl.loggers.TensorBoardLogger(out, name="tensorboard", version="",
                                               default_hp_metric=False)
    if hparams:
        tensorboard_hparams(tensorboard, hparams)
    trainer = build_trainer(
        resolve_device(cfg.trainer.device), cfg.trainer.precision, write_behind=True,
        devices=cfg.trainer.devices,
        max_epochs=cfg.trainer.epochs,
        logger=[tensorboard, mlflow] if mlflow else tensorboard,
        callbacks=[best, last, history, pl.callbacks.LearningRateMonitor("step"), *averaging(cfg),
                   *([] if cfg.trainer.progress_bar else [EpochLines(line_prefix)])],
        enable_checkpointing=True,
        limit_val_batches=1.0 if has_val else 0,
        log_every_n_steps=max(1, min(50, batches)),
        enable_progress_bar=cfg.trainer.progress_bar,
    )
    return trainer, best, history


def test_best(cfg: Config, data: CifarDataModule, trainer: pl.Trainer, best_path: Path,
              history: EpochHistory, train_seconds: float) -> dict[str, Any]:
    """The best checkpoint, read back safely and tested once: the results' numbers."""
    best = load_module(best_path)
    tested = trainer.test(best, datamodule=data, verbose=False)[0]
    images_seen = data.train_images_per_epoch() * (trainer.current_epoch - history.first_epoch)
    return {
        "test_acc": tested["test/acc"],
        "test_loss": tested["test/loss"],
        "test_balanced_acc": tested["test/balanced_acc"],
        "test_f1": tested["test/f1"],
        "val_score": None,
        "per_class_acc": best.test_report["per_class_acc"],
        "per_class": best.test_report["per_class"],
        "confusion_matrix": best.test_report["confusion_matrix"],
        "classes": data.classes,
        "epochs": trainer.current_epoch,
        "train_images": len(data.train_set),
        "train_seconds": round(train_seconds, 2),
        "train_images_per_second": round(images_seen / train_seconds, 1),
        "device": device_name(resolve_device(cfg.trainer.device)),
        "checkpoint": str(best_path),
        "history": history.rows,
        "mlflow_run_id": None,
        "config": cfg.to_dict(),
    }
