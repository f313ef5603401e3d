"""MLflow's run per trial across a resume, without Ray running: the callback's state, saved with
Tune's experiment, hands a resumed trial the run it had (Ray's own callback opened a second run
and left the first one RUNNING). Credentials in the tracking URI never reach a file or the
console. The whole search against a real store, and over HTTP: tests/test_tune.py."""

import os

import pytest

from cifar_ray.mlflow_runs import TrialRuns


class FakeTrial:
    """What Ray's MLflow callback reads of a Tune trial."""

    def __init__(self, trial_id: str):
        self.trial_id, self.config = trial_id, {"optim.lr": 0.01}

    def __str__(self) -> str:
        return f"run_trial_{self.trial_id}"


def _callback(store: str) -> TrialRuns:
    callback = TrialRuns(tracking_uri=store, experiment_name="cifar_ray", tags={"cifar_ray": "trial"})
    callback.setup()
    return callback


def test_a_resumed_trial_logs_into_the_run_it_had(tmp_path):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = _callback(store)
    before.log_trial_start(FakeTrial("a"))
    before.log_trial_start(FakeTrial("b"))
    state = before.get_state()
    assert set(state["runs"]) == {"a", "b"}

    after = _callback(store)  # the resumed search: new callback, new Trial objects
    after.set_state(state)
    trial = FakeTrial("a")
    after.log_trial_start(trial)
    after.log_trial_result(1, trial, {"val/acc": 0.5, "training_iteration": 1})
    after.log_trial_end(trial)
    after.log_trial_start(FakeTrial("c"))  # a trial that had not started: a run of its own

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("cifar_ray").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run_trial_a", "run_trial_b", "run_trial_c"]
    (a,) = [r for r in runs if r.info.run_name == "run_trial_a"]
    assert a.info.run_id == state["runs"]["a"] and a.info.status == "FINISHED"
    assert a.data.metrics["val/acc"] == 0.5


def test_a_password_in_the_tracking_uri_is_not_written():
    from cifar_ray.tracking import redacted

    assert redacted("https://me:s3cret@mlflow.example.com:5000/x") == \
        "https://me:***@mlflow.example.com:5000/x"
    for uri in ("sqlite:////tmp/m.db", "http://127.0.0.1:5000", "databricks", ""):
        assert redacted(uri) == uri


def test_credentials_in_the_uri_move_to_mlflows_variables_and_out_of_what_tune_pickles(
        tmp_path, monkeypatch, capsys):
    """Tune pickles its callbacks into the output dir (tuner.pkl): with the URI as given, the
    password was in it. The URI's credentials become MLflow's own variables instead."""
    import cloudpickle

    from cifar_ray.search.settings import SearchConfig
    from cifar_ray.tracking import take_credentials, tune_callbacks

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    settings = SearchConfig().tracking
    settings.mlflow_uri = "https://ada%40lab:s3cret%2F1@mlflow.example.com:5000/x"
    take_credentials(settings, local_ray=True)
    assert settings.mlflow_uri == "https://mlflow.example.com:5000/x"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ada@lab"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret/1"
    assert b"s3cret" not in cloudpickle.dumps(tune_callbacks(settings))
    assert "s3cret" not in capsys.readouterr().out


def test_credentials_in_the_uri_with_a_cluster_are_one_line_naming_the_variables():
    from cifar_ray.errors import UserError
    from cifar_ray.search.settings import SearchConfig
    from cifar_ray.tracking import take_credentials

    settings = SearchConfig().tracking
    settings.mlflow_uri = "https://ada:s3cret@mlflow.example.com"
    with pytest.raises(UserError, match="set MLFLOW_TRACKING_USERNAME and "
                                        "MLFLOW_TRACKING_PASSWORD") as err:
        take_credentials(settings, local_ray=False)
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize("uri, message", [
    ("http://ada:s3cret@127.0.0.1:{port}/", "tracking.mlflow_uri http://127.0.0.1:{port}/: "
                                            "MLflow cannot use it"),
    ("nosuchscheme://ada:s3cret@somewhere/", "tracking.mlflow_uri nosuchscheme://somewhere/: "
                                             "MLflow cannot use it"),
])
def test_a_uri_mlflow_cannot_use_is_one_line_without_the_password(tmp_path, uri, message):
    from tests.conftest import run_cli
    from tests.processes import free_port

    port = free_port()
    out = tmp_path / "out"
    proc = run_cli("cifar_ray.tune", "--config", "experiments/search.yaml",
                   "--mlflow-uri", uri.format(port=port), "--output-dir",
                   str(out), "--dataset", "folder", "--data-dir", str(tmp_path), timeout=300,
                   env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(port=port)), \
        proc.stderr[-3000:]
    assert "s3cret" not in proc.stdout + proc.stderr
    assert not out.exists()
