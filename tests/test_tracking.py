"""MLflow's run per trial across a resume, without Ray running: the callback's state, saved with
Tune's experiment, hands a resumed trial the run it had (Ray's own callback opened a second run
and left the first one RUNNING). The whole search against a real store: tests/test_tune.py."""

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
