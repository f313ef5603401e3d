"""What a person watching a search sees, and what goes to files instead: the remaining-time
Estimator, SearchConsole (a line per trial event, Tune's status table, the progress line,
logs/progress.jsonl) and route_worker_logs (workers' output to logs/workers.log)."""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from ray import cloudpickle
from ray.tune import Callback

from cifar_ray.console import CONSOLE_MARK, Console, format_duration, screen
from cifar_ray.errors import full_disk
from cifar_ray.files import append_line, open_log
from cifar_ray.names import FIRST_STEP_AT, MODE, REPORTED_AT, STARTUP
from cifar_ray.search.plan import SearchPlan, expected_epochs
from cifar_ray.search.settings import describe

BATCH_KEY = "trainer.batch_size"
LOG_EVERY = float(os.environ.get("CIFAR_RAY_PROGRESS_EVERY", "60"))  # seconds, when not a TTY
TERMINAL_EVERY = 2.0
TABLE_EVERY = 30.0  # seconds between Tune's status tables, as Tune's own reporter


class Estimator:
    """The search's remaining seconds: each trial still to run costs its start-up plus the
    epochs ASHA is expected to leave it, at the seconds per epoch measured for its batch size."""

    def __init__(self, plan: SearchPlan):
        self.plan = plan
        self.trials: dict[str, dict[str, Any]] = {}
        self.epoch_seconds: dict[Any, list[float]] = {}
        self.startups: list[float] = []

    def start(self, trial_id: str, batch: Any, now: float) -> None:
        self.trials.setdefault(trial_id, {"batch": batch, "epochs": 0, "last": None,
                                          "done": False})["started"] = now

    def result(self, trial_id: str, result: dict[str, Any], now: float) -> None:
        trial = self.trials.setdefault(trial_id, {"batch": None, "epochs": 0, "last": None,
                                                  "done": False, "started": now})
        reported, first_step = result.get(REPORTED_AT), result.get(FIRST_STEP_AT)
        if reported is not None and first_step is not None:
            begun = max(trial.get("reported_at") or first_step, first_step)
            if reported > begun:
                self.epoch_seconds.setdefault(trial["batch"], []).append(reported - begun)
            trial["reported_at"] = reported
        if trial["epochs"] == 0 and result.get(STARTUP) is not None:
            self.startups.append(float(result[STARTUP]))
        trial["epochs"] = int(result.get("training_iteration", trial["epochs"] + 1))
        trial["last"] = now

    def finish(self, trial_id: str) -> None:
        if trial_id in self.trials:
            self.trials[trial_id]["done"] = True

    def seconds_per_epoch(self, batch: Any = None) -> float | None:
        if batch in self.epoch_seconds:
            return statistics.median(self.epoch_seconds[batch])
        if not self.epoch_seconds:
            return None
        return statistics.mean(statistics.median(v) for v in self.epoch_seconds.values())

    def trial_epochs_done(self) -> int:
        return sum(t["epochs"] for t in self.trials.values())

    def remaining(self, now: float) -> float | None:
        mean = self.seconds_per_epoch()
        if mean is None:
            return None
        p = self.plan
        startup = statistics.median(self.startups) if self.startups else 0.0
        new_trial = expected_epochs(0, p.rungs, p.reduction_factor, p.max_t)
        work, longest = 0.0, 0.0
        for trial in self.trials.values():
            if trial["done"]:
                continue
            spe = self.seconds_per_epoch(trial["batch"])
            if trial["last"] is None:  # still starting
                left = max(0.0, startup - (now - trial["started"])) + new_trial * spe
            else:  # the epoch under way has run since its last report
                more = expected_epochs(trial["epochs"], p.rungs, p.reduction_factor, p.max_t)
                left = max(0.0, more * spe - min(now - trial["last"], spe))
            work += left
            longest = max(longest, left)
        pending = max(0, p.trials - len(self.trials))
        work += pending * (startup + new_trial * mean)
        return max(longest, work / p.concurrent)

    def line(self, now: float, elapsed: float) -> dict[str, Any] | None:
        """The progress figures, or None before the first epoch has been measured."""
        left = self.remaining(now)
        if left is None:
            return None
        done = sum(t["done"] for t in self.trials.values())
        return {"time": round(now, 1), "elapsed_s": round(elapsed, 1), "left_s": round(left, 1),
                "trials_done": done, "trials_running": len(self.trials) - done,
                "trial_epochs": self.trial_epochs_done(),
                "seconds_per_epoch": {str(b): round(statistics.median(v), 2)
                                      for b, v in sorted(self.epoch_seconds.items(), key=str)}}

    def text(self, figures: dict[str, Any]) -> str:
        p = self.plan
        speeds = figures["seconds_per_epoch"]
        per = ", ".join(f"{s:.1f} s" + ("" if b == "None" else f" at batch {b}")
                        for b, s in speeds.items())
        return (f"progress: {figures['trials_done']}/{p.trials} trials done, "
                f"{figures['trials_running']} running; {figures['trial_epochs']} trial-epochs "
                f"(at most {p.most_trial_epochs}, about {p.expected_trial_epochs:.0f} expected); "
                f"{format_duration(figures['elapsed_s'])} elapsed, about "
                f"{format_duration(figures['left_s'])} left (per epoch: {per})")


class SearchConsole(Callback):
    """The search's console (see the module's docstring). `verbose`: Tune prints its own
    per-trial blocks as well (-v), so the event lines are left out."""

    def __init__(self, plan: SearchPlan, out: Path, space: dict[str, Any], verbose: bool,
                 max_failures: int, stop=None):
        self.plan, self.out, self.space, self.verbose = plan, out, space, verbose
        self.max_failures, self.stop = max_failures, stop
        self.metric = plan.metric  # tune.metric
        self.before = 0.0  # the search's seconds in earlier sessions (set_state)
        self.sessions = 1
        self.stopper = None  # the budget's DeadlineStopper, whose clock the lines show
        self._runtime: dict[str, Any] = {}

    # Tune pickles its callbacks with the experiment: only the settings and the seconds travel.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stop": None, "stopper": None, "_runtime": {}}

    def running(self) -> list[str]:
        """The trials started and not yet ended."""
        trials = self._runtime["estimator"].trials if self._runtime else {}
        return [trial_id for trial_id, trial in trials.items() if not trial["done"]]

    def get_state(self) -> dict[str, Any]:
        return {"seconds": self.seconds(), "sessions": self.sessions}

    def set_state(self, state: dict[str, Any]) -> None:
        self.before = float(state.get("seconds", 0.0))
        self.sessions = int(state.get("sessions", 0)) + 1

    def seconds(self) -> float:
        """The search's seconds, over every session so far."""
        started = self._runtime.get("started")
        return self.before + (time.time() - started if started else 0.0)

    def setup(self, **info) -> None:
        from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter

        now = time.time()
        self._runtime = {"started": now, "estimator": Estimator(self.plan),
                         "last": 0.0, "table_at": now}
        # Tune's reporter is silent (event lines replace its tables); this prints its status.
        if not self.verbose:
            table = TuneTerminalReporter(AirVerbosity.DEFAULT, num_samples=self.plan.trials,
                                         metric=self.metric, mode=MODE, config=self.space)
            table.setup(start_time=now, total_samples=self.plan.trials)
            self._runtime["table"] = table
        (self.out / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def console(self) -> Console:
        return screen

    def _event(self, text: str) -> None:
        if not self.verbose:
            self.console.line(text)

    @staticmethod
    def _name(trial) -> str:
        return f"trial {trial.trial_id}"

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._runtime["estimator"].start(trial.trial_id, trial.config.get(BATCH_KEY), time.time())
        sample = {key: trial.config[key] for key in self.space if key in trial.config}
        self._event(f"{self._name(trial)} started: {describe(sample)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        estimator = self._runtime["estimator"]
        estimator.result(trial.trial_id, result, time.time())
        if self.stopper is not None:  # the deadline goes by what the trials measure
            self.stopper.clock.measured([s for v in estimator.epoch_seconds.values() for s in v],
                                        estimator.startups)
        self._progress(force=self._runtime["last"] == 0.0)  # the first estimate at once

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._runtime["estimator"].finish(trial.trial_id)
        if self._stopping():
            return
        last = trial.last_result or {}
        epochs = int(last.get("training_iteration", 0))
        acc = last.get(self.metric)
        best = trial.metric_analysis.get(self.metric, {}).get(MODE) if trial.metric_analysis else None
        scores = f"{self.metric} {acc:.4f}" if acc is not None else "no score"
        if best is not None and acc is not None and best > acc:
            scores += f", best {best:.4f}"
        if self.stopper is not None and trial.trial_id in self.stopper.stopped:
            self._event(f"{self._name(trial)} stopped by the budget at epoch {epochs} ({scores})")
        elif epochs < self.plan.max_t:
            self._event(f"{self._name(trial)} stopped by ASHA at epoch {epochs} ({scores})")
        else:
            self._event(f"{self._name(trial)} finished: {epochs} epochs ({scores})")

    def _error_text(self, trial) -> str:
        path = trial.error_file
        try:
            return Path(path).read_text().strip() if path else str(trial.get_error())
        except OSError:
            return f"(error file {path} could not be read)"

    def _stopped_for_full_disk(self, trial) -> bool:
        """A trial that failed for want of disk space stops the search (every retry and every
        other trial would fail the same way), its state saved for --resume."""
        # Tune has just written the error beside the trial's local results.
        try:
            error = full_disk(cloudpickle.loads(Path(trial.pickled_error_file).read_bytes()))
        except Exception:  # no such file, or not one to load: not an error this can tell
            error = None
        if error is None or self.stop is None:
            return False
        self.console.line(f"{self._name(trial)} failed: no space left to write {error.path} "
                          f"({error.reason}); stopping the search")
        self.stop.stop_for_full_disk(error)
        return True

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        if self._stopped_for_full_disk(trial):
            return
        epochs = int((trial.last_result or {}).get("training_iteration", 0))
        error = self._error_text(trial).splitlines()
        self.console.line(f"{self._name(trial)} failed after {epochs} epochs "
                          f"({error[-1] if error else 'no error text'}); retry "
                          f"{trial.num_failures} of {self.max_failures}, from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._runtime["estimator"].finish(trial.trial_id)
        if self._stopped_for_full_disk(trial):
            return
        epochs = int((trial.last_result or {}).get("training_iteration", 0))
        self.console.line(f"{self._name(trial)} failed after {epochs} epochs, "
                          f"{trial.num_failures} time(s), and is given up:\n"
                          f"{self._error_text(trial)}")

    def on_step_end(self, iteration, trials, **info) -> None:
        if "table" in self._runtime and not self._stopping():
            table = self._runtime["table"]  # clear the progress line only when it prints
            if time.time() - self._runtime["table_at"] >= TABLE_EVERY:
                self._runtime["table_at"] = time.time()
                self.console.clear()
                table.print_heartbeat(trials, force=True)
        self._progress()

    def on_experiment_end(self, trials, **info) -> None:
        self._progress(force=True)
        self.console.finish()

    def _progress(self, force: bool = False) -> None:
        now = time.time()
        every = TERMINAL_EVERY if self.console.tty else LOG_EVERY
        if not force and now - self._runtime["last"] < every:
            return
        estimator = self._runtime["estimator"]
        figures = estimator.line(now, self.seconds())
        if figures is None:
            return
        self._runtime["last"] = now
        clock = self.stopper.clock if self.stopper is not None else None
        if clock is not None:  # the search ends by its share of the budget at the latest
            figures["left_s"] = round(min(figures["left_s"], max(0.0, clock.search_left())), 1)
            figures["budget_used_s"] = round(clock.used(), 1)
        text = estimator.text(figures) + (f"; {clock.text()}" if clock is not None else "")
        self.console.progress(text)
        try:
            append_line(self.out / "logs" / "progress.jsonl", json.dumps(figures))
            if clock is not None:
                clock.save()
        except OSError:
            pass  # the progress file is a convenience; a full disk shows up where it matters


def route_worker_logs(target: Path) -> None:
    """What Ray's workers print, and Tune's log, go to `target` (CONSOLE_MARK lines to the
    console too), by swapping the handler of Ray's log dispatcher (ray 2.60: ray._private)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    log = open_log(target)
    shown: set[tuple[Any, str]] = set()

    def handle(data: dict[str, Any]) -> None:
        who = data.get("actor_name") or data.get("task_name")
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}, ip={data.get('ip')})"
        for line in data.get("lines", []):
            # Ray streams a Ray Train worker's output twice (seen with ray 2.60): show it once.
            if line.startswith(CONSOLE_MARK) and (data.get("pid"), line) not in shown:
                shown.add((data.get("pid"), line))
                screen.line(line[len(CONSOLE_MARK):])
            try:
                log.write(f"{prefix} {line}\n")
            except (OSError, ValueError):
                pass  # a full disk: the command's own writes report it

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("cifar_ray_logs", handle)
    tune_log = logging.getLogger("ray.tune")
    to_file = logging.StreamHandler(log)
    to_file.setFormatter(logging.Formatter("(driver) %(asctime)s %(levelname)s %(name)s: %(message)s"))
    tune_log.addHandler(to_file)
    tune_log.propagate = False
