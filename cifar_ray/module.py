"""The LightningModule: ResNet-9 + NLL loss, Adam with weight decay, OneCycleLR, torchmetrics.

Metric names are `train/loss`, `train/acc`, `val/loss`, `val/acc`, `test/loss`, `test/acc`, each
stage with its own metric objects so their states never mix. The test stage also keeps per-class
accuracy and the confusion matrix in `test_report` (see `class_report`).

A training step never waits for the GPU: the metrics only accumulate on the device (no input
validation, no per-batch value computed) and are computed once per epoch, and Adam is the fused
one-kernel version. Any host-device synchronisation in a step would stall the CPU until the GPU
has drained its queue, and on a fast GPU the next step's launches then cost as much as its
arithmetic (tests/test_module.py counts them: zero).

`load_module` is the only way the project reads a checkpoint back: `torch.load(weights_only=True)`
(no code in a checkpoint ever runs), then the model is rebuilt from the saved hyperparameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_ray.config import Config
from cifar_ray.data.arrays import Normalization
from cifar_ray.data.cifar_files import SPECS
from cifar_ray.errors import CheckpointError
from cifar_ray.model import ResNet9
from cifar_ray.pl import pl


class LitResNet9(pl.LightningModule):
    def __init__(self, num_classes: int = 10, width: int = 64, lr: float = 0.01,
                 weight_decay: float = 1e-4, pct_start: float = 5 / 24, div_factor: float = 100.0,
                 final_div_factor: float = 100.0, class_names: list[str] | None = None,
                 dataset: str = "cifar10", val_size: int = 0, seed: int = 1,
                 mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        # Plain values only: the checkpoint must load under weights_only=True and rebuild alone.
        # dataset / val_size / seed let later stages (GradCAM on the validation split) rebuild
        # exactly the data this model was trained and validated on; mean / std are the
        # normalisation it was trained with (see `normalization`).
        self.save_hyperparameters()
        self.model = ResNet9(num_classes, width)
        # validate_args=False: the checks (torch.unique of the labels, ...) read values back
        # from the device on every update. nan_strategy="disable": the same for the NaN check
        # (a NaN loss then shows as a NaN epoch loss).
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro", validate_args=False) for _ in range(3))
        self.train_loss, self.val_loss, self.test_loss = (
            MeanMetric(nan_strategy="disable") for _ in range(3))
        self.test_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)
        self.test_report: dict[str, Any] = {}
        self.compile_mode = "off"  # how to run the training forward on CUDA (see `setup`)
        self._compiled = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning names the hook it is in (`_current_fx_name`, a str or None) before and
        # after each hook it calls, about 40 times per training step; nn.Module's __setattr__
        # first checks whether the value is a Parameter, a Module or a Tensor (3 us each time
        # on the 2-core VM, where a plain attribute takes 0.5 us).
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_config(cls, cfg: Config, class_names: list[str],
                    norm: Normalization | None = None) -> "LitResNet9":
        """`norm`: the data set's normalisation (ImageArrays.norm); CIFAR's own by default."""
        o = cfg.optim
        norm = norm or SPECS[cfg.data.dataset].norm
        module = cls(num_classes=len(class_names), width=cfg.model.width, lr=o.lr,
                     weight_decay=o.weight_decay, pct_start=o.pct_start, div_factor=o.div_factor,
                     final_div_factor=o.final_div_factor, class_names=list(class_names),
                     dataset=cfg.data.dataset, val_size=cfg.data.val_size, seed=cfg.trainer.seed,
                     mean=list(norm.mean), std=list(norm.std))
        module.compile_mode = cfg.trainer.compile  # how it runs, not what it is: no hparam
        return module

    @property
    def normalization(self) -> Normalization:
        """What to subtract from and divide pixels in [0, 1] by before this model sees them
        (checkpoints written before it was stored: their CIFAR data set's figures)."""
        if self.hparams.get("mean") is None:
            return SPECS[self.hparams.dataset].norm
        return Normalization(tuple(self.hparams.mean), tuple(self.hparams.std))

    @property
    def class_names(self) -> list[str]:
        return self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]

    def setup(self, stage: str) -> None:
        # On a GPU, channels-last convolutions run on the tensor cores without layout copies
        # (the GPU data path hands over channels-last batches too).
        if self.trainer.strategy.root_device.type == "cuda":
            self.to(memory_format=torch.channels_last)
            if self.compile_mode != "off" and self._compiled is None:
                # Kept out of the module's children (object.__setattr__), so the state dict
                # and every checkpoint stay those of the plain model.
                object.__setattr__(self, "_compiled", torch.compile(self.model, mode=self.compile_mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only training steps run compiled: one graph, one batch shape (the training batches
        # are all full, see data.py); evaluation and GradCAM run the plain model.
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
            # Logged as metric objects, once per epoch: Lightning computes them over every
            # update (across DDP ranks too) at the epoch's end, then resets them. Logging them
            # on every step would only repeat that registration, at a cost of milliseconds
            # per step (Lightning moves a logged metric's states to the device each time).
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
        h = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), **adam_options(h.lr, h.weight_decay))
        # estimated_stepping_batches comes from the real train loader (and any batch limit).
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=h.lr, total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=h.pct_start, div_factor=h.div_factor, final_div_factor=h.final_div_factor,
            anneal_strategy="linear", three_phase=False)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adam_options(lr: float, weight_decay: float) -> dict[str, Any]:
    """The recipe's Adam, shared with the bench's plain loop so that their ratio stays fair.
    fused: one kernel for every parameter, with its step count kept on the device (the
    default implementation reads each parameter's step back with .item())."""
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
    hparams = dict(check_hyperparameters(path, ckpt))
    try:
        module = LitResNet9(**hparams)
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not match this project's ResNet-9: {first}") from None
    return module.eval()


def check_hyperparameters(path: str | Path, ckpt: dict[str, Any]) -> Mapping[str, Any]:
    """The checkpoint's hyperparameters, once they agree with its weights: the network is
    built from them, so a width or class count its tensors do not have (a hand-edited or
    hostile file) would allocate a network of any size. CheckpointError (one line) if not."""
    hparams, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    if not isinstance(hparams, Mapping) or not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: its hyper_parameters and state_dict must be mappings")
    width, classes = hparams.get("width", 64), hparams.get("num_classes", 10)
    prep, fc = state.get("model.prep.0.weight"), state.get("model.fc.weight")
    if not isinstance(prep, torch.Tensor) or not isinstance(fc, torch.Tensor) \
            or prep.shape != (width, 3, 3, 3) or fc.shape != (classes, 8 * width):
        raise CheckpointError(f"{path}: does not match this project's ResNet-9: its "
                              f"hyper_parameters (width {width!r}, num_classes {classes!r}) do "
                              "not match its weights")
    names = hparams.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != classes
                              or not all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: its class_names must be a list of {classes} names")
    return hparams
