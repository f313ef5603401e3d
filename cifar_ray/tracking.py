"""Where runs are tracked besides their files: TensorBoard's HParams tab (every trial and the
retrain, side by side) and MLflow (`tracking.mlflow_uri`: a run per trial, the retrain a run
with the checkpoint and report.html). Credentials reach MLflow only through its environment
variables: `take_credentials` moves a URI's user and password there before anything can
pickle or print it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cifar_ray.errors import UserError

# The metrics the HParams dashboard shows for each run: the tags Lightning logs them under.
HPARAM_METRICS = ("val/acc", "val/balanced_acc", "val/f1", "val/loss", "train/acc", "train/loss",
                  "test/acc")
INSTALL_MLFLOW = "tracking.mlflow_uri needs MLflow: pip install 'cifar_ray[mlflow]'"


def tensorboard_hparams(logger, params: dict[str, Any]) -> None:
    """Writes `params` ({"optim.lr": 0.003, ...}) as this TensorBoard run's hyperparameters,
    with the metrics' names only (Lightning's own would log a false point at step 0)."""
    from torch.utils.tensorboard.summary import hparams

    writer = logger.experiment.file_writer  # made when the SummaryWriter is
    for summary in hparams(params, {name: 0.0 for name in HPARAM_METRICS}):
        writer.add_summary(summary)
    writer.flush()


CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def take_credentials(settings, local_ray: bool) -> None:
    """Moves a user and password out of `settings.mlflow_uri` into MLflow's environment
    variables (which a local Ray inherits; a cluster's nodes do not: one line)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(settings.mlflow_uri)
    if parts.username is None and parts.password is None:
        return
    if not local_ray:
        raise UserError(f"tracking.mlflow_uri: credentials in the URI do not reach a cluster's "
                        f"nodes; set {CREDENTIAL_ENV[0]} and {CREDENTIAL_ENV[1]} (or "
                        "MLFLOW_TRACKING_TOKEN) on every node, and give the URI without them")
    from urllib.parse import unquote

    os.environ[CREDENTIAL_ENV[0]] = unquote(parts.username or "")
    os.environ[CREDENTIAL_ENV[1]] = unquote(parts.password or "")
    settings.mlflow_uri = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    print(f"tracking: the credentials in the MLflow URI go to MLflow through {CREDENTIAL_ENV[0]} "
          f"and {CREDENTIAL_ENV[1]} (set those yourself to keep them out of the command line)",
          flush=True)


def redacted(uri: str) -> str:
    """The URI with any password in it replaced by ***, for files and the console."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.password:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_MLFLOW) from None


def prepare_experiment(settings) -> None:
    """Creates the MLflow experiment if it is new; any failure is one line. A local
    `sqlite:///path.db` store keeps its artifacts beside the database, in `mlruns/`."""
    require_mlflow()
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=settings.mlflow_uri)
        if client.get_experiment_by_name(settings.mlflow_experiment) is not None:
            return
        location = None
        if settings.mlflow_uri.startswith("sqlite:///"):
            database = Path(settings.mlflow_uri[len("sqlite:///"):]).expanduser().resolve()
            location = (database.parent / "mlruns").as_uri()
        client.create_experiment(settings.mlflow_experiment, artifact_location=location)
    except Exception as exc:  # MLflow's own, requests', SQLAlchemy's: the first line is enough
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"tracking.mlflow_uri {redacted(settings.mlflow_uri)}: MLflow cannot "
                        f"use it ({type(exc).__name__}: {first})") from None


def tune_callbacks(settings) -> list:
    """Tune's loggers for the search: JSON and CSV results, and an MLflow run per trial when
    MLflow is on (no TensorBoard logger: each trial's Lightning logs already are one)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # only the loggers given here
    callbacks = [JsonLoggerCallback(), CSVLoggerCallback()]
    if settings.mlflow_uri:
        require_mlflow()
        from cifar_ray.mlflow_runs import TrialRuns

        callbacks.append(TrialRuns(tracking_uri=settings.mlflow_uri,
                                   experiment_name=settings.mlflow_experiment,
                                   tags={"cifar_ray": "trial"}))
    return callbacks


def retrain_logger(settings, params: dict[str, Any]):
    """Lightning's MLflow logger for the retrain (None when MLflow is off), `params` logged."""
    if not settings.mlflow_uri:
        return None
    require_mlflow()
    from cifar_ray.pl import pl

    logger = pl.loggers.MLFlowLogger(experiment_name=settings.mlflow_experiment,
                                     tracking_uri=settings.mlflow_uri, run_name="retrain",
                                     tags={"cifar_ray": "retrain"})
    logger.log_hyperparams(params)
    return logger


def log_artifacts(settings, run_id: str | None, paths: list[Path]) -> None:
    """Adds files to an MLflow run (the retrain's checkpoint and report.html)."""
    if not settings.mlflow_uri or not run_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_uri)
    for path in paths:
        client.log_artifact(run_id, str(path))
