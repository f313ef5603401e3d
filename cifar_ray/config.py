"""Run configuration: dataclass sections, YAML, one flag per field (`optim.lr` -> `--lr`),
validation. Precedence: default < YAML < flag. A leaf's dotted name (`optim.lr`) is its one
name everywhere, in a search space and in `overlay`, which lays a trial's sample over a config."""

from __future__ import annotations

import argparse
import copy
import math
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from cifar_ray.cli import shown
from cifar_ray.errors import ConfigError

DATASETS = ("cifar10", "cifar100", "folder")  # folder: your own images (image_folders.py)
DEVICES = ("auto", "cpu", "cuda")  # see runtime.py
ENGINES = ("auto", "albumentations", "tensors")  # see augment.py
BALANCES = ("none", "weights", "sampler")
TTA_VIEWS = {"off": 1, "hflip": 2, "flips": 4}  # eval.tta -> the views model.flip_views makes
TTAS = tuple(TTA_VIEWS)
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")
COMPILE_MODES = ("off", "default", "reduce-overhead")  # see module.py
MAX_WIDTH, MAX_RES_BLOCKS = 1024, 8
# A data set's classes (a confusion matrix is classes squared) and a class name's length.
MAX_CLASSES, MAX_CLASS_NAME = 1000, 200
# Upper bounds of counts that fork processes or size allocations: far past any real run.
MAX_WORKERS, MAX_BATCH, MAX_EPOCHS, MAX_SEED = 64, 65536, 10_000, 2**32 - 1
# Images are held decoded in memory (on the device, with the tensor engine): 50,000 at 256 px
# are 9.8 GB, and a step costs 64 times a 32-px one. Past that, this network is the wrong tool.
MAX_IMAGE_SIZE = 256


def resolve_precision(device: str, choice: str = "auto") -> str:
    """bf16 mixed precision on a GPU ('cuda'), full precision on a CPU, unless asked otherwise
    (here, so that the search's driver resolves it without torch)."""
    if choice != "auto":
        return choice
    return "bf16-mixed" if device == "cuda" else "32-true"


def setting(default: Any, help: str, choices: tuple | None = None) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    dataset: str = setting("cifar10", "folder: your own images in train/<class>/, test/<class>/ "
                                      "and optionally val/<class>/", DATASETS)
    data_dir: str = setting("data", "folder holding cifar-10-batches-py/ (downloaded there if "
                                    "missing), or the class folders")
    val_size: int = setting(-1, "training images held out for validation, stratified by class "
                                "(-1: a tenth, 5,000 of CIFAR-10's; 0: none)")
    limit_train: int = setting(0, "use only the first N training images after the split (0: all)")
    num_workers: int = setting(-1, "DataLoader worker processes (-1: one per CPU the run was given)")
    image_size: int = setting(32, "side in pixels every image is resized to (a multiple of 8 from 8 "
                                  f"to {MAX_IMAGE_SIZE}; 32: CIFAR's own, the classic ResNet-9)")
    balance: str = setting("none", "for imbalanced classes: weights: each class's loss weighted by "
                                   "1 / its share; sampler: batches drawn with each class equally "
                                   "likely", BALANCES)


@dataclass
class AugmentConfig:
    pad_to: int = setting(40, "pad to this size before the random crop back to 32 (at 32 pixels: "
                              "scaled with data.image_size)")
    flip_p: float = setting(0.5, "probability of a horizontal flip")
    vflip_p: float = setting(0.0, "probability of a vertical flip (for images with no up: "
                                  "parts, cells, aerial photos)")
    rot90_p: float = setting(0.0, "probability of a rotation by 90, 180 or 270 degrees (one of "
                                  "the three, equally likely)")
    color_p: float = setting(0.0, "probability of a random brightness and contrast change")
    brightness: float = setting(0.2, "with color_p: up to this fraction of white added or taken "
                                     "away")
    contrast: float = setting(0.2, "with color_p: contrast multiplied by 1 +- up to this")
    affine_p: float = setting(0.0, "probability of a small rotation and scaling, the corners "
                                   "filled with the mean")
    rotate: float = setting(10.0, "with affine_p: the largest rotation, in degrees either way")
    scale: float = setting(0.1, "with affine_p: the largest change of scale, either way "
                                "(0.1: 0.9x to 1.1x)")
    cutout_p: float = setting(0.5, "probability of cutting one hole out of an image")
    cutout_size: int = setting(8, "side of the square cutout hole, filled with the data set's mean "
                                  "(at 32 pixels: scaled with data.image_size)")
    engine: str = setting("auto", "tensors: whole batches with tensor ops on the training device, "
                                  "the data set held there; albumentations: one image at a time "
                                  "in DataLoader workers; auto: tensors when training on CUDA",
                          ENGINES)


@dataclass
class ModelConfig:
    width: int = setting(64, "channels of the prep layer; later layers are 2x, 4x, 8x (64 = ResNet-9)")
    res_blocks: int = setting(1, "the depth: residual blocks after the second and after the "
                                 "fourth convolution (1: ResNet-9; 0: five layers; 2: thirteen)")


@dataclass
class OptimConfig:
    lr: float = setting(0.01, "peak learning rate of the one-cycle schedule (Adam)")
    weight_decay: float = setting(1e-4, "Adam weight decay")
    pct_start: float = setting(5 / 24, "fraction of the steps spent warming up to the peak")
    div_factor: float = setting(100.0, "initial lr = lr / div_factor")
    final_div_factor: float = setting(100.0, "final lr = initial lr / final_div_factor")
    label_smoothing: float = setting(0.0, "share of each training target spread over all classes")
    ema_decay: float = setting(0.0, "an exponential moving average of the weights, updated each "
                                    "step with this decay, is what is validated, tested and saved "
                                    "(0: off)")


@dataclass
class EvalConfig:
    tta: str = setting("off", "test-time augmentation: average the model over the image and its "
                              "horizontal flip (hflip), or its four flips (flips), in validation, "
                              "test, GradCAM's choice of mistakes, predict, the app and the "
                              "export", TTAS)


@dataclass
class TrainerConfig:
    epochs: int = setting(24, "training epochs")
    batch_size: int = setting(512, "images per batch")
    device: str = setting("auto", "auto: cuda when there is a GPU", DEVICES)
    devices: int = setting(1, "devices (GPUs) for this run")
    precision: str = setting("auto", "auto: bf16-mixed on a GPU, 32-true on a CPU", PRECISIONS)
    compile: str = setting("off", "torch.compile the training forward on CUDA (reduce-overhead: "
                                  "CUDA graphs); costs seconds of compiling", COMPILE_MODES)
    seed: int = setting(1, "seed for the split, the weights and the augmentation")
    output_dir: str = setting("outputs/train", "where checkpoints, logs, plots and results go")
    progress_bar: bool = setting(True, "show Lightning's per-epoch progress bar")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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
            return value if isinstance(value, int) and abs(value) > 2**53 else float(value)
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
        if isinstance(sec, dict):  # a free-form section (the search space): replaced whole
            setattr(cfg, sec_name, dict(values))
            continue
        names = [f.name for f in dataclasses.fields(sec)]
        for key, value in values.items():
            if key not in names:
                raise ConfigError(
                    f"{source}: unknown key '{sec_name}.{key}' (valid: {', '.join(names)})"
                )
            kind = _field_type(sec, key)
            setattr(sec, key, _coerce(value, kind, f"{source}: {sec_name}.{key}"))


def keys(cfg: Config) -> dict[str, type]:
    """Every leaf of a training config by its dotted name ('optim.lr') -> its type."""
    return {f"{name}.{f.name}": _field_type(sec, f.name)
            for name, sec in sections(cfg.training_config()).items()
            for f in dataclasses.fields(sec)}


def flat(cfg: Config) -> dict[str, Any]:
    """Every leaf of a training config by its dotted name -> its value."""
    return {f"{name}.{key}": value for name, sec in sections(cfg.training_config()).items()
            for key, value in dataclasses.asdict(sec).items()}


def plain(value: Any) -> Any:
    """A Python value for a numpy scalar that Tune sampled (JSON and the checks take no numpy)."""
    return value.item() if hasattr(value, "item") else value


def overlay(cfg: Config, values: dict[str, Any]) -> Config:
    """A validated copy of the training config `cfg` with `values` ({'optim.lr': 0.003, ...})
    set: how a search trial's sample, and later the best one, becomes a run's config."""
    out = cfg.training_config()
    known = keys(out)
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'")
        value = plain(value)
        sec_name, name = key.split(".", 1)
        setattr(getattr(out, sec_name), name, _coerce(value, known[key], key))
    out.validate()
    return out


MAX_CONFIG_BYTES = 1 << 20


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does (`1e-3` is a float, not a
    string) and refusing aliases (a few nested `*name` lines can stand for gigabytes)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not supported in a config",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping; ConfigError (one line) for anything that is not a readable
    YAML file of at most MAX_CONFIG_BYTES."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path}: larger than {MAX_CONFIG_BYTES // 1024} KB; "
                          "is it a config file?")
    try:
        return yaml.load(data.decode("utf-8"), Loader=YamlLoader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config {path}: YAML syntax error{line}: {problem}") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # a date like 2026-13-45, ...
        raise ConfigError(f"config {path}: a value cannot be read ({exc})") from None


def purpose_of(path: str | Path) -> str:
    """What a config file is for: its opening comment, as one paragraph ("" without one)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096).splitlines()
    except OSError:
        return ""
    lines = []
    for line in head:
        if not line.startswith("#") or (lines and line.strip() == "#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines).strip()


def add_config_flags(parser: argparse.ArgumentParser, cfg: Any) -> None:
    """One flag per leaf field (`--val-size`, `--lr`, ...), default None = 'not given'; its
    help shows `cfg`'s value (the dataclass default, or what --config set: see parse_command)."""
    parser.add_argument("--config", metavar="YAML",
                        help="YAML file of overrides (see experiments/); the defaults shown "
                             "below include the one given")
    searched = getattr(cfg, "search", None) or {}
    for sec_name, sec in sections(cfg).items():
        if not dataclasses.is_dataclass(sec):
            continue  # a free-form section (the search space) comes from YAML only
        group = parser.add_argument_group(sec_name)
        for f in dataclasses.fields(sec):
            kind = _field_type(sec, f.name)
            if kind is object:
                continue  # structured values come from YAML only
            flag = "--" + f.name.replace("_", "-")
            value = getattr(sec, f.name)
            help_text = f.metadata.get("help", "")
            spec = searched.get(f"{sec_name}.{f.name}")
            if isinstance(spec, dict) and len(spec) == 1:  # a search samples it
                (name, values), = spec.items()
                help_text = f"searched: {range_text(name, values)} (--search to change); " + help_text
            elif value != "":
                help_text += f" (default: {shown(value)})"
            help_text = help_text.replace("%", "%%")
            if kind is bool:
                group.add_argument(flag, dest=f"{sec_name}.{f.name}", default=None,
                                   action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag, dest=f"{sec_name}.{f.name}", default=None, type=kind,
                                   choices=f.metadata.get("choices"),
                                   metavar=None if f.metadata.get("choices") else
                                   (f.name.upper() if kind is str else kind.__name__.upper()),
                                   help=help_text)


def range_text(name: str, args: Any) -> str:
    """A search space's distribution as a person reads it: 'loguniform 0.0001 .. 0.1',
    'choice of 128, 256' (search.settings checks the arguments)."""
    if not isinstance(args, list) or not args:
        return f"{name} {args!r}"
    if name == "choice":
        return "choice of " + ", ".join(map(shown_plain, args))
    if name == "randint" and len(args) == 2:
        return f"integers {args[0]} .. {args[1] - 1}"
    step = f" in steps of {shown_plain(args[2])}" if len(args) == 3 else ""
    return f"{name} {shown_plain(args[0])} .. {shown_plain(args[1])}{step}"


def shown_plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def apply_flags(cfg: Any, args: argparse.Namespace) -> None:
    """Sets every config flag given on the command line (a value other than None) on `cfg`."""
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            sec_name, key = dest.split(".", 1)
            setattr(sections(cfg)[sec_name], key, value)


def resolve(cfg: Any, args: argparse.Namespace) -> Any:
    """Apply --config then the flags given on the command line to `cfg`; validate; return it."""
    if getattr(args, "config", None):
        apply_mapping(cfg, load_yaml(args.config), str(args.config))
    apply_flags(cfg, args)
    cfg.validate()
    return cfg


def parse_command(build: Callable[[Any], argparse.ArgumentParser], cfg: Any,
                  argv: list[str] | None) -> tuple[Any, argparse.Namespace]:
    """A command's config and arguments: --config is read first, so that the parser `build`
    makes from `cfg` shows in -h the defaults that file gives; then every flag, validated."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    given, _ = first.parse_known_args(argv)
    if given.config:
        apply_mapping(cfg, load_yaml(given.config), str(given.config))
    args = build(cfg).parse_args(argv)
    apply_flags(cfg, args)
    cfg.validate()
    return cfg, args


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_finite(cfg: Any) -> None:
    """Every float setting is a finite number (a flag's `inf` or `nan` too)."""
    for name, sec in sections(cfg).items():
        if dataclasses.is_dataclass(sec):
            for f in dataclasses.fields(sec):
                value = getattr(sec, f.name)
                if _field_type(sec, f.name) is float and isinstance(value, (int, float)):
                    try:
                        finite = math.isfinite(value)
                    except OverflowError:
                        finite = False
                    check(finite, f"{name}.{f.name} must be a finite number, got {value!r}")


def validate(cfg: Config) -> None:
    check_finite(cfg)
    d, a, m, o, t = cfg.data, cfg.augment, cfg.model, cfg.optim, cfg.trainer
    check(d.dataset in DATASETS, f"data.dataset must be one of {DATASETS}, got '{d.dataset}'")
    check(d.val_size >= -1, f"data.val_size must be -1 (a tenth), 0 (none) or a count, got "
                            f"{d.val_size}")
    check(d.balance in BALANCES, f"data.balance must be one of {BALANCES}, got '{d.balance}'")
    check(cfg.eval.tta in TTAS, f"eval.tta must be one of {TTAS}, got '{cfg.eval.tta}'")
    check(d.limit_train >= 0, f"data.limit_train must be >= 0, got {d.limit_train}")
    check(-1 <= d.num_workers <= MAX_WORKERS,
          f"data.num_workers must be in [-1, {MAX_WORKERS}], got {d.num_workers}")
    check(8 <= d.image_size <= MAX_IMAGE_SIZE and d.image_size % 8 == 0,
          f"data.image_size must be a multiple of 8 from 8 to {MAX_IMAGE_SIZE} (the network "
          f"halves it three times), got {d.image_size}")
    check(32 <= a.pad_to <= 64, f"augment.pad_to must be in [32, 64], got {a.pad_to}")
    check(0 <= a.flip_p <= 1, f"augment.flip_p must be in [0, 1], got {a.flip_p}")
    for name in ("cutout_p", "vflip_p", "rot90_p", "color_p", "affine_p"):
        check(0 <= getattr(a, name) <= 1, f"augment.{name} must be in [0, 1], got {getattr(a, name)}")
    check(0 <= a.brightness <= 1, f"augment.brightness must be in [0, 1], got {a.brightness}")
    check(0 <= a.contrast <= 1, f"augment.contrast must be in [0, 1], got {a.contrast}")
    check(0 <= a.rotate <= 45, f"augment.rotate must be in [0, 45] degrees, got {a.rotate}")
    check(0 <= a.scale <= 0.5, f"augment.scale must be in [0, 0.5], got {a.scale}")
    check(1 <= a.cutout_size <= 32, f"augment.cutout_size must be in [1, 32], got {a.cutout_size}")
    check(a.engine in ENGINES, f"augment.engine must be one of {ENGINES}, got '{a.engine}'")
    # 1024 is 16 times the classic width, 1.7 billion parameters: a bound, not a recipe.
    check(1 <= m.width <= MAX_WIDTH, f"model.width must be in [1, {MAX_WIDTH}], got {m.width}")
    check(0 <= m.res_blocks <= MAX_RES_BLOCKS,
          f"model.res_blocks must be in [0, {MAX_RES_BLOCKS}], got {m.res_blocks}")
    check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    check(0 < o.pct_start < 1, f"optim.pct_start must be in (0, 1), got {o.pct_start}")
    check(o.div_factor > 0, f"optim.div_factor must be > 0, got {o.div_factor}")
    check(o.final_div_factor > 0, f"optim.final_div_factor must be > 0, got {o.final_div_factor}")
    check(0 <= o.label_smoothing < 1,
          f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
    check(o.ema_decay == 0 or 0.5 <= o.ema_decay < 1,
          f"optim.ema_decay must be 0 (off) or in [0.5, 1), got {o.ema_decay}")
    check(1 <= t.epochs <= MAX_EPOCHS, f"trainer.epochs must be in [1, {MAX_EPOCHS}], got {t.epochs}")
    check(1 <= t.batch_size <= MAX_BATCH,
          f"trainer.batch_size must be in [1, {MAX_BATCH}], got {t.batch_size}")
    check(0 <= t.seed <= MAX_SEED, f"trainer.seed must be in [0, {MAX_SEED}], got {t.seed}")
    check(t.device in DEVICES, f"trainer.device must be one of {DEVICES}, got '{t.device}'")
    check(1 <= t.devices <= MAX_WORKERS, f"trainer.devices must be in [1, {MAX_WORKERS}], got {t.devices}")
    check(t.compile in COMPILE_MODES, f"trainer.compile must be one of {COMPILE_MODES}, got '{t.compile}'")
    check(t.precision in PRECISIONS,
           f"trainer.precision must be one of {PRECISIONS}, got '{t.precision}'")
    check(bool(t.output_dir), "trainer.output_dir must not be empty")
