"""Tune's callback that makes each trial an MLflow run (imported only when MLflow is on: it
imports MLflow). Ray's MLflowLoggerCallback, plus one thing: a search resumed after an
interruption goes on logging a trial into the run it had, instead of opening a second run
for it and leaving the first one RUNNING forever."""

from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback


class TrialRuns(MLflowLoggerCallback):
    def get_state(self) -> dict:
        # Saved with Tune's experiment state; trial ids, since the Trial objects are new.
        runs = getattr(self, "_trial_runs", {})  # set up by Tune once the search starts
        return {"runs": {trial.trial_id: run for trial, run in runs.items()}}

    def set_state(self, state: dict) -> None:
        self._resumed = dict(state.get("runs", {}))

    def log_trial_start(self, trial) -> None:
        run = getattr(self, "_resumed", {}).pop(trial.trial_id, None)
        if run is not None and trial not in self._trial_runs:
            self._trial_runs[trial] = run
        super().log_trial_start(trial)
