"""Run configuration: dataclasses, YAML loading, command-line overrides, validation.

A config is a YAML file of sections (see `experiments/default.yaml`); each leaf is a field of one
of the dataclasses below, and every field is also a command-line flag (`optim.lr` -> `--lr`),
so field names are unique across sections. Precedence: dataclass default < YAML < flag.
Ray Tune hands each trial a plain dict, which `Config.from_dict` turns back into a Config.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar_ray.errors import ConfigError

DATASETS = ("cifar10", "cifar100")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    dataset: str = _f("cifar10", "cifar10 or cifar100")
    data_dir: str = _f("data", "folder holding cifar-10-batches-py/ (downloaded there if missing)")
    val_size: int = _f(5000, "training images held out for validation (0: none)")
    limit_train: int = _f(0, "use only the first N training images after the split (0: all)")
    num_workers: int = _f(-1, "DataLoader worker processes (-1: one per CPU the run was given)")


@dataclass
class AugmentConfig:
    pad_to: int = _f(40, "pad images to this size before the random 32x32 crop")
    flip_p: float = _f(0.5, "probability of a horizontal flip")
    cutout_p: float = _f(0.5, "probability of cutting one hole out of an image")
    cutout_size: int = _f(8, "side of the square cutout hole, filled with the data set's mean")
    runs_on: str = _f("auto", "gpu: whole batches with tensor ops on the training device, the "
                              "data set held there; cpu: Albumentations per image in DataLoader "
                              "workers; auto: gpu when training on CUDA, else cpu")


@dataclass
class ModelConfig:
    width: int = _f(64, "channels of the prep layer; later layers are 2x, 4x, 8x (64 = ResNet-9)")


@dataclass
class OptimConfig:
    lr: float = _f(0.01, "peak learning rate of the one-cycle schedule (Adam)")
    weight_decay: float = _f(1e-4, "Adam weight decay")
    pct_start: float = _f(5 / 24, "fraction of the steps spent warming up to the peak")
    div_factor: float = _f(100.0, "initial lr = lr / div_factor")
    final_div_factor: float = _f(100.0, "final lr = initial lr / final_div_factor")


@dataclass
class TrainerConfig:
    epochs: int = _f(24, "training epochs")
    batch_size: int = _f(512, "images per batch")
    accelerator: str = _f("auto", "cpu, gpu or auto")
    devices: int = _f(1, "devices (GPUs) for this run")
    precision: str = _f("auto", "auto (bf16-mixed on GPU, 32-true on CPU) or a Lightning precision")
    seed: int = _f(1, "seed for the split, the weights and the augmentation")
    output_dir: str = _f("outputs/train", "where checkpoints, logs, plots and results go")
    progress_bar: bool = _f(True, "show Lightning's per-epoch progress bar")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Config":
        cfg = cls()
        apply_mapping(cfg, raw, source)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        validate(self)

    def training_config(self) -> "Config":
        """A copy of only the sections one training run needs (a search config carries more)."""
        return Config(**{f.name: copy.deepcopy(getattr(self, f.name))
                         for f in dataclasses.fields(Config)})


# ---------------------------------------------------------------------------------------------
# Mapping YAML / dicts / flags onto the dataclasses


def sections(cfg: Any) -> dict[str, Any]:
    """Section name -> section dataclass instance."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _coerce(value: Any, kind: type, where: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # a nested structure (e.g. search spaces); validated by its owner
        return value
    raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")


def _field_type(section_obj: Any, name: str) -> type:
    hints = {f.name: f.type for f in dataclasses.fields(section_obj)}
    text = hints[name] if isinstance(hints[name], str) else hints[name].__name__
    return {"int": int, "float": float, "str": str, "bool": bool}.get(text, object)


def apply_mapping(cfg: Any, raw: Any, source: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    secs = sections(cfg)
    for sec_name, values in raw.items():
        if sec_name not in secs:
            raise ConfigError(f"{source}: unknown section '{sec_name}' (valid: {', '.join(secs)})")
        sec = secs[sec_name]
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{sec_name}' must be a mapping")
        names = [f.name for f in dataclasses.fields(sec)]
        for key, value in values.items():
            if key not in names:
                raise ConfigError(
                    f"{source}: unknown key '{sec_name}.{key}' (valid: {', '.join(names)})"
                )
            kind = _field_type(sec, key)
            setattr(sec, key, _coerce(value, kind, f"{source}: {sec_name}.{key}"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config {path}: YAML syntax error{line}: {problem}") from None


def add_config_flags(parser: argparse.ArgumentParser, cfg: Any) -> None:
    """One flag per leaf field (`--val-size`, `--lr`, ...), default None = 'not given'."""
    parser.add_argument("--config", help="YAML file of overrides (see experiments/)")
    for sec_name, sec in sections(cfg).items():
        group = parser.add_argument_group(sec_name)
        for f in dataclasses.fields(sec):
            kind = _field_type(sec, f.name)
            if kind is object:
                continue  # structured values come from YAML only
            flag = "--" + f.name.replace("_", "-")
            help_text = f"{f.metadata.get('help', '')} [default: {getattr(sec, f.name)}]"
            if kind is bool:
                group.add_argument(flag, dest=f"{sec_name}.{f.name}", default=None,
                                   action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag, dest=f"{sec_name}.{f.name}", default=None, type=kind,
                                   metavar=kind.__name__.upper(), help=help_text)


def resolve(cfg: Any, args: argparse.Namespace) -> Any:
    """Apply --config then the flags given on the command line to `cfg`; validate; return it."""
    if getattr(args, "config", None):
        apply_mapping(cfg, load_yaml(args.config), str(args.config))
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            sec_name, key = dest.split(".", 1)
            setattr(sections(cfg)[sec_name], key, value)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation: every rule is one readable line


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    d, a, m, o, t = cfg.data, cfg.augment, cfg.model, cfg.optim, cfg.trainer
    _check(d.dataset in DATASETS, f"data.dataset must be one of {DATASETS}, got '{d.dataset}'")
    _check(d.val_size >= 0, f"data.val_size must be >= 0, got {d.val_size}")
    _check(d.limit_train >= 0, f"data.limit_train must be >= 0, got {d.limit_train}")
    _check(d.num_workers >= -1, f"data.num_workers must be >= -1, got {d.num_workers}")
    _check(32 <= a.pad_to <= 64, f"augment.pad_to must be in [32, 64], got {a.pad_to}")
    _check(0 <= a.flip_p <= 1, f"augment.flip_p must be in [0, 1], got {a.flip_p}")
    _check(0 <= a.cutout_p <= 1, f"augment.cutout_p must be in [0, 1], got {a.cutout_p}")
    _check(1 <= a.cutout_size <= 32, f"augment.cutout_size must be in [1, 32], got {a.cutout_size}")
    _check(a.runs_on in ("auto", "gpu", "cpu"),
           f"augment.runs_on must be auto, gpu or cpu, got '{a.runs_on}'")
    _check(m.width >= 1, f"model.width must be >= 1, got {m.width}")
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(0 < o.pct_start < 1, f"optim.pct_start must be in (0, 1), got {o.pct_start}")
    _check(o.div_factor > 0, f"optim.div_factor must be > 0, got {o.div_factor}")
    _check(o.final_div_factor > 0, f"optim.final_div_factor must be > 0, got {o.final_div_factor}")
    _check(t.epochs >= 1, f"trainer.epochs must be >= 1, got {t.epochs}")
    _check(t.batch_size >= 1, f"trainer.batch_size must be >= 1, got {t.batch_size}")
    _check(t.accelerator in ACCELERATORS,
           f"trainer.accelerator must be one of {ACCELERATORS}, got '{t.accelerator}'")
    _check(t.devices >= 1, f"trainer.devices must be >= 1, got {t.devices}")
    _check(t.precision in PRECISIONS,
           f"trainer.precision must be one of {PRECISIONS}, got '{t.precision}'")
    _check(bool(t.output_dir), "trainer.output_dir must not be empty")


# ---------------------------------------------------------------------------------------------
# The search (`python -m cifar_ray.tune`): a training config plus three more sections


@dataclass
class SearchSpace:
    lr: list = _f([1e-4, 1e-1], "[min, max], sampled log-uniformly")
    weight_decay: list = _f([1e-6, 1e-3], "[min, max], sampled log-uniformly")
    batch_size: list = _f([128, 256, 512], "the choices")


@dataclass
class TuneSettings:
    num_samples: int = _f(16, "trials to sample from the search space")
    max_concurrent: int = _f(0, "trials at once (0: as many as the cluster's resources hold)")
    grace_period: int = _f(2, "ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: int = _f(3, "ASHA: keep the best 1/reduction_factor at each rung")
    workers_per_trial: int = _f(1, "Ray Train workers per trial (DDP when > 1)")
    cpus_per_worker: int = _f(1, "CPUs each worker reserves (also its DataLoader processes)")
    gpus_per_worker: float = _f(-1.0, "GPUs each worker reserves (-1: 1 if the cluster has GPUs, else 0)")
    max_failures: int = _f(2, "retries of a trial whose worker dies, from its last checkpoint")
    address: str = _f("local", "local (start Ray here), auto, or HOST:PORT of a running cluster")
    storage: str = _f("", "where trials write results; must be shared storage on a multi-node "
                          "cluster (default: the output dir)")
    name: str = _f("search", "name of the Tune experiment folder inside the output dir")
    search_seed: int = _f(0, "seed of the random search")


@dataclass
class RetrainSettings:
    init: str = _f("checkpoint", "checkpoint (start from the best trial's weights) or scratch")
    retrain_epochs: int = _f(24, "epochs of the final retrain on train + validation")


@dataclass
class SearchConfig(Config):
    search: SearchSpace = field(default_factory=SearchSpace)
    tune: TuneSettings = field(default_factory=TuneSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)

    def validate(self) -> None:
        validate(self)
        s, t, r = self.search, self.tune, self.retrain
        for key in ("lr", "weight_decay"):
            bounds = getattr(s, key)
            _check(isinstance(bounds, list) and len(bounds) == 2
                   and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds),
                   f"search.{key} must be [min, max], got {bounds!r}")
            _check(bounds[0] > 0, f"search.{key}: min must be > 0 for a log-uniform range, got {bounds[0]}")
            _check(bounds[0] < bounds[1], f"search.{key}: empty or inverted range {bounds!r}")
        _check(isinstance(s.batch_size, list) and len(s.batch_size) > 0
               and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in s.batch_size),
               f"search.batch_size must be a non-empty list of positive ints, got {s.batch_size!r}")
        _check(t.num_samples >= 1, f"tune.num_samples must be >= 1, got {t.num_samples}")
        _check(t.max_concurrent >= 0, f"tune.max_concurrent must be >= 0, got {t.max_concurrent}")
        _check(1 <= t.grace_period <= self.trainer.epochs,
               f"tune.grace_period must be in [1, epochs={self.trainer.epochs}], got {t.grace_period}")
        _check(t.reduction_factor >= 2, f"tune.reduction_factor must be >= 2, got {t.reduction_factor}")
        _check(t.workers_per_trial >= 1, f"tune.workers_per_trial must be >= 1, got {t.workers_per_trial}")
        _check(t.cpus_per_worker >= 1, f"tune.cpus_per_worker must be >= 1, got {t.cpus_per_worker}")
        _check(t.gpus_per_worker == -1 or t.gpus_per_worker >= 0,
               f"tune.gpus_per_worker must be -1 (auto) or >= 0, got {t.gpus_per_worker}")
        _check(t.max_failures >= -1, f"tune.max_failures must be >= -1, got {t.max_failures}")
        _check(bool(t.name) and "/" not in t.name, f"tune.name must be a folder name, got '{t.name}'")
        _check(r.init in ("checkpoint", "scratch"),
               f"retrain.init must be checkpoint or scratch, got '{r.init}'")
        _check(r.retrain_epochs >= 1, f"retrain.retrain_epochs must be >= 1, got {r.retrain_epochs}")
