"""The LightningModule: ResNet-9 + cross-entropy (label smoothing, class weights), Adam with
weight decay, OneCycleLR, torchmetrics (training: `train/acc`; validation and test: a confusion
matrix, whence `val/acc`, `val/balanced_acc`, `val/f1`, ...), test-time flips. A training step never
waits for the GPU (docs/internals.md). `load_module` is the one way a checkpoint is read
back: weights_only=True, then the model rebuilt from its hyperparameters."""

from __future__ import annotations

import errno
import math
import os
import pickletools
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import IO, Any

import torch
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_ray.config import (
    MAX_CLASS_NAME,
    MAX_CLASSES,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
)
from cifar_ray.data.arrays import Normalization
from cifar_ray.data.cifar_files import SPECS
from cifar_ray.errors import CheckpointError, ConfigError
from cifar_ray.names import METRICS, shown_name
from cifar_ray.model import ResNet9, averaged_views
from cifar_ray.pl import pl


class LitResNet9(pl.LightningModule):
    """Built from the config's sections, saved as its hyperparameters under their names
    (`optim.lr` is hparams.optim["lr"]; plain values, for weights_only=True), with the seed,
    class names and normalisation: a checkpoint rebuilds the model and its data split alone."""

    def __init__(self, model: dict[str, Any] | None = None, optim: dict[str, Any] | None = None,
                 data: dict[str, Any] | None = None, seed: int = 1,
                 class_names: list[str] | None = None, norm: dict[str, list] | None = None,
                 schedule: dict[str, int] | None = None, eval: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters()
        num_classes = len(class_names) if class_names else 10
        shape = ModelConfig(**(model or {}))
        self.model = ResNet9(num_classes, shape.width, shape.res_blocks)
        # No argument checks: they read values back from the device on every update.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        # Validation's and test's scores all come from one confusion matrix (`scores`).
        self.val_confusion, self.test_confusion = (
            MulticlassConfusionMatrix(num_classes, validate_args=False) for _ in range(2))
        self.train_loss, self.val_loss, self.test_loss = (
            MeanMetric(nan_strategy="disable") for _ in range(3))
        # data.balance "weights": set from the training labels in `setup`; not saved.
        self.register_buffer("class_weights", torch.ones(num_classes), persistent=False)
        self.test_report: dict[str, Any] = {}
        self.compile_mode = "off"  # how to run the training forward on CUDA (see `setup`)
        self._compiled = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets this ~40 times a step; nn.Module's __setattr__ costs 6x a plain one.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_config(cls, cfg: Config, class_names: list[str],
                    norm: Normalization | None = None) -> "LitResNet9":
        """`norm`: the data set's normalisation (ImageArrays.norm); CIFAR's own by default."""
        norm = norm or SPECS[cfg.data.dataset].norm
        module = cls(model=asdict(cfg.model), optim=asdict(cfg.optim), data=asdict(cfg.data),
                     eval=asdict(cfg.eval), seed=cfg.trainer.seed, class_names=list(class_names),
                     norm={"mean": list(norm.mean), "std": list(norm.std)},
                     schedule=schedule_of(cfg))
        module.compile_mode = cfg.trainer.compile  # how it runs, not what it is: no hparam
        return module

    @property
    def data_config(self) -> DataConfig:
        """The data section it was trained with."""
        return DataConfig(**(self.hparams.data or {}))

    @property
    def optim_config(self) -> OptimConfig:
        return OptimConfig(**(self.hparams.optim or {}))

    @property
    def tta(self) -> str:  # EvalConfig.tta (older checkpoints have none: off)
        return EvalConfig(**(self.hparams.get("eval") or {})).tta

    @property
    def image_size(self) -> int:
        """The side of the images it was trained on (and takes)."""
        return self.data_config.image_size

    @property
    def width(self) -> int:
        return ModelConfig(**(self.hparams.model or {})).width

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def normalization(self) -> Normalization:
        """What to subtract from and divide pixels in [0, 1] by before this model sees them."""
        norm = self.hparams.norm
        if norm is None:
            return SPECS[self.data_config.dataset].norm
        return Normalization(tuple(norm["mean"]), tuple(norm["std"]))

    @property
    def class_names(self) -> list[str]:
        return self.hparams.class_names or [str(i) for i in range(10)]

    def setup(self, stage: str) -> None:
        # Channels-last: tensor-core convolutions without layout copies.
        if self.trainer.strategy.root_device.type == "cuda":
            self.to(memory_format=torch.channels_last)
            if self.compile_mode != "off" and self._compiled is None:
                # Not a child module: state dicts and checkpoints stay the plain model's.
                object.__setattr__(self, "_compiled", torch.compile(self.model, mode=self.compile_mode))
        data = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.data_config.balance == "weights" and data is not None:
            self.class_weights.copy_(class_weights(data.train_set.labels, self.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Training steps alone run compiled (one batch shape); the rest runs the plain model.
        if self.training:
            if self._compiled is not None and torch.is_grad_enabled():
                return self._compiled(x)
            return self.model(x)
        return averaged_views(self.model, x, self.tta)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        log_probs = self(x)  # (B, classes)
        optim = self.optim_config
        # cross_entropy of log-probabilities: log_softmax leaves them as they are.
        losses = F.cross_entropy(log_probs, y, weight=self.class_weights, reduction="none",
                                 label_smoothing=optim.label_smoothing)  # (B,)
        # update(), not the metrics' forward(), which would also compute each batch's value.
        self.train_loss.update(losses.detach())
        self.train_acc.update(log_probs.detach(), y)
        if batch_idx == 0:
            # Metric objects, computed once per epoch (and across ranks) by Lightning.
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return losses.mean()

    def _evaluate(self, batch, stage: str) -> None:
        x, y = batch
        log_probs = self(x)
        getattr(self, f"{stage}_loss").update(F.nll_loss(log_probs, y, reduction="none"))
        getattr(self, f"{stage}_confusion").update(log_probs, y)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _log_scores(self, stage: str) -> torch.Tensor:
        """Logs `stage`'s loss and scores (over all ranks); returns its confusion matrix."""
        confusion = getattr(self, f"{stage}_confusion")
        matrix = confusion.compute()
        confusion.reset()
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), prog_bar=stage == "val")
        for name, value in scores(matrix).items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "acc")
        return matrix

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self.test_report = self.class_report(self._log_scores("test").cpu())

    def class_report(self, confusion: torch.Tensor) -> dict[str, Any]:
        """Each class's precision, recall (its accuracy), F1 and support, the scores and the
        confusion matrix (rows: true): what the test stage and the GradCAM report share."""
        tp, support, predicted = confusion.diagonal(), confusion.sum(1), confusion.sum(0)
        recall = tp / support.clamp(min=1)
        precision = tp / predicted.clamp(min=1)
        f1 = 2 * tp / (support + predicted).clamp(min=1)
        per_class = {name: {"precision": p, "recall": r, "f1": f, "support": int(n)}
                     for name, p, r, f, n in zip(self.class_names, precision.tolist(),
                                                 recall.tolist(), f1.tolist(), support.tolist())}
        return {"per_class_acc": dict(zip(self.class_names, recall.tolist())),
                "per_class": per_class,
                **{name: float(value) for name, value in scores(confusion).items()},
                "confusion_matrix": confusion.tolist()}

    def configure_optimizers(self):
        optim = self.optim_config
        optimizer = torch.optim.Adam(self.parameters(), **adam_options(optim.lr, optim.weight_decay))
        # estimated_stepping_batches comes from the real train loader (and any batch limit).
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=optim.lr, total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=optim.pct_start, div_factor=optim.div_factor,
            final_div_factor=optim.final_div_factor, anneal_strategy="linear", three_phase=False)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


SCORES = ("acc", "balanced_acc", "f1")  # logged per stage as "val/acc", ...


def scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy, balanced accuracy (the mean of the classes' recalls) and macro F1 from a
    confusion matrix (rows: true), over the classes the targets hold."""
    confusion = confusion.float()
    tp, support, predicted = confusion.diagonal(), confusion.sum(1), confusion.sum(0)
    present = support > 0
    count = present.sum().clamp(min=1)
    recall = tp / support.clamp(min=1)
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return {"acc": tp.sum() / confusion.sum().clamp(min=1),
            "balanced_acc": (recall * present).sum() / count,
            "f1": (f1 * present).sum() / count}


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """data.balance "weights": each class's loss weight, 1 / (its share x classes)."""
    counts = torch.bincount(torch.as_tensor(labels).long(), minlength=num_classes).float()
    weights = len(labels) / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


class DeviceEMA(pl.callbacks.EMAWeightAveraging):
    """Lightning's EMA, its copy on the training device: its `setup` runs before the model is
    moved there, and a copy on the CPU would cost each step a copy of every weight."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)


def averaging(cfg: Config) -> list[pl.Callback]:
    """optim.ema_decay: an EMA of the weights, which validation runs with and checkpoints
    hold as their weights (the raw ones beside them, for a resume)."""
    return [DeviceEMA(decay=cfg.optim.ema_decay)] if cfg.optim.ema_decay else []


def schedule_of(cfg: Config) -> dict[str, int]:
    """What fixes the one-cycle schedule's length, saved so that a resume can be checked."""
    return {"epochs": cfg.trainer.epochs, "batch_size": cfg.trainer.batch_size}


def check_resumable(path: str | Path, cfg: Config, class_names: list[str],
                    metric: str | None = None) -> None:
    """--resume: the checkpoint must be of the run `cfg` describes (the same network, recipe,
    data and schedule, best.ckpt kept by the same `metric`); else one line naming the first
    setting that differs."""
    hparams = dict(load_module(path).hparams)  # every gate of a checkpoint first
    monitors = [m for key in (read_checkpoint(path).get("callbacks") or {})
                for m in METRICS if f"'monitor': '{m}'" in str(key)]
    if metric and monitors and metric not in monitors:
        raise CheckpointError(f"--resume: {path} kept best.ckpt by {monitors[0]}, not {metric}: "
                              f"resume with --metric {monitors[0]}, or start again with "
                              "--overwrite")
    if not hparams.get("eval"):
        raise CheckpointError(f"--resume: {path} was written by an earlier version of cifar_ray, "
                              "whose validation split was not stratified: start again with "
                              "--overwrite")
    if hparams.get("seed") != cfg.trainer.seed or len(hparams.get("class_names") or "") != \
            len(class_names):
        raise CheckpointError(f"--resume: {path} was trained with another seed (split) or "
                              "another class count: resume with the same settings and data, or "
                              "start again with --overwrite")
    now = {**{name: asdict(getattr(cfg, name)) for name in SECTIONS}, "schedule": schedule_of(cfg)}
    for section, values in now.items():
        saved = hparams.get(section) or {}
        for key, value in values.items():
            if key in saved and saved[key] != value and key not in ("data_dir", "num_workers"):
                raise CheckpointError(
                    f"--resume: {path} was trained with {section if section != 'schedule' else 'trainer'}"
                    f".{key} = {shown_name(saved[key])}, not {shown_name(value)}: resume with the "
                    "same settings, or start again with --overwrite")


def adam_options(lr: float, weight_decay: float) -> dict[str, Any]:
    """The recipe's Adam, shared with the bench's plain loop; fused: one kernel, its step
    count on the device (no .item() per parameter)."""
    return {"lr": lr, "weight_decay": weight_decay, "fused": True}


MAX_RECORDS = 4096  # a ResNet-9 checkpoint holds ~100 (tensors, optimiser state, metadata)
MAX_PICKLE = 16 << 20  # its data.pkl: the hyperparameters and the structure, ~100 KB


def check_archive(path: Path, file: IO[bytes]) -> None:
    """Before torch reads a byte: a zip archive of at most MAX_RECORDS records, each stored
    uncompressed as torch.save writes it, declaring no more bytes than the file holds, whose
    pickle nests at most MAX_DEPTH deep (check_pickle)."""
    size = os.fstat(file.fileno()).st_size
    try:
        with zipfile.ZipFile(file) as archive:
            records = archive.infolist()
            pickles = [r for r in records if r.filename.endswith("/data.pkl")
                       and r.file_size <= MAX_PICKLE]
            pickled = archive.read(pickles[0]) if len(pickles) == 1 else b""
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a loadable checkpoint: not a torch.save archive "
                              f"({exc})") from None
    if len(records) > MAX_RECORDS:
        raise CheckpointError(f"{path}: {len(records)} records, more than a checkpoint holds")
    declared = 0
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.compress_size != record.file_size:
            raise CheckpointError(f"{path}: its record {record.filename!r} is compressed "
                                  "(torch.save never compresses; refused, not inflated)")
        if record.filename.endswith("data.pkl") and record.file_size > MAX_PICKLE:
            raise CheckpointError(f"{path}: its {record.filename!r} is larger than a "
                                  "checkpoint's")
        declared += record.file_size
    if declared > size:
        raise CheckpointError(f"{path}: it declares {declared:,} bytes but holds {size:,}")
    if why := check_pickle(pickled):
        raise CheckpointError(f"{path}: not a loadable checkpoint: {why}")


MAX_DEPTH = 100  # of a checkpoint's nested structure: ~10 in one this project writes
MAX_NODES = 10_000_000  # its structure written out without shared references: ~10,000
MEMO = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
GET = {"GET", "BINGET", "LONG_BINGET"}
IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


def check_pickle(data: bytes) -> str | None:
    """Why a checkpoint's pickle is refused, else None: it must parse, nest at most MAX_DEPTH
    deep and, its shared references written out, hold at most MAX_NODES objects (a tuple
    holding one tuple twice, 60 deep, takes 2**60 steps to hash or compare). Each value on
    the unpickler's stack is simulated as its (depth, nodes)."""
    stack: list[tuple[int, int]] = []
    marks: list[int] = []
    memo: dict[Any, tuple[int, int]] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "MARK":
                marks.append(len(stack))
                continue
            before, popped = op.stack_before, []
            if pickletools.markobject in before:  # the items since the last MARK, then below it
                start = marks.pop()
                popped, stack = stack[start:], stack[:start]
                before = before[:before.index(pickletools.markobject)]
            if before:
                popped = stack[-len(before):] + popped
                del stack[-len(before):]
            # A container filled in place (APPENDS, SETITEMS, BUILD) is as deep as its items + 1.
            base = popped.pop(0) if op.name in IN_PLACE else (0, 1)
            value = (max(base[0], 1 + max((d for d, _ in popped), default=-1)),
                     min(base[1] + sum(n for _, n in popped), MAX_NODES + 1))
            if op.name in GET:
                value = memo[arg]
            if value[0] > MAX_DEPTH or value[1] > MAX_NODES:
                return (f"its structure nests deeper than {MAX_DEPTH} levels or holds more "
                        f"than {MAX_NODES:,} objects")
            stack += [value] * len(op.stack_after)
            if op.name in MEMO:
                memo[arg if op.name != "MEMOIZE" else len(memo)] = stack[-1]
    except (ValueError, KeyError, IndexError) as exc:
        return f"its pickle is malformed ({type(exc).__name__})"
    return None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The one way a checkpoint is read: its archive checked (check_archive), then loaded
    with weights_only=True, so that no code in it runs and nothing is larger than it holds."""
    path = Path(path)
    try:  # one open file for the checks and the load: no file swapped in between
        real = path.resolve()  # a link the user named is followed once, here
        file = os.fdopen(os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb")
    except OSError as exc:
        raise CheckpointError(f"{path}: checkpoint file missing" if exc.errno == errno.ENOENT
                              else f"{path}: cannot read it ({exc.strerror})") from None
    with file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise CheckpointError(f"{path}: not a checkpoint file")
        check_archive(path, file)
        file.seek(0)
        return _load(path, file)


def _load(path: Path, file: IO[bytes]) -> dict[str, Any]:
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        # weights_only refuses pickled code with an UnpicklingError; a torn file fails elsewhere.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            first = "it contains objects other than tensors and plain values (refused, not run)"
        raise CheckpointError(f"{path}: not a loadable checkpoint: {first[:200]}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path}: not a cifar_ray checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def load_module(path: str | Path) -> LitResNet9:
    """Rebuild a LitResNet9 from a checkpoint (on CPU, in eval mode), once its network, laid
    out on the "meta" device (no memory), matches the file's tensors."""
    ckpt = read_checkpoint(path)
    hparams = check_hyperparameters(path, ckpt)
    with torch.device("meta"):
        expected = LitResNet9(**hparams).state_dict()
    state = ckpt["state_dict"]
    for key, tensor in expected.items():
        found = state.get(key)
        if not isinstance(found, torch.Tensor) or found.shape != tensor.shape:
            shape = tuple(found.shape) if isinstance(found, torch.Tensor) else "none"
            raise CheckpointError(f"{path}: does not match this project's ResNet-9: "
                                  f"{shown_name(key)} is {shape}, not {tuple(tensor.shape)}")
    try:
        module = LitResNet9(**hparams)
        module.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not match this project's ResNet-9: {first[:200]}") from None
    return module.eval()


SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "eval": EvalConfig}


def in_sections(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters as LitResNet9 takes them; those written before they were
    the config's sections held the same fields flat (`lr`, `width`, `dataset`, `mean`)."""
    if any(name in hparams for name in SECTIONS):
        return dict(hparams)
    out = {name: {f.name: hparams[f.name] for f in fields(kind) if f.name in hparams}
           for name, kind in SECTIONS.items()}
    names, count = hparams.get("class_names"), hparams.get("num_classes")
    if names is None and isinstance(count, int) and 0 < count <= MAX_CLASSES:
        names = [str(i) for i in range(count)]
    out.update(seed=hparams.get("seed", 1), class_names=names)
    if hparams.get("mean") is not None:
        out["norm"] = {"mean": hparams["mean"], "std": hparams.get("std")}
    return out


def check_hyperparameters(path: str | Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyperparameters, in sections, once they pass the config's validation,
    with at most MAX_CLASSES class names and a finite normalisation; else one line."""
    hparams, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    if not isinstance(hparams, Mapping) or not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: its hyper_parameters and state_dict must be mappings")
    hparams = in_sections(hparams)
    unknown = set(hparams) - {*SECTIONS, "seed", "class_names", "norm", "schedule"}
    if unknown:
        raise CheckpointError(f"{path}: its hyper_parameters hold keys this project does not "
                              f"write: {shown_name(', '.join(map(str, sorted(unknown, key=str))))}")
    raw = {name: hparams.get(name) or {} for name in SECTIONS}
    schedule = hparams.get("schedule") or {}
    if not isinstance(schedule, Mapping) or not set(schedule) <= {"epochs", "batch_size"}:
        raise CheckpointError(f"{path}: its hyper_parameters' schedule is not this project's")
    try:
        Config.from_dict({**raw, "trainer": {"seed": hparams.get("seed", 1), **schedule}},
                         "hyper_parameters")
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    hparams.update({name: dict(raw[name]) for name in SECTIONS})
    names = hparams.get("class_names")
    if names is not None and (not isinstance(names, list) or not 0 < len(names) <= MAX_CLASSES
                              or not all(isinstance(n, str) and len(n) <= MAX_CLASS_NAME
                                         for n in names)):
        raise CheckpointError(f"{path}: its class_names must be a list of 1 to {MAX_CLASSES} "
                              f"names of at most {MAX_CLASS_NAME} characters")
    norm = hparams.get("norm")
    if norm is not None and not _is_normalization(norm):
        raise CheckpointError(f"{path}: its norm must be a mean and a std of 3 finite numbers "
                              "each (std > 0)")
    return hparams


def _is_normalization(norm: Any) -> bool:
    if not isinstance(norm, Mapping) or set(norm) != {"mean", "std"}:
        return False
    values = [norm["mean"], norm["std"]]
    if not all(isinstance(v, (list, tuple)) and len(v) == 3 for v in values):
        return False
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
               for v in values for x in v):
        return False
    return all(x > 0 for x in norm["std"])
