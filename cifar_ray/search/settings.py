"""The search's config: a training config plus the search space, Tune's settings and the
retrain. The space is written in the training config's own keys (`optim.lr: {loguniform:
[0.0001, 0.1]}`), and `parse_space` checks all of it before anything starts."""

from __future__ import annotations

import difflib
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from cifar_ray.config import (
    MAX_EPOCHS,
    MAX_SEED,
    MAX_WORKERS,
    Config,
    TrainerConfig,
    check,
    keys,
    overlay,
    plain,
    setting,
    validate,
)
from cifar_ray.errors import ConfigError
from cifar_ray.names import METRIC, METRICS, shown_name
from cifar_ray.search.budget import parse_budget
from cifar_ray.search.objectives import (
    COST_KEYS,
    LATENCY,
    check_table_covers,
    parse_objectives,
    parse_pick,
    read_latency_table,
)

# Ray Tune's helpers, by name -> the arguments each takes (`search.tune_space` calls them).
DISTRIBUTIONS = {
    "loguniform": "[low, high], low > 0",
    "uniform": "[low, high]",
    "qloguniform": "[low, high, q], low > 0: rounded to a multiple of q",
    "quniform": "[low, high, q]: rounded to a multiple of q",
    "randint": "[low, high]: an int, high excluded",
    "choice": "[value, ...]",
}
FLOAT_ONLY = ("loguniform", "uniform", "qloguniform", "quniform")
SEARCH_ALGS = ("random", "optuna", "nsga2")  # search.searchers builds each
# tune.name is a folder that --overwrite deletes: a plain name, none of the search's own.
FOLDER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
# What a search writes at the top of its output dir (README, "Outputs"), folders and files.
OUTPUT_NAMES = ("retrain", "gradcam", "report", "logs", "tmp", "results.json", "report.html",
                "summary.md", "trials.csv")
MAX_TRIALS, MAX_CPUS = 10_000, 1024

DEFAULT_SPACE = {
    "optim.lr": {"loguniform": [1e-4, 1e-1]},
    "optim.weight_decay": {"loguniform": [1e-6, 1e-3]},
    "trainer.batch_size": {"choice": [128, 256, 512]},
}


def _closest(key: str, known: list[str]) -> str:
    """' (did you mean 'optim.lr'?)' for a mistyped key or a bare field name, else ''."""
    by_field = [k for k in known if k.split(".", 1)[1] == key.rsplit(".", 1)[-1]]
    close = by_field or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_space(space: Any, base: Config) -> dict[str, tuple[str, list]]:
    """Check a `search:` section against the training config `base`; return
    {key: (distribution, arguments)}. ConfigError (one line) on any mistake."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("search: expected a mapping of config keys to distributions, "
                          "e.g. optim.lr: {loguniform: [0.0001, 0.1]}")
    known = keys(base)
    parsed = {}
    for key, spec in space.items():
        where = f"search {key}"
        if key not in known:
            raise ConfigError(f"search: unknown config key '{key}'{_closest(str(key), list(known))}")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: expected one distribution, e.g. {{choice: [1, 2]}}, "
                              f"got {spec!r}")
        (name, args), = spec.items()
        if name not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution '{name}' "
                              f"(valid: {', '.join(DISTRIBUTIONS)})")
        check(isinstance(args, list), f"{where}: {name} takes {DISTRIBUTIONS[name]}, got {args!r}")
        kind = known[key]
        check(key != "data.image_size" or name == "choice", f"{where}: image sizes are "
              "multiples of 8: use choice: [...]")
        if name == "choice":
            check(len(args) > 0, f"{where}: choice needs at least one value")
            values = args
        else:
            size = 3 if name.startswith("q") else 2
            check(len(args) == size and all(_number(a) for a in args),
                   f"{where}: {name} takes {DISTRIBUTIONS[name]}, got {args!r}")
            check(kind in (int, float), f"{where}: {key} is a {kind.__name__}; "
                                         f"use choice: [...]")
            check(name not in FLOAT_ONLY or kind is float,
                   f"{where}: {name} samples floats, but {key} is an int; use randint or choice")
            low, high = args[:2]
            check(low < high, f"{where}: empty or inverted range {args!r}")
            check("log" not in name or low > 0,
                   f"{where}: {name} needs low > 0, got {low}")
            check(args[size - 1] > 0 or size == 2, f"{where}: q must be > 0, got {args[-1]}")
            check(name != "randint" or all(isinstance(a, int) for a in args),
                   f"{where}: randint takes int bounds, got {args!r}")
            values = [low, high - 1] if name == "randint" else [low, high]
        for value in values:  # each choice / bound must make a valid config
            try:
                overlay(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"{where}: {value!r} does not fit: {exc}") from None
        parsed[key] = (name, list(args))
    return parsed


def _installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def configure_auth(address: str) -> None:
    """Token authentication and where a local instance listens (127.0.0.1 only), decided
    before Ray is imported (Ray reads both when imported): a local instance gets a fresh
    random token in this process's environment (never printed or written to the home
    directory) unless the user gives one; a cluster uses the token set up for it."""
    if address != "local":
        return
    # Ray's single-machine mode (its default on macOS): every process, gRPC and metrics
    # server binds to 127.0.0.1, not to every interface; nothing can join this instance.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def ray_sampler(name: str, args: list):
    """Tune's sampler of one parsed key (tune.loguniform(...), tune.choice([...]))."""
    from ray.tune.search import sample

    return sample.choice(args) if name == "choice" else getattr(sample, name)(*args)


def check_samplers(parsed: dict[str, tuple[str, list]], base: Config) -> None:
    """At parse time, each range as the search uses it: Ray's sampler and Optuna's
    distribution built, Ray's draws laid over the config as a trial lays them."""
    import numpy as np

    for key, (name, args) in parsed.items():
        where = f"search.{key} ({name} {args!r})"
        try:
            optuna_distribution(name, args)
            values = ray_sampler(name, args).sample(size=32, random_state=np.random.default_rng(0))
        except Exception as exc:  # Ray's and Optuna's own words for a range they refuse
            raise ConfigError(f"{where}: the search cannot sample it: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from None
        for value in values:
            try:
                overlay(base, {key: value})
            except (ConfigError, OverflowError, ValueError) as exc:
                raise ConfigError(f"{where}: it draws {plain(value)!r}, which does not fit: "
                                  f"{exc}") from None


def search_flag(text: str) -> tuple[str, dict[str, list]]:
    """`--search optim.lr=loguniform:1e-4,1e-1` -> ('optim.lr', {'loguniform': [0.0001, 0.1]}),
    its values read as YAML reads them."""
    import yaml

    from cifar_ray.config import YamlLoader

    key, sep, rest = text.partition("=")
    name, colon, values = rest.partition(":")
    if not sep or not colon or not key.strip() or not name.strip():
        raise ConfigError(f"--search {text!r}: expected KEY=DISTRIBUTION:VALUE,VALUE,..., e.g. "
                          "optim.lr=loguniform:1e-4,1e-1 or trainer.batch_size=choice:128,256")
    try:
        args = [yaml.load(v.strip(), Loader=YamlLoader) for v in values.split(",")] \
            if values.strip() else []
    except (yaml.YAMLError, ValueError):
        raise ConfigError(f"--search {text!r}: cannot read its values") from None
    return key.strip(), {name.strip(): args}


def optuna_distribution(name: str, args: list):
    """The Optuna distribution of one parsed key (what the report's figures and importance
    read; Ray's OptunaSearch converts Tune's helpers the same way for the search itself)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if name == "choice":
        return CategoricalDistribution(args)
    if name == "randint":
        return IntDistribution(args[0], args[1] - 1)
    step = args[2] if name == "quniform" else None  # Optuna has no quantised log scale
    return FloatDistribution(args[0], args[1], log="log" in name, step=step)


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def describe(values: dict[str, Any]) -> str:
    """'optim.lr=0.003 trainer.batch_size=256': a sample, for the console and summaries."""
    return " ".join(f"{key}={format_value(value)}" for key, value in values.items())


@dataclass
class TuneSettings:
    num_samples: int = setting(16, "trials to sample from the search space")
    max_concurrent: int = setting(0, "trials at once (0: as many as the cluster's resources hold)")
    grace_period: int = setting(2, "ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: int = setting(3, "ASHA: keep the best 1/reduction_factor at each rung")
    workers_per_trial: int = setting(1, "Ray Train workers per trial (DDP when > 1)")
    cpus_per_worker: int = setting(-1, "CPUs each worker reserves, also its DataLoader processes "
                                       "(-1: those the GPUs' trials leave, up to 4; 1 without GPUs)")
    gpus_per_worker: float = setting(-1.0, "GPUs each worker reserves (-1: a quarter, four trials per GPU, if "
                                             "the cluster has GPUs, else 0)")
    max_failures: int = setting(2, "retries of a trial whose worker dies, from its last checkpoint")
    address: str = setting("local", "local (start Ray here), auto, or HOST:PORT of a running cluster")
    storage: str = setting("", "where trials write results; must be shared storage on a multi-node "
                          "cluster (default: the output dir)")
    name: str = setting("search", "name of the Tune experiment folder inside the output dir "
                                    "(or tune.storage)")
    search_alg: str = setting("random", "how trials are sampled: optuna is Optuna's TPE, which "
                                        "learns from the finished trials (ASHA still stops the "
                                        "weak ones); nsga2 is Optuna's NSGA-II, for several "
                                        "objectives", SEARCH_ALGS)
    search_seed: int = setting(0, "seed of the search's sampler")
    metric: str = setting(METRIC, "what ASHA, the trials' checkpoints, the choice of the best "
                                  "trial and the retrain's best epoch go by (balanced_acc or f1 "
                                  "for imbalanced classes)", tuple(METRICS))
    objectives: str = setting("", "what the search optimises, comma-separated: one validation "
                                  "score and any of latency_ms (batch 1), batch_latency_ms "
                                  "(--latency-batch), params, flops, e.g. val/acc,latency_ms; "
                                  "several: ASHA promotes by Pareto rank (empty: tune.metric "
                                  "alone)")
    pick: str = setting("", "with several objectives, which trial is retrained: the most "
                            "accurate that meets these, e.g. 'latency_ms <= 2, params <= 1e6' "
                            "(empty: the most accurate)")
    latency_batch: int = setting(32, "the batch size batch_latency_ms is measured at")
    latency_table: str = setting("", "a CSV of latencies measured on the device the model "
                                     "will run on: a column per shape key it varies "
                                     "(model.width, model.res_blocks, data.image_size, "
                                     "eval.tta), then latency_ms and/or batch_latency_ms; "
                                     "trials look theirs up instead of timing here")
    budget: str = setting("", "the whole run's time (20m, 2h, 1.5h): the search, the retrain, "
                              "test, GradCAM and report end within it; it decides the epochs, "
                              "ASHA's rungs and the retrain's epochs, your values their upper "
                              "bounds (empty: no budget)")


@dataclass
class TrackingSettings:
    mlflow_uri: str = setting("", "MLflow tracking URI (http://..., sqlite:///path.db, databricks); "
                                  "empty: MLflow is off")
    mlflow_experiment: str = setting("cifar_ray", "MLflow experiment that holds the runs")


@dataclass
class RetrainSettings:
    init: str = setting("checkpoint", "checkpoint: start from the best trial's weights",
                        ("checkpoint", "scratch"))
    retrain_epochs: int = setting(24, "epochs of the final retrain on train + validation")


@dataclass
class SearchConfig(Config):
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(output_dir="outputs/search"))
    search: dict = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SPACE.items()})
    tune: TuneSettings = field(default_factory=TuneSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    def space(self) -> dict[str, tuple[str, list]]:
        """The checked search space: {key: (distribution, arguments)}."""
        return parse_space(self.search, self.training_config())

    def check_space(self) -> None:
        """The space through Ray's samplers (check_samplers): a command calls it once, after
        configure_auth, since it imports Ray."""
        check_samplers(self.space(), self.training_config())

    def objectives(self) -> list[str]:
        """tune.objectives as names, the validation score first (tune.metric alone if empty)."""
        names = parse_objectives(self.tune.objectives, self.tune.metric)
        return sorted(names, key=lambda n: n not in METRICS)

    def constraints(self) -> list:
        return parse_pick(self.tune.pick, self.objectives())

    def largest_image_size(self) -> int:
        """The largest data.image_size a trial may take: the data set is read once, at it."""
        name, sizes = self.space().get("data.image_size", ("choice", [self.data.image_size]))
        return max(sizes)

    def validate(self) -> None:
        validate(self)
        self.space()
        t, r = self.tune, self.retrain
        check(1 <= t.num_samples <= MAX_TRIALS,
              f"tune.num_samples must be in [1, {MAX_TRIALS}], got {t.num_samples}")
        check(0 <= t.max_concurrent <= MAX_TRIALS,
              f"tune.max_concurrent must be in [0, {MAX_TRIALS}], got {t.max_concurrent}")
        check(1 <= t.grace_period <= self.trainer.epochs,
               f"tune.grace_period must be in [1, epochs={self.trainer.epochs}], got {t.grace_period}")
        check(2 <= t.reduction_factor <= 100,
              f"tune.reduction_factor must be in [2, 100], got {t.reduction_factor}")
        check(1 <= t.workers_per_trial <= MAX_WORKERS,
              f"tune.workers_per_trial must be in [1, {MAX_WORKERS}], got {t.workers_per_trial}")
        check(t.cpus_per_worker == -1 or 1 <= t.cpus_per_worker <= MAX_CPUS,
              f"tune.cpus_per_worker must be -1 (auto) or in [1, {MAX_CPUS}], "
              f"got {t.cpus_per_worker}")
        check(t.gpus_per_worker == -1 or 0 <= t.gpus_per_worker <= 64,
               f"tune.gpus_per_worker must be -1 (auto) or in [0, 64], got {t.gpus_per_worker}")
        check(-1 <= t.max_failures <= 100, f"tune.max_failures must be in [-1, 100], got {t.max_failures}")
        check(0 <= t.search_seed <= MAX_SEED,
              f"tune.search_seed must be in [0, {MAX_SEED}], got {t.search_seed}")
        check(t.search_alg in SEARCH_ALGS,
               f"tune.search_alg must be one of {SEARCH_ALGS}, got '{t.search_alg}'")
        check(re.fullmatch(FOLDER_NAME, t.name) is not None and t.name not in OUTPUT_NAMES,
              f"tune.name must be a plain folder name (letters, digits, '_', '-', '.', not "
              f"starting with '.') other than the output dir's own {', '.join(OUTPUT_NAMES)}; "
              f"got {t.name!r}")
        parse_budget(t.budget)
        check(t.metric in METRICS, f"tune.metric must be one of {', '.join(METRICS)}, "
                                   f"got {t.metric!r}")
        self.check_objectives()
        check("trainer.epochs" not in self.search,
              "search: trainer.epochs cannot be searched: it is ASHA's maximum, which every "
              "trial's epochs are counted against; set it with --epochs (ASHA stops weak trials "
              "early)")
        check(r.init in ("checkpoint", "scratch"),
               f"retrain.init must be checkpoint or scratch, got '{r.init}'")
        check(1 <= r.retrain_epochs <= MAX_EPOCHS,
              f"retrain.retrain_epochs must be in [1, {MAX_EPOCHS}], got {r.retrain_epochs}")

    def check_objectives(self) -> None:
        """The objectives and the pick; tune.metric becomes the objectives' validation score
        (a different one given with it is a contradiction)."""
        t = self.tune
        score = self.objectives()[0]
        check(t.metric in (score, METRIC), f"tune.metric {t.metric} and tune.objectives "
                                            f"{shown_name(t.objectives)} name different scores: "
                                            "give one")
        t.metric = score
        if len(self.objectives()) > 1:  # one spelling: a resumed search compares it as text
            t.objectives = ",".join(self.objectives())
        check(1 <= t.latency_batch <= 1024,
              f"tune.latency_batch must be in [1, 1024], got {t.latency_batch}")
        self.constraints()
        check(not t.pick or len(self.objectives()) > 1,
              "tune.pick chooses among several objectives: give them with --objectives")
        check(not set(LATENCY) & set(self.objectives())
              or _installed("onnxruntime", "onnxscript", "onnx"),
              "latency objectives need ONNX Runtime and torch's ONNX exporter: "
              "pip install 'cifar_ray[export]'")

    def check_costs(self) -> None:
        """Costs as objectives need a search of what changes them, and a latency table a
        row for every shape it can draw (the space whole: after the command's --search)."""
        check(len(self.objectives()) == 1 or set(COST_KEYS) & set(self.search),
              f"tune.objectives {self.tune.objectives}: every trial's model would cost the "
              f"same; search what changes it ({', '.join(COST_KEYS)})")
        if self.tune.latency_table:
            check(bool(set(LATENCY) & set(self.objectives())),
                  "tune.latency_table gives latencies: add latency_ms to --objectives")
            fixed = {k: getattr(getattr(self, k.split(".")[0]), k.split(".")[1])
                     for k in COST_KEYS}
            check_table_covers(read_latency_table(self.tune.latency_table),
                               self.tune.latency_table, self.space(), fixed, self.objectives())
