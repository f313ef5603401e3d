"""The searcher, scheduler and stopper of a search's Tune experiment, with a budget's deadline
(search/budget.py: no trial started that cannot reach its first rung in time, running trials
stopped after a report, their results kept; Tune's time_budget_s loses them, ray#34136) and
a head start (search/seeds.py). Imports Ray."""

from __future__ import annotations

import math
from typing import Any, Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.searcher import Searcher
from ray.tune.stopper import Stopper

from cifar_ray.errors import UserError
from cifar_ray.names import FIRST_STEP_AT, MODE, REPORTED_AT
from cifar_ray.search.budget import BudgetClock
from cifar_ray.search.objectives import OBJECTIVES, ParetoRungs, minimised
from cifar_ray.search.seeds import Seed


class _Clocked:
    """A searcher that asks `clock` (this session's BudgetClock, never saved: tuner.restored
    gives a resumed search its own) before each new trial."""

    clock: BudgetClock | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "clock"}

    def get_state(self) -> Any:
        state = super().get_state()
        if isinstance(state, dict):
            state.pop("clock", None)
        return state

    def out_of_time(self) -> bool:
        return self.clock is not None and not self.clock.may_start()


class ClockedLimiter(_Clocked, ConcurrencyLimiter):
    """A Searcher (Optuna's) at most `max_concurrent` at once, and none past the deadline."""

    def suggest(self, trial_id: str):
        if self.out_of_time():
            return Searcher.FINISHED
        return super().suggest(trial_id)


class ClockedVariants(_Clocked, BasicVariantGenerator):
    """Tune's random search, which ends where the deadline leaves no time for another trial."""

    def next_trial(self):
        if not self.is_finished() and self.out_of_time():
            self.set_finished()
            return None
        return super().next_trial()


class DeadlineStopper(Stopper):
    """Stops a trial after a report when its next epoch would end past the search's share,
    and every trial once the share has ended; `stopped`: the trials it stopped."""

    def __init__(self, clock: BudgetClock, max_t: int, live: Callable[[], list[str]]):
        self.clock, self.max_t, self.live = clock, max_t, live
        self.stopped: set[str] = set()
        self._reported: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled with the experiment: the numbers only
        return {"clock": None, "max_t": self.max_t, "live": list, "stopped": set(),
                "_reported": {}}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if self.clock is None or result.get("training_iteration", 0) >= self.max_t:
            return False
        reported, first_step = result.get(REPORTED_AT), result.get(FIRST_STEP_AT)
        began = max(self._reported.get(trial_id, first_step or 0.0), first_step or 0.0)
        epoch = reported - began if reported and began and reported > began else self.clock.epoch_s
        if reported:
            self._reported[trial_id] = reported
        if self.clock.search_left() < epoch:
            self.stopped.add(trial_id)
            return True
        return False

    def stop_all(self) -> bool:
        left = self.clock.search_left() if self.clock is not None else 1.0
        # Until a trial has reported, it may run an epoch over: a search with no result
        # could not choose, and the whole budget would be lost.
        if left > 0 or (not self._reported and left > -2 * self.clock.epoch_s):
            return False
        self.stopped.update(self.live())
        return True


class SeededOptuna(OptunaSearch):
    """Optuna's searcher whose study holds `seeds` (earlier trials, as finished ones) before
    it samples: TPE counts them among its random start-up trials, and learns from them."""

    def __init__(self, *args, seeds: list[Seed] = (), tries: list[dict[str, Any]] = (),
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._seeds = [(s.config, s.value) for s in seeds]
        self._tries = list(tries)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        for config, value in self._seeds:
            self.add_evaluated_point(config, value)
        for config in self._tries:  # Optuna samples the keys a config leaves out
            self._ot_study.enqueue_trial(config)
        self._seeds, self._tries = [], []  # once: a resumed search restores its study


class SeededASHA(ASHAScheduler):
    """ASHA whose rungs already hold earlier trials' accuracies (a --more round's: the same
    rungs), so that a new trial is compared with them from its first rung."""

    def seed_rungs(self, curves: dict[str, list[tuple[int, float]]]) -> None:
        for bracket in self._brackets:
            for milestone, recorded in bracket._rungs:
                for key, curve in curves.items():
                    reached = [acc for epoch, acc in curve if epoch >= milestone]
                    if reached:  # the accuracy it was judged by at this rung
                        recorded[f"earlier-{key}"] = reached[0] * (1 if MODE == "max" else -1)


class ParetoASHA(FIFOScheduler):
    """Multi-objective ASHA (Schmucker et al. 2021; Syne Tune's MOASHA) as a Ray Tune
    scheduler: ASHA's rungs, where a trial goes on only if it is among the best
    1/reduction_factor by Pareto rank, ties by crowding distance
    (objectives.ParetoRungs); every objective is read from each report."""

    def __init__(self, objectives: list[str], max_t: int, grace_period: int,
                 reduction_factor: int, time_attr: str = "training_iteration"):
        super().__init__()
        self.objectives, self.max_t, self.time_attr = list(objectives), max_t, time_attr
        self.rungs = ParetoRungs(grace_period, max_t, reduction_factor)
        self.stopped = 0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # its objectives are its own; Tune's single metric is left unset

    def vector(self, result: dict[str, Any]) -> list[float] | None:
        if any(not isinstance(result.get(n), (int, float)) or not math.isfinite(result[n])
               for n in self.objectives):
            return None  # no decision on a result that lacks one (as Ray's ASHA skips NaN)
        return minimised([result], self.objectives)[0].tolist()

    def on_trial_result(self, tune_controller, trial: Trial, result: dict[str, Any]) -> str:
        vector = self.vector(result)
        if self.time_attr not in result or vector is None:
            return TrialScheduler.CONTINUE
        if result[self.time_attr] >= self.max_t:
            return TrialScheduler.STOP
        if self.rungs.on_result(trial.trial_id, result[self.time_attr], vector):
            return TrialScheduler.CONTINUE
        self.stopped += 1
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict[str, Any]) -> None:
        vector = self.vector(result or {})
        if vector is not None and self.time_attr in result:
            self.rungs.on_result(trial.trial_id, result[self.time_attr], vector)

    def debug_string(self) -> str:
        return f"Using multi-objective ASHA: num_stopped={self.stopped}"


def make_searcher(alg: str, seed: int, samples: int, concurrent: int, clock=None,
                  seeds: list[Seed] = (), first: list[dict[str, Any]] = (),
                  objectives: list[str] = ()):
    """Tune's random generator, Optuna's TPE (random for its first third of the trials, 2 to
    10, `seeds` counted; constant_liar spreads trials started together) or NSGA-II, the
    configs `first` run first; at most `concurrent` at once. Several `objectives`: Optuna's
    study has a direction for each."""
    if alg == "random":
        # The limit goes to the generator: Tune ignores max_concurrent_trials beside it.
        generator = ClockedVariants(points_to_evaluate=list(first) or None, random_state=seed,
                                    max_concurrent=concurrent)
        generator.clock = clock
        return generator
    try:
        import optuna
    except ImportError:
        raise UserError(f"tune.search_alg {alg} needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per trial
    if alg == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed,
                                                population_size=max(4, min(50, samples // 3)))
    else:
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=max(2, min(10, samples // 3)), constant_liar=True)
    several = {"metric": list(objectives), "mode": [OBJECTIVES[n][0] for n in objectives]} \
        if len(objectives) > 1 else {}
    limiter = ClockedLimiter(SeededOptuna(sampler=sampler, seeds=seeds, tries=first, **several),
                             max_concurrent=concurrent)
    limiter.clock = clock
    return limiter


def make_scheduler(max_t: int, grace: int, factor: int,
                   curves: dict[str, list[tuple[int, float]]] | None = None,
                   objectives: list[str] = ()):
    """ASHA (its rungs seeded with `curves`, a --more round's), or with several objectives
    multi-objective ASHA."""
    if len(objectives) > 1:
        return ParetoASHA(objectives, max_t, grace, factor)
    scheduler = SeededASHA(time_attr="training_iteration", max_t=max_t, grace_period=grace,
                           reduction_factor=factor)
    if curves:
        scheduler.seed_rungs(curves)
    return scheduler
