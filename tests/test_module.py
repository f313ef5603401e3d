"""The LightningModule's training step never reads a value back from the device.

On a GPU each such read (`.item()`, `.cpu()`, `if tensor:` ...) makes the CPU wait until the GPU
has finished everything queued, so the next step's launches no longer overlap the arithmetic.
On the CPU the same Python calls can be counted: the test wraps them on torch.Tensor and counts
the calls made during the training steps after the first, through Lightning's real fit loop,
the tensor augmentation engine and the project's DataModule included.
"""

import traceback

import pytest
import torch

from cifar_ray.config import Config
from cifar_ray.data.datamodule import CifarDataModule
from cifar_ray.module import LitResNet9
from cifar_ray.pl import pl
from cifar_ray.runtime import build_trainer

READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


class CountReads(pl.Callback):
    """Counts the device reads between the start and the end of every batch after each
    epoch's first (whose start-up reads, once per epoch, cost nothing per step)."""

    def __init__(self) -> None:
        self.counts = {name: 0 for name in READS}
        self.where: list[str] = []
        self.originals = {name: getattr(torch.Tensor, name) for name in READS}
        self.steps = 0

    def _wrap(self, name):
        original = self.originals[name]
        counts, where = self.counts, self.where

        def counted(tensor, *args, **kwargs):
            counts[name] += 1
            where.append(f"{name}: " + "".join(traceback.format_stack(limit=6)[:-1]))
            return original(tensor, *args, **kwargs)
        return counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= 1:
            for name in READS:
                setattr(torch.Tensor, name, self._wrap(name))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.restore()
        self.steps += batch_idx >= 1

    def restore(self) -> None:
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("engine", ["tensors", "albumentations"])
def test_training_steps_after_the_first_read_nothing_back(cifar10, engine):
    cfg = Config()
    cfg.data.data_dir, cfg.data.val_size, cfg.data.num_workers = str(cifar10[0]), 200, 0
    cfg.augment.engine, cfg.model.width, cfg.trainer.batch_size = engine, 8, 100
    data = CifarDataModule(cfg)
    data.setup()
    counter = CountReads()
    trainer = build_trainer("cpu", max_epochs=2, callbacks=[counter], log_every_n_steps=1)
    try:
        trainer.fit(LitResNet9.from_config(cfg, data.classes), datamodule=data)
    finally:
        counter.restore()
    assert counter.steps == 2 * (8 - 1)  # 800 training images in batches of 100, two epochs
    assert sum(counter.counts.values()) == 0, "\n".join(counter.where[:3])
    # The metrics still arrive, once per epoch.
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)


def test_the_wrapped_reads_are_counted():
    """The counter sees a read when there is one (the test above could not pass vacuously)."""
    counter = CountReads()
    counter.on_train_batch_start(None, None, None, 1)
    try:
        torch.ones(2).sum().item()
        bool(torch.tensor(True))
    finally:
        counter.restore()
    assert counter.counts["item"] == 1 and counter.counts["__bool__"] == 1
