"""What a search starts from besides its own samples (README.md, "A head start"): earlier
runs' trials (`--warm-start DIR`, read from their JSON files only, each bounded) and a user's
own configs (`--try`). No Ray here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_ray.config import YamlLoader, overlay, plain
from cifar_ray.errors import ConfigError, UserError
from cifar_ray.names import METRIC, shown_name

SAVED_CONFIG = "cifar_ray_config.json"  # the settings a search started with (for --resume)
MAX_RESULT_BYTES = 64 * 2**20  # a trial's result.json: about 2 KB an epoch, MAX_EPOCHS of them
MAX_SMALL_BYTES = 2**20  # a config, a trial's params.json
MAX_RUN_TRIALS = 10_000  # search.settings.MAX_TRIALS
# Two runs' trials compare on the same data set at the same size (a subset ranks alike).
SAME_DATA = ("dataset", "image_size")


@dataclass
class Seed:
    """An earlier trial: its sample, its best validation accuracy, from `source` (a run)."""

    config: dict[str, Any]
    value: float
    epochs: int
    source: str


@dataclass
class Seeds:
    seeds: list[Seed] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> trials
    tries: list[dict[str, Any]] = field(default_factory=list)
    metric: str = METRIC  # what the seeds' values are (tune.metric)

    def best(self) -> Seed | None:
        return max(self.seeds, key=lambda s: s.value, default=None)

    def lines(self) -> list[str]:
        """The plan's lines: the seeded trials, those skipped and why, and the --try configs."""
        out = []
        if self.seeds:
            best = self.best()
            out.append(f"  seeded       {len(self.seeds)} earlier trial"
                       f"{'s' if len(self.seeds) > 1 else ''} from "
                       f"{', '.join(sorted({s.source for s in self.seeds}))}; best {self.metric} "
                       f"{best.value:.4f} at {describe(best.config)}")
        if self.skipped:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            out.append(f"  not seeded   {sum(self.skipped.values())} earlier trials outside this "
                       f"search ({why})")
        for config in self.tries:
            out.append(f"  --try        {describe(config)} (run first)")
        return out


def describe(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in config.items())


def outside(config: dict[str, Any], space: dict[str, tuple[str, list]]) -> str | None:
    """Why a sample lies outside `space` (parsed: {key: (distribution, arguments)}), or None."""
    if set(config) != set(space):
        return "other keys"
    for key, (name, args) in space.items():
        value = config[key]
        if name == "choice":
            if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
                return "out of range"
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return "out of range"
        high = args[1] - 1 if name == "randint" else args[1]
        if not args[0] <= value <= high or (name == "randint" and value != int(value)):
            return "out of range"
    return None


def parse_try(text: str, space: dict[str, tuple[str, list]], base) -> dict[str, Any]:
    """`--try optim.lr=0.01,optim.weight_decay=5e-4` -> {key: value}, each value read as YAML
    reads it, in this search's space; the keys it leaves out are sampled."""
    import yaml

    config: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--try {text!r}: expected KEY=VALUE,KEY=VALUE, e.g. "
                              "optim.lr=0.01,optim.weight_decay=5e-4")
        if key not in space:
            raise ConfigError(f"--try {text!r}: {key} is not searched (searched: "
                              f"{', '.join(space)}); set a fixed value with its flag")
        try:
            config[key] = yaml.load(value.strip(), Loader=YamlLoader)
        except (yaml.YAMLError, ValueError):
            raise ConfigError(f"--try {text!r}: cannot read the value of {key}") from None
    if outside(config, {k: space[k] for k in config}):
        raise ConfigError(f"--try {text!r}: a value lies outside the search space "
                          f"({'; '.join(f'{k} {n} {a}' for k, (n, a) in space.items() if k in config)})")
    try:
        overlay(base, config)
    except ConfigError as exc:
        raise ConfigError(f"--try {text!r}: does not fit: {exc}") from None
    return config


def read_json(path: Path, limit: int) -> Any:
    """JSON from a plain file of at most `limit` bytes; ValueError (with the reason) if not."""
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{path} is not a plain file")
    if path.stat().st_size > limit:
        raise ValueError(f"{path} is larger than {limit:,} bytes")
    return json.loads(path.read_text(encoding="utf-8"))


def experiments_of(folder: Path) -> list[Path]:
    """The search experiments (and --more rounds) an output dir or experiment folder holds."""
    found = [folder] if (folder / SAVED_CONFIG).is_file() else []
    if not found and folder.is_dir():
        found = sorted(p.parent for p in folder.glob(f"*/{SAVED_CONFIG}"))
        results = folder / "results.json"
        if not found and results.is_file():  # tune.storage elsewhere: results.json names it
            where = Path(str(read_json(results, MAX_SMALL_BYTES).get("experiment_dir", "")))
            found = [where] if (where / SAVED_CONFIG).is_file() else []
    rounds = [r for e in found for r in sorted(e.glob("more-*")) if r.is_dir()]
    return found + rounds


def trial_seed(trial: Path, source: str, metric: str = METRIC) -> Seed | None:
    """An earlier trial from Tune's params.json and result.json (a killed run's half-written
    line left out); None if it reported nothing."""
    params = read_json(trial / "params.json", MAX_SMALL_BYTES)
    if not isinstance(params, dict):
        raise ValueError(f"{trial / 'params.json'} is not a trial's sample")
    results = trial / "result.json"
    if results.is_symlink() or not results.is_file():
        return None
    if results.stat().st_size > MAX_RESULT_BYTES:
        raise ValueError(f"{results} is larger than {MAX_RESULT_BYTES:,} bytes")
    best, epochs = None, 0
    for line in results.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        value = row.get(metric) if isinstance(row, dict) else None
        if finite(value):
            best = value if best is None else max(best, value)
            epoch = row.get("training_iteration")
            epochs = max(epochs, int(epoch) if finite(epoch) and epoch < 2**31 else 0)
    if best is None:
        return None
    return Seed({k: plain(v) for k, v in params.items()}, float(best), epochs, source)


def finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def read_run(folder: Path, cfg, space: dict[str, tuple[str, list]], found: Seeds) -> None:
    """An earlier run's trials into `found`: those in `space` on the same data as seeds, the
    others counted by reason. UserError (one line) for a folder that is no run or is damaged."""
    shown = shown_name(str(folder))
    if not folder.is_dir():
        raise UserError(f"--warm-start {shown}: no such folder")
    try:
        experiments = experiments_of(folder)
        if not experiments:
            raise UserError(f"--warm-start {shown}: not a search's output dir (no "
                            f"{SAVED_CONFIG} in it or a folder below)")
        for experiment in experiments:
            saved = read_json(_config_of(experiment), MAX_SMALL_BYTES)
            data = saved.get("data", {}) if isinstance(saved, dict) else {}
            other_data = any(data.get(k) != getattr(cfg.data, k) for k in SAME_DATA) or (
                cfg.data.dataset == "folder"
                and data.get("data_dir") != str(Path(cfg.data.data_dir).expanduser().resolve()))
            trials = sorted(p for p in experiment.iterdir() if p.name.startswith("run_trial_")
                            and p.is_dir() and not p.is_symlink())[:MAX_RUN_TRIALS]
            for trial in trials:
                seed = trial_seed(trial, shown, found.metric)
                if seed is None:
                    continue
                why = "on other data" if other_data else outside(seed.config, space)
                if why:
                    found.skipped[why] = found.skipped.get(why, 0) + 1
                else:
                    found.seeds.append(seed)
    except (OSError, ValueError, RecursionError, AttributeError) as exc:
        raise UserError(f"--warm-start {shown}: damaged ({shown_name(str(exc), 200)})") from None


def _config_of(experiment: Path) -> Path:
    """A --more round's settings are its search's."""
    own = experiment / SAVED_CONFIG
    return own if own.is_file() else experiment.parent / SAVED_CONFIG


def gather(folders: list[str], tries: list[str], cfg) -> Seeds:
    """--warm-start's runs and --try's configs, checked against `cfg` (a SearchConfig);
    UserError when a run holds no trial in this search's space."""
    space = cfg.space()
    found = Seeds(metric=cfg.tune.metric)
    for text in folders:
        before = len(found.seeds)
        read_run(Path(text).expanduser().resolve(), cfg, space, found)
        if len(found.seeds) == before:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(found.skipped.items()))
            raise UserError(f"--warm-start {shown_name(text)}: no trial there lies in this "
                            f"search's space on the same data ({why or 'no trial reported'}); "
                            "nothing to start from")
    found.tries = [parse_try(text, space, cfg.training_config()) for text in tries]
    if len(found.tries) > cfg.tune.num_samples:
        raise UserError(f"--try gives {len(found.tries)} configs but tune.num_samples is "
                        f"{cfg.tune.num_samples}: raise --num-samples")
    return found


SEEDS_FILE = "cifar_ray_seeds.json"  # in the experiment: what it started from, for its report


def save_seeds(found: Seeds, path: Path) -> None:
    from cifar_ray.files import write_json

    write_json(path, {"seeds": [vars(s) for s in found.seeds], "skipped": found.skipped,
                      "tries": found.tries})


def remembered(path: Path, given: Seeds | None) -> Seeds | None:
    """A resumed search's head start: what it started with (SEEDS_FILE), and what this
    command adds for a --more round. UserError if the file is damaged."""
    if not path.is_file():
        return given
    try:
        saved = read_json(path, MAX_RESULT_BYTES)
        found = Seeds([Seed(**s) for s in saved["seeds"]], dict(saved["skipped"]),
                      list(saved["tries"]))
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise UserError(f"--resume: {path} is damaged ({type(exc).__name__}); start again "
                        "with --overwrite") from None
    if given is not None:
        found.metric = given.metric
        found.seeds += given.seeds
        found.tries += [t for t in given.tries if t not in found.tries]
        for reason, n in given.skipped.items():
            found.skipped[reason] = found.skipped.get(reason, 0) + n
    return found
