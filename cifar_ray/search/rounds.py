"""A search's Tune experiments: the first at <storage>/<tune.name>, and one inside it for each
`--resume --more N` (more-1, ...), seeded with every trial so far (Tune cannot add samples to
a finished experiment: ray#42221). Every round's rows are one table for the choice."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_ray.errors import Interrupted, UserError
from cifar_ray.search.budget import BudgetClock
from cifar_ray.search.plan import SearchPlan
from cifar_ray.search.seeds import Seed, Seeds
from cifar_ray.search.tuner import (
    Round,
    finished_results,
    run_search,
    summarise_trials,
    tune_space,
)

ROUND = re.compile(r"more-([1-9][0-9]{0,4})")


@dataclass
class Session:
    """How the search's rounds run in this command."""

    plan: SearchPlan
    concurrent: int
    scaling: dict[str, Any]
    data: Any  # the object reference of the data set's arrays
    verbose: bool
    clock: BudgetClock | None = None
    seeds: Seeds | None = None
    more: int = 0


def rounds_of(experiment: Path) -> list[Path]:
    """The search's experiments so far, in order: the first and its --more rounds."""
    more = [(int(m[1]), p) for p in experiment.glob("more-*")
            if (m := ROUND.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()
            and any(p.glob("experiment_state-*.json"))]  # a round killed before Tune saved it: none
    return [experiment, *(p for _, p in sorted(more))]


def run_rounds(cfg, out: Path, session: Session, resume: bool, interrupted) -> tuple[list, float, int]:
    """Every round's trials as rows (with "round" and "origin"), the search's seconds and
    sessions. --resume finishes the last round (under its budget, if any); --more adds one
    after them, which no budget bounds."""
    t = cfg.tune
    experiment = Path(cfg.tune.storage or out).expanduser().resolve() / t.name
    known = rounds_of(experiment) if resume else [experiment]
    seeds = session.seeds or Seeds(metric=t.metric)
    rows: list[dict[str, Any]] = []
    for k, where in enumerate(known[:-1]):
        rows += marked(summarise_trials(ended(where), list(cfg.search), cfg.trainer.epochs,
                                        metric=t.metric, objectives=cfg.objectives()),
                       k, seeds, first_configs(cfg, seeds, rows))
    first = first_configs(cfg, seeds, rows)
    last = Round(known[-1], t.num_samples, t.search_seed, seeds.seeds, first)
    seconds, sessions, new = one_round(cfg, out, session, last, resume, interrupted,
                                       session.clock)
    rows += marked(new, len(known) - 1, seeds, first)
    if session.more:
        number = 1 + max((int(m[1]) for p in experiment.glob("more-*")
                          if (m := ROUND.fullmatch(p.name))), default=0)
        first = first_configs(cfg, seeds, rows)
        more = Round(experiment / f"more-{number}", session.more, t.search_seed + number,
                     seeds=[*own_seeds(rows, str(out)), *seeds.seeds], first=first,
                     curves={r["trial_id"]: r["curve"] for r in rows})
        print(f"--more: {session.more} more trials in {more.where.name}/, starting from the "
              f"{len(rows)} so far")
        more_seconds, _, new = one_round(cfg, out, session, more, False, interrupted, None)
        rows += marked(new, number, seeds, first)
        seconds += more_seconds
    return rows, seconds, sessions


def ended(where: Path):
    """An earlier round's ResultGrid; UserError if its saved state cannot be read."""
    try:
        return finished_results(where)
    except Exception as exc:  # Ray's own words for a state it cannot read
        raise UserError(f"--resume: the search's round {where} cannot be read "
                        f"({type(exc).__name__}); start again with --overwrite") from None


def one_round(cfg, out: Path, session: Session, round_: Round, resume: bool,
              interrupted, clock) -> tuple[float, int, list]:
    from cifar_ray.search.progress import SearchConsole
    from cifar_ray.search.searchers import DeadlineStopper

    plan = dataclasses.replace(session.plan, trials=round_.samples)
    console = SearchConsole(plan, out, tune_space(cfg), session.verbose, cfg.tune.max_failures,
                            interrupted)
    stopper = None
    if clock is not None:
        stopper = DeadlineStopper(clock, cfg.trainer.epochs, console.running)
    console.stopper = stopper
    grid = run_search(cfg, out, resume, session.concurrent, session.scaling, session.data,
                      console, session.verbose, stopper, round_)
    check_stopped(interrupted, round_.where)
    rows = summarise_trials(grid, list(cfg.search), cfg.trainer.epochs,
                            stopper.stopped if stopper else (), cfg.tune.metric,
                            cfg.objectives())
    return console.seconds(), console.sessions, rows


def first_configs(cfg, seeds: Seeds, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a round runs first: --try's configs, and for random search the earlier best,
    those not yet run in `rows` (earlier rounds)."""
    best = seeds.best()
    first = [*seeds.tries, *([best.config] if best and cfg.tune.search_alg == "random" else [])]
    return [config for config in first if not any(ran(row, config) for row in rows)]


def own_seeds(rows: list[dict[str, Any]], source: str) -> list[Seed]:
    return [Seed(r["config"], r["best_score"], r["epochs"], source) for r in rows
            if r["best_score"] is not None]


def marked(rows: list[dict[str, Any]], k: int, seeds: Seeds,
           first: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's round, and where its sample came from: the round's first trials ran its
    `first` configs (--try's, the earlier best); the others the searcher's."""
    for i, row in enumerate(rows):
        row["round"], row["origin"] = k, "searcher"
        if i < len(first) and ran(row, first[i]):
            row["origin"] = "--try" if first[i] in seeds.tries else "earlier best"
    return rows


def ran(row: dict[str, Any], tried: dict[str, Any]) -> bool:
    """Whether a trial ran the --try config `tried` (the keys it gives)."""
    return all(row["config"].get(key) == value for key, value in tried.items())


def check_stopped(interrupted, experiment: Path) -> None:
    """A full disk or a signal during the search: one line saying how to go on."""
    if full := interrupted.full_disk:
        raise UserError(f"the search stopped: no space left to write {full.path} "
                        f"({full.reason}); its state is saved in {experiment}: "
                        "free some space and run the same command with --resume")
    if interrupted.is_set():
        raise Interrupted(f"search interrupted; its state is saved in {experiment}: "
                          f"run the same command with --resume to continue",
                          interrupted.exit_code)
