"""The LightningModule: ResNet-9 + NLL loss, Adam with weight decay, OneCycleLR, torchmetrics
(a metric object per stage: `train/acc`, `val/acc`, `test/acc`, ...). A training step never
waits for the GPU (docs/architecture.md). `load_module` is the one way a checkpoint is read
back: weights_only=True, then the model rebuilt from its hyperparameters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_ray.config import Config, DataConfig, ModelConfig, OptimConfig
from cifar_ray.data.arrays import Normalization
from cifar_ray.data.cifar_files import SPECS
from cifar_ray.errors import CheckpointError
from cifar_ray.model import ResNet9
from cifar_ray.pl import pl


class LitResNet9(pl.LightningModule):
    """Built from the config's sections, saved as its hyperparameters under their names
    (`optim.lr` is hparams.optim["lr"]; plain values, for weights_only=True), with the seed,
    class names and normalisation: a checkpoint rebuilds the model and its data split alone."""

    def __init__(self, model: dict[str, Any] | None = None, optim: dict[str, Any] | None = None,
                 data: dict[str, Any] | None = None, seed: int = 1,
                 class_names: list[str] | None = None, norm: dict[str, list] | None = None):
        super().__init__()
        self.save_hyperparameters()
        num_classes = len(class_names) if class_names else 10
        self.model = ResNet9(num_classes, ModelConfig(**(model or {})).width)
        # No argument checks: they read values back from the device on every update.
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro", validate_args=False) for _ in range(3))
        self.train_loss, self.val_loss, self.test_loss = (
            MeanMetric(nan_strategy="disable") for _ in range(3))
        self.test_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)
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
                     seed=cfg.trainer.seed, class_names=list(class_names),
                     norm={"mean": list(norm.mean), "std": list(norm.std)})
        module.compile_mode = cfg.trainer.compile  # how it runs, not what it is: no hparam
        return module

    @property
    def data_config(self) -> DataConfig:
        """The data section it was trained with."""
        return DataConfig(**(self.hparams.data or {}))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Training steps alone run compiled (one batch shape); the rest runs the plain model.
        if self._compiled is not None and self.training and torch.is_grad_enabled():
            return self._compiled(x)
        return self.model(x)

    def _step(self, batch, batch_idx: int, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        log_probs = self(x)  # (B, classes)
        losses = F.nll_loss(log_probs, y, reduction="none")  # (B,)
        mean_loss, accuracy = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        # update(), not the metrics' forward(), which would also compute each batch's value.
        mean_loss.update(losses.detach())
        accuracy.update(log_probs.detach(), y)
        if batch_idx == 0:
            # Metric objects, computed once per epoch (and across ranks) by Lightning.
            self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True,
                     prog_bar=stage != "test")
            self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return losses.mean(), log_probs

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, batch_idx, "train")[0]

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        _, log_probs = self._step(batch, batch_idx, "test")
        self.test_confusion.update(log_probs, batch[1])

    def on_test_epoch_end(self) -> None:
        self.test_report = self.class_report(self.test_confusion.compute())
        self.test_confusion.reset()

    def class_report(self, confusion: torch.Tensor) -> dict[str, Any]:
        """Per-class accuracy and the confusion matrix (rows: true, columns: predicted) from a
        confusion matrix: the one definition the test stage and the GradCAM report share."""
        per_class = confusion.diagonal() / confusion.sum(1).clamp(min=1)
        return {"per_class_acc": dict(zip(self.class_names, per_class.tolist())),
                "confusion_matrix": confusion.tolist()}

    def configure_optimizers(self):
        optim = OptimConfig(**(self.hparams.optim or {}))
        optimizer = torch.optim.Adam(self.parameters(), **adam_options(optim.lr, optim.weight_decay))
        # estimated_stepping_batches comes from the real train loader (and any batch limit).
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=optim.lr, total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=optim.pct_start, div_factor=optim.div_factor,
            final_div_factor=optim.final_div_factor, anneal_strategy="linear", three_phase=False)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adam_options(lr: float, weight_decay: float) -> dict[str, Any]:
    """The recipe's Adam, shared with the bench's plain loop; fused: one kernel, its step
    count on the device (no .item() per parameter)."""
    return {"lr": lr, "weight_decay": weight_decay, "fused": True}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's contents without running any code in it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file missing")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # weights_only refuses pickled code with an UnpicklingError; a torn file fails elsewhere.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            first = "it contains objects other than tensors and plain values (refused, not run)"
        raise CheckpointError(f"{path}: not a loadable checkpoint: {first}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path}: not a cifar_ray checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def load_module(path: str | Path) -> LitResNet9:
    """Rebuild a LitResNet9 from a checkpoint this project wrote (on CPU, in eval mode)."""
    ckpt = read_checkpoint(path)
    hparams = check_hyperparameters(path, ckpt)
    try:
        module = LitResNet9(**hparams)
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not match this project's ResNet-9: {first}") from None
    return module.eval()


SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig}


def in_sections(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters as LitResNet9 takes them; those written before they were
    the config's sections held the same fields flat (`lr`, `width`, `dataset`, `mean`)."""
    if any(name in hparams for name in SECTIONS):
        return dict(hparams)
    out = {name: {f.name: hparams[f.name] for f in fields(kind) if f.name in hparams}
           for name, kind in SECTIONS.items()}
    names = hparams.get("class_names")
    if names is None and isinstance(hparams.get("num_classes"), int):
        names = [str(i) for i in range(hparams["num_classes"])]
    out.update(seed=hparams.get("seed", 1), class_names=names)
    if hparams.get("mean") is not None:
        out["norm"] = {"mean": hparams["mean"], "std": hparams["std"]}
    return out


def check_hyperparameters(path: str | Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyperparameters, in sections, once they agree with its weights (a
    width they do not have would build a network of any size); else one-line CheckpointError."""
    hparams, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    if not isinstance(hparams, Mapping) or not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: its hyper_parameters and state_dict must be mappings")
    hparams = in_sections(hparams)
    for name, kind in SECTIONS.items():
        section = hparams.get(name) or {}
        known = {f.name for f in fields(kind)}
        if not isinstance(section, Mapping) or not set(section) <= known:
            raise CheckpointError(f"{path}: its hyper_parameters' {name} section is not this "
                                  "project's")
    width = (hparams.get("model") or {}).get("width", 64)
    prep, fc = state.get("model.prep.0.weight"), state.get("model.fc.weight")
    if not isinstance(prep, torch.Tensor) or not isinstance(fc, torch.Tensor) \
            or prep.shape != (width, 3, 3, 3) or fc.ndim != 2 or fc.shape[1] != 8 * width:
        raise CheckpointError(f"{path}: does not match this project's ResNet-9: its "
                              f"hyper_parameters (width {width!r}) do not match its weights")
    names = hparams.get("class_names")
    if names is not None and (not isinstance(names, list)
                              or not all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: its class_names must be a list of names")
    if len(names or range(10)) != fc.shape[0]:
        raise CheckpointError(f"{path}: does not match this project's ResNet-9: it names "
                              f"{len(names or range(10))} classes, its weights have {fc.shape[0]}")
    return hparams
