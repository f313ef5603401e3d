"""A deadline, a head start, more trials, without a stopwatch: what a budget buys
(search/budget.py), the clock its deadline and retrain ask, the searchers and stopper that keep
it (search/searchers.py, Tune's own classes driven directly), earlier runs' trials read and
filtered by the space (search/seeds.py), and what `--plan` says of all of it."""

import json
from pathlib import Path

import pytest

from cifar_ray.errors import ConfigError, UserError
from cifar_ray.search.budget import (
    BudgetClock,
    Costs,
    parse_budget,
    size_run,
    sized_from_dict,
    sized_to_dict,
)
from cifar_ray.search.seeds import Seed, Seeds, gather, outside, parse_try
from cifar_ray.search.settings import SearchConfig
from tests.conftest import ROOT, mains_in_a_fresh_process, run_cli

COSTS = Costs(epoch_s=10.0, retrain_epoch_s=12.0, startup_s=20.0, setup_s=20.0, finish_s=30.0,
              source="given")
SPACE = {"optim.lr": ("loguniform", [1e-4, 1e-1]), "trainer.batch_size": ("choice", [64, 128])}


@pytest.mark.parametrize("text, seconds", [("20m", 1200), ("2h", 7200), ("1.5h", 5400),
                                           ("90s", 90), (" 45 min ", 2700), ("", None)])
def test_a_budget_reads_as_a_person_writes_it(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text, message", [("0", "must be more than 0"),
                                           ("-5m", "must be more than 0"),
                                           ("abc", "expected a duration"),
                                           ("10y", "unknown unit 'y'"), ("5", "give its unit"),
                                           ("1e9h", "expected a duration"),
                                           ("99999h", "at most 30 days")])
def test_a_bad_budget_is_one_line(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_budget(text)


def _size(budget_s: float, epochs: int = 24, trials: int = 100, retrain: int = 24, **kw):
    return size_run(budget_s, kw.get("costs", COSTS), epochs, trials, retrain,
                    kw.get("grace", 2), kw.get("factor", 3), kw.get("concurrent", 2))


@pytest.mark.parametrize("budget_s", [110, 200, 600, 1800, 3600, 4 * 3600, 48 * 3600])
def test_what_a_budget_buys_fits_it_and_never_passes_the_users_values(budget_s):
    sized = _size(budget_s)
    assert 1 <= sized.epochs <= 24 and 1 <= sized.retrain_epochs <= 24
    assert 1 <= sized.trials <= 100 and 1 <= sized.grace_period <= sized.epochs
    # The search's share holds a trial to its first rung, and the parts add up to the budget.
    search = sized.search_end() - COSTS.setup_s
    # The first trials, which ASHA cannot yet compare, train every epoch within the share.
    assert COSTS.startup_s + sized.epochs * COSTS.epoch_s <= search
    assert sized.retrain_s() <= 0.35 * (budget_s - 50) or sized.retrain_epochs == 1


def test_more_budget_buys_no_less():
    bought = [_size(b) for b in (200, 600, 1800, 3600, 4 * 3600)]
    for small, large in zip(bought, bought[1:]):
        assert large.epochs >= small.epochs and large.retrain_epochs >= small.retrain_epochs
        assert large.epochs * large.trials >= small.epochs * small.trials
    assert bought[-1].epochs == 24 and bought[-1].retrain_epochs == 24  # the caps bind
    assert "trainer.epochs" in bought[-1].capped and "trainer.epochs" not in bought[0].capped


def test_a_budget_too_small_names_the_least_that_works():
    least = COSTS.least_budget()  # 20 + 20 + 10 + 12 + 30 s
    assert least == 92
    with pytest.raises(UserError, match=r"give at least --budget 2m"):
        _size(least - 1)
    sized = _size(least)  # two at once: both reach their first rung
    assert (sized.epochs, sized.retrain_epochs, sized.trials) == (1, 1, 2)
    assert _size(least, concurrent=1).trials == 1


def test_the_retrain_gets_the_epochs_the_time_left_buys():
    sized = _size(3600)  # 30 s to finish, 12 s a retrain epoch, 24 at most
    assert sized.retrain_epochs == 24
    clock = BudgetClock(sized)
    for used, expected in [(3600 - 30 - 5 * 12.0, 5), (3600 - 30 - 5.5 * 12.0, 5),
                           (3600 - 29.0, 1), (4000.0, 1), (0.0, 24)]:
        clock.used = lambda used=used: used  # the time spent, as the clock would read it
        assert clock.retrain_epochs() == expected, used
    short = BudgetClock(_size(600, retrain=100))  # the search left more than planned:
    short.used = lambda: 0.0  # the retrain gets it, up to the user's 100
    assert short.retrain_epochs() == (600 - 30) // 12 > short.sized.retrain_epochs
    clock.used = lambda: 3000.0
    clock.measured([20.0, 24.0, 22.0], [30.0])  # trials measured slower: the deadline moves
    assert (clock.epoch_s, clock.startup_s) == (22.0, 30.0)


def test_a_resumed_runs_clock_counts_its_earlier_sessions_not_the_time_between(tmp_path):
    sized = _size(1800)
    first = BudgetClock(sized, used_before=0.0, started=1000.0)
    first.path = tmp_path / "cifar_ray_budget.json"
    first.used = lambda: 700.0
    first.save()
    saved = json.loads(first.path.read_text())
    assert sized_from_dict(saved["sized"]) == sized and saved["used_s"] == 700.0
    import time

    later = BudgetClock(sized_from_dict(saved["sized"]), saved["used_s"], started=time.time())
    assert later.used() == pytest.approx(700.0, abs=1.0)  # downtime before the resume: none
    assert later.left() == pytest.approx(1100.0, abs=1.0)
    with pytest.raises((TypeError, ValueError, KeyError)):
        sized_from_dict({**sized_to_dict(sized), "budget_s": float("nan")})


class _Clock:
    """A BudgetClock whose time is set by the test."""

    def __init__(self, search_left: float, epoch_s: float = 10.0, startup_s: float = 20.0):
        self.left, self.epoch_s, self.startup_s = search_left, epoch_s, startup_s
        self.sized = _size(3600)

    def search_left(self) -> float:
        return self.left

    def may_start(self) -> bool:
        return self.left >= self.startup_s + self.sized.grace_period * self.epoch_s


def test_the_deadline_stops_a_trial_whose_next_epoch_would_end_past_it():
    from cifar_ray.search.searchers import DeadlineStopper

    clock = _Clock(search_left=100.0)
    stopper = DeadlineStopper(clock, max_t=5, live=lambda: ["a", "b", "c"])
    report = {"training_iteration": 1, "time/first_step_at": 0.0, "time/reported_at": 30.0}
    assert not stopper("a", report)  # 30-s epochs, 100 s left: another one fits
    clock.left = 25.0
    assert stopper("a", {**report, "training_iteration": 2, "time/reported_at": 60.0})
    assert stopper.stopped == {"a"}
    assert not stopper("b", {**report, "training_iteration": 5})  # at max_t: ASHA's to end
    assert not stopper.stop_all()
    clock.left = 0.0
    assert stopper.stop_all() and stopper.stopped == {"a", "b", "c"}
    silent = DeadlineStopper(clock, max_t=5, live=lambda: ["d"])  # no trial has reported:
    assert not silent.stop_all()  # two epochs' grace before the search ends with no result
    clock.left = -21.0
    assert silent.stop_all() and silent.stopped == {"d"}


def _searcher(alg: str, clock, seeds=(), tries=()):
    from ray import tune

    from cifar_ray.search.searchers import make_searcher

    searcher = make_searcher(alg, seed=0, samples=10, concurrent=10, clock=clock, seeds=seeds,
                             first=tries)
    space = {"optim.lr": tune.loguniform(1e-4, 1e-1), "trainer.batch_size": tune.choice([64, 128])}
    if alg == "random":
        searcher.add_configurations({"x": {"run": lambda c: None, "config": space,
                                           "num_samples": 10}})
    else:
        searcher.set_search_properties("val/acc", "max", space)
    return searcher


def _next(searcher, i: int):
    if hasattr(searcher, "next_trial"):
        trial = searcher.next_trial()
        return None if trial is None else trial.config
    return searcher.suggest(f"t{i}")


@pytest.mark.parametrize("alg", ["random", "optuna"])
def test_no_trial_starts_that_cannot_reach_its_first_rung(alg):
    from ray.tune.search.searcher import Searcher

    clock = _Clock(search_left=1000.0)
    searcher = _searcher(alg, clock)
    assert isinstance(_next(searcher, 0), dict)
    clock.left = clock.startup_s + clock.sized.grace_period * clock.epoch_s - 1
    assert _next(searcher, 1) in (None, Searcher.FINISHED)
    if alg == "random":
        assert searcher.is_finished()
    # What Tune saves of the searcher (tuner.pkl, its state file) leaves the clock out.
    import pickle

    from cifar_ray.search.searchers import make_searcher

    assert "clock" not in searcher.get_state()
    fresh = make_searcher(alg, seed=0, samples=10, concurrent=10, clock=clock)
    assert fresh.clock is clock and pickle.loads(pickle.dumps(fresh)).clock is None


GOOD = {"optim.lr": 0.01, "trainer.batch_size": 128}


def test_tries_run_first_and_random_search_tries_the_earlier_best_next():
    from cifar_ray.search.rounds import first_configs

    seeds = Seeds([Seed({"optim.lr": 0.0002, "trainer.batch_size": 64}, 0.3, 2, "run"),
                   Seed(GOOD, 0.9, 4, "run")], {}, [{"optim.lr": 0.05}])
    random, optuna = _search_cfg(), _search_cfg()
    optuna.tune.search_alg = "optuna"
    assert first_configs(random, seeds, []) == [{"optim.lr": 0.05}, GOOD]
    assert first_configs(optuna, seeds, []) == [{"optim.lr": 0.05}]  # TPE learns from GOOD
    ran = [{"config": {"optim.lr": 0.05, "trainer.batch_size": 64}}, {"config": GOOD}]
    assert first_configs(random, seeds, ran) == []  # a --more round runs neither again
    searcher = _searcher("random", None, seeds.seeds, tries=first_configs(random, seeds, []))
    first, second = _next(searcher, 0), _next(searcher, 1)
    assert first["optim.lr"] == 0.05 and first["trainer.batch_size"] in (64, 128)
    assert second == GOOD


def test_optunas_tpe_learns_from_the_seeds_before_it_samples():
    """TPE given 24 earlier trials, the good ones at lr 0.006 to 0.02 (a sixth of the log
    range): its first 8 samples (after --try's config) land there at least twice as often as
    an unseeded TPE's, over 4 sampler seeds."""
    import numpy as np

    seeds = [Seed({"optim.lr": float(lr), "trainer.batch_size": 128},
                  0.9 if 0.006 < lr < 0.02 else 0.1, 4, "run") for lr in np.geomspace(1e-4, 1e-1, 24)]
    searcher = _searcher("optuna", None, seeds, tries=[GOOD])
    assert len(searcher.searcher._ot_study.trials) == len(seeds) + 1  # the seeds; --try waits
    assert _next(searcher, 0) == GOOD  # the user's config first

    def in_range(seeded: list, sampler_seed: int) -> int:
        from ray import tune

        from cifar_ray.search.searchers import make_searcher

        s = make_searcher("optuna", seed=sampler_seed, samples=10, concurrent=10, seeds=seeded)
        s.set_search_properties("val/acc", "max", {"optim.lr": tune.loguniform(1e-4, 1e-1),
                                                   "trainer.batch_size": tune.choice([64, 128])})
        return sum(0.006 < s.suggest(f"t{i}")["optim.lr"] < 0.02 for i in range(8))

    seeded = sum(in_range(seeds, k) for k in range(4))
    cold = sum(in_range([], k) for k in range(4))
    assert seeded >= 10 and seeded >= 2 * cold, (seeded, cold)


def test_a_more_rounds_asha_compares_new_trials_with_the_earlier_ones():
    from ray.tune.schedulers import TrialScheduler

    from cifar_ray.search.searchers import make_scheduler

    curves = {f"old{i}": [(1, 0.5 + 0.1 * i), (2, 0.6 + 0.1 * i)] for i in range(3)}
    bracket = make_scheduler(4, 1, 2, curves)._brackets[0]

    class Trial:
        trial_id = "new"

    assert bracket.on_result(Trial(), 1, 0.45) == TrialScheduler.STOP  # below the earlier half
    Trial.trial_id = "new2"
    assert bracket.on_result(Trial(), 1, 0.8) == TrialScheduler.CONTINUE
    assert bracket.on_result(Trial(), 1, 0.8) == TrialScheduler.CONTINUE
    unseeded = make_scheduler(4, 1, 2)._brackets[0]
    assert unseeded.on_result(Trial(), 1, 0.45) == TrialScheduler.CONTINUE  # no one to compare


@pytest.mark.parametrize("config, why", [
    ({"optim.lr": 0.01, "trainer.batch_size": 64}, None),
    ({"optim.lr": 0.1, "trainer.batch_size": 128}, None),
    ({"optim.lr": 0.2, "trainer.batch_size": 64}, "out of range"),
    ({"optim.lr": float("nan"), "trainer.batch_size": 64}, "out of range"),
    ({"optim.lr": 0.01, "trainer.batch_size": 32}, "out of range"),
    ({"optim.lr": 0.01, "trainer.batch_size": True}, "out of range"),
    ({"optim.lr": "0.01", "trainer.batch_size": 64}, "out of range"),
    ({"optim.lr": 0.01}, "other keys"),
    ({"optim.lr": 0.01, "trainer.batch_size": 64, "model.width": 16}, "other keys"),
])
def test_a_sample_is_in_the_space_or_says_why_not(config, why):
    assert outside(config, SPACE) == why


def _run(root: Path, trials: dict[str, tuple[dict, list[float]]], **data) -> Path:
    """An output dir in the layout a search leaves (interrupted: no results.json)."""
    experiment = root / "search"
    experiment.mkdir(parents=True)
    cfg = SearchConfig().to_dict()
    cfg["data"].update(data)
    (experiment / "cifar_ray_config.json").write_text(json.dumps(cfg))
    for name, (params, accs) in trials.items():
        trial = experiment / f"run_trial_{name}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps(params))
        (trial / "result.json").write_text("".join(
            json.dumps({"val/acc": acc, "training_iteration": i + 1}) + "\n"
            for i, acc in enumerate(accs)) + '{"val/acc": 0.99, "training_it')  # killed mid-line
    return root


def _search_cfg(**flags) -> SearchConfig:
    cfg = SearchConfig()
    cfg.search = {"optim.lr": {"loguniform": [1e-4, 1e-1]},
                  "trainer.batch_size": {"choice": [64, 128]}}
    for key, value in flags.items():
        setattr(cfg.data, key, value)
    cfg.validate()
    return cfg


def test_earlier_trials_in_the_space_are_seeds_and_the_rest_are_counted(tmp_path):
    run = _run(tmp_path / "a", {"0": ({"optim.lr": 0.01, "trainer.batch_size": 64}, [0.5, 0.8, 0.7]),
                                "1": ({"optim.lr": 0.5, "trainer.batch_size": 64}, [0.1]),
                                "2": ({"optim.lr": 0.01}, [0.2]),
                                "3": ({"optim.lr": 0.02, "trainer.batch_size": 128}, [])})
    other = _run(tmp_path / "b", {"0": ({"optim.lr": 0.01, "trainer.batch_size": 64}, [0.9])},
                 image_size=64)
    with pytest.raises(UserError, match=r"no trial there lies in this search's space on the "
                                        r"same data \(1 on other data\)"):
        gather([str(other)], [], _search_cfg())
    found = gather([str(run)], ["optim.lr=0.003", "trainer.batch_size=128,optim.lr=0.001"],
                   _search_cfg())
    assert [(s.config, s.value, s.epochs) for s in found.seeds] == [
        ({"optim.lr": 0.01, "trainer.batch_size": 64}, 0.8, 3)]  # the half-written line: left out
    assert found.skipped == {"out of range": 1, "other keys": 1}
    assert found.tries == [{"optim.lr": 0.003}, {"trainer.batch_size": 128, "optim.lr": 0.001}]
    lines = "\n".join(found.lines())
    assert "seeded       1 earlier trial from" in lines and "2 earlier trials outside" in lines
    assert "--try        optim.lr=0.003 (run first)" in lines


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such folder"),
    (lambda p: p.mkdir() or p, "not a search's output dir"),
    (lambda p: _run(p, {"0": ({"optim.lr": 0.01}, [0.3])}) and
     (p / "search" / "run_trial_0" / "params.json").write_text("{not json") and p, "damaged"),
    (lambda p: _run(p, {}) and (p / "search" / "cifar_ray_config.json").write_text("[") and p,
     "damaged"),
    (lambda p: _run(p, {}), "no trial there lies in this search's space"),
])
def test_a_warm_start_folder_that_is_no_run_is_one_line(tmp_path, make, message):
    folder = make(tmp_path / "run")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message):
        gather([str(folder)], [], _search_cfg())
    assert sorted(tmp_path.rglob("*")) == before  # nothing touched


@pytest.mark.parametrize("text, message", [
    ("optim.lr", "expected KEY=VALUE"), ("model.width=16", "model.width is not searched"),
    ("optim.lr=1.5", "outside the search space"), ("trainer.batch_size=96", "outside the search"),
    ("optim.lr=[", "cannot read the value"),
])
def test_a_bad_try_is_one_line(text, message):
    cfg = _search_cfg()
    with pytest.raises(ConfigError, match=message):
        parse_try(text, cfg.space(), cfg.training_config())


def test_the_plan_says_what_will_be_searched_and_what_a_budget_buys(tmp_path):
    run = _run(tmp_path / "a", {"0": ({"optim.lr": 0.01, "optim.weight_decay": 1e-4,
                                       "trainer.batch_size": 256}, [0.6])})
    proc = run_cli("cifar_ray", "plan", "--config", "experiments/search.yaml", "--device", "cpu",
                   "--cpus-per-worker", "1", "--budget", "2h", "--plan-epoch-seconds", "30",
                   "--warm-start", str(run), "--try", "optim.lr=0.003", "--search-alg", "optuna",
                   "--search-seed", "7")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ["searcher     optuna: Optuna's TPE", "seed 7",
                 "searched     optim.lr: loguniform 0.0001 .. 0.1",
                 "searched     trainer.batch_size: choice of 128, 256, 512",
                 "seeded       1 earlier trial from", "--try        optim.lr=0.003 (run first)",
                 "budget       2.0 h for the whole run; ends by ", "it buys      about ",
                 "upper bounds tune.num_samples 16 (reached), trainer.epochs 24",
                 "ASHA         compares trials at epochs"]:
        assert line in out, (line, out)
    too_small = run_cli("cifar_ray.tune", "--plan", "--config", "experiments/search.yaml",
                        "--device", "cpu", "--cpus-per-worker", "1", "--budget", "1m",
                        "--plan-epoch-seconds", "30")
    assert too_small.returncode == 2
    assert too_small.stderr.strip().splitlines()[-1].startswith(
        "error: --budget 60 s is too small here for one trial to reach its first rung and a "
        "one-epoch retrain: give at least --budget 2m (given)")


def test_bad_head_start_and_budget_flags_answer_before_torch(tmp_path):
    data = ["--data-dir", str(tmp_path), "--config", "experiments/search_smoke.yaml"]
    searched = tmp_path / "epochs.yaml"
    searched.write_text("search:\n  trainer.epochs: {choice: [2, 4]}\n")
    calls = [[*data, f"--budget={text}"] for text in ("0", "-5m", "abc", "10y")]
    calls += [[*data, "--more", "3"], [*data, "--resume", "--try", "optim.lr=0.01"],
              [*data, "--resume", "--more", "-1"], ["--data-dir", str(tmp_path), "--config",
                                                     str(searched)]]
    codes, imported, stderr = mains_in_a_fresh_process("tune", calls)
    assert codes == [2] * len(calls) and set(imported) <= {"ray"}, (codes, imported, stderr)
    errors = stderr.strip().splitlines()
    assert len(errors) == len(calls), stderr
    assert "--more N adds trials to a search in the output dir: give it with --resume" in errors[4]
    assert "--resume alone goes on with the saved one" in errors[5]
    assert "--more must be in [1, 10000], got -1" in errors[6]
    assert "trainer.epochs cannot be searched: it is ASHA's maximum" in errors[7]


def test_help_under_a_config_marks_the_searched_keys(tmp_path):
    proc = run_cli("cifar_ray.tune", "--config", "experiments/search_smoke.yaml", "-h")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--lr FLOAT searched: loguniform 1e-05 .. 0.05" in text, text
    assert "--width WIDTH searched" not in text
    named = run_cli("cifar_ray", "plan", "-h")
    assert named.stdout.startswith("usage: cifar-ray plan"), named.stdout[:200]


def test_a_resumed_search_takes_its_budget_and_time_used_from_its_experiment(tmp_path):
    from cifar_ray.pipeline import BUDGET_FILE, budget_clock

    cfg = _search_cfg()
    cfg.tune.budget = "30m"
    experiment = tmp_path / cfg.tune.name
    experiment.mkdir()
    with pytest.raises(UserError, match="cifar_ray_budget.json is missing"):
        budget_clock(cfg, tmp_path, True, None, None)
    sized = _size(1800)
    (experiment / BUDGET_FILE).write_text(json.dumps({"sized": sized_to_dict(sized),
                                                      "used_s": 600.0}))
    clock = budget_clock(cfg, tmp_path, True, None, None)
    assert clock.sized == sized and clock.used() == pytest.approx(600.0, abs=1.0)
    (experiment / BUDGET_FILE).write_text('{"sized": {"budget_s": 1}, "used_s": 1}')
    with pytest.raises(UserError, match="is damaged"):
        budget_clock(cfg, tmp_path, True, None, None)


from hypothesis import given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_hostile import QUICK  # noqa: E402

JSONISH = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers()
                       | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(["optim.lr", "trainer.batch_size",
                                                          "val/acc", "training_iteration",
                                                          "data", "x"]), inner, max_size=4),
                       max_leaves=12)
FILE = st.one_of(st.binary(max_size=300), JSONISH.map(lambda v: json.dumps(v).encode()))


@hypothesis_settings(**QUICK)
@given(config=FILE, params=FILE, result=st.lists(FILE, max_size=4), link=st.booleans())
def test_any_warm_start_folder_is_seeds_or_one_line(config, params, result, link):
    """Whatever an earlier run's files hold (bytes, JSON of any shape, a link where a file
    was): its trials are seeds in the space, or the folder is refused in one line."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "search" / "run_trial_0"
        trial.mkdir(parents=True)
        (Path(tmp) / "search" / "cifar_ray_config.json").write_bytes(config)
        (trial / "params.json").write_bytes(params)
        (trial / "result.json").write_bytes(b"\n".join(result))
        if link:
            (trial / "params.json").unlink()
            (trial / "params.json").symlink_to(Path(tmp) / "search" / "cifar_ray_config.json")
        try:
            found = gather([tmp], [], _search_cfg())
        except UserError as exc:
            assert "\n" not in str(exc)
            return
        assert all(outside(s.config, _search_cfg().space()) is None for s in found.seeds)


@hypothesis_settings(**QUICK)
@given(text=st.text(max_size=30))
def test_any_budget_or_try_text_is_read_or_one_line(text):
    try:
        seconds = parse_budget(text)
        assert seconds is None or 0 < seconds <= 30 * 86400
    except ConfigError as exc:
        assert "\n" not in str(exc)
    cfg = _search_cfg()
    try:
        config = parse_try(text, cfg.space(), cfg.training_config())
        assert outside(config, {k: cfg.space()[k] for k in config}) is None
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_a_resumed_search_keeps_its_budget_given_again_or_not():
    from cifar_ray.pipeline import keep_budget

    saved = {"tune": {"budget": "20m"}}
    for given in ("", "20m", "20 min", "1200s"):
        cfg = _search_cfg()
        cfg.tune.budget = given
        assert keep_budget(saved, cfg) == "20m" and cfg.tune.budget == "20m"
    cfg.tune.budget = "30m"
    with pytest.raises(UserError, match=r"started with --budget 20m, not --budget 30m"):
        keep_budget(saved, cfg)
    with pytest.raises(UserError, match=r"started with no budget, not --budget 30m"):
        keep_budget({"tune": {}}, cfg)


def test_an_earlier_trials_odd_epoch_counts_are_no_crash(tmp_path):
    run = _run(tmp_path / "a", {})
    trial = run / "search" / "run_trial_0"
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps({"optim.lr": 0.01, "trainer.batch_size": 64}))
    (trial / "result.json").write_text(
        '{"val/acc": 0.4, "training_iteration": [1]}\n{"val/acc": 0.5, "training_iteration": '
        'Infinity}\n{"val/acc": 0.6, "training_iteration": 1e300}\n')
    assert [(s.value, s.epochs) for s in gather([str(run)], [], _search_cfg()).seeds] == [(0.6, 0)]


def test_a_searchs_rounds_are_those_tune_saved_in_order(tmp_path):
    from cifar_ray.search.rounds import rounds_of

    for name, saved in [("more-10", True), ("more-2", True), ("more-3", False), ("more-x", True),
                        ("more-01", True)]:
        (tmp_path / name).mkdir()
        if saved:
            (tmp_path / name / "experiment_state-1.json").write_text("{}")
    (tmp_path / "more-4").symlink_to(tmp_path / "more-2")
    assert rounds_of(tmp_path) == [tmp_path, tmp_path / "more-2", tmp_path / "more-10"]
