"""Where a run computes, in what precision, and the Lightning Trainer: decided here, once, for
every caller (train, the search's workers, lr_find, bench).

The project's one word for it is `device`: `auto` (CUDA when this process sees a GPU), `cpu` or
`cuda`, in the config (`trainer.device`, `--device`) and in every command's flags.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from packaging.version import Version

from cifar_ray.config import DEVICES, resolve_precision
from cifar_ray.errors import ConfigError
from cifar_ray.files import atomic_path, link_atomically
from cifar_ray.pl import pl


def resolve_device(choice: str) -> str:
    """'auto' | 'cpu' | 'cuda' -> 'cpu' or 'cuda', as this process sees its devices."""
    if choice not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got '{choice}'")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


class AtomicCheckpointIO(pl.plugins.TorchCheckpointIO):
    """Checkpoints written as every output is (files.atomic_path): to a temporary file beside
    the target, then renamed over it. Lightning's own writer stages the file in the system's
    temp dir and moves it; across file systems that move is a copy, and a copy stopped by a
    full disk left a torn last.ckpt where the previous epoch's had been.

    In an epoch that is the best so far, Lightning saves best.ckpt and last.ckpt from the same
    state (the same epoch and step; only its own note of the other file's name differs): the
    second is then a hard link to the first, not a second copy. For ResNet-9 with Adam's
    state that is 79 MB and about 0.2 s (serialising, writing, fsync on the 2-core VM) saved
    per such epoch, and half the disk. The next epoch's last.ckpt replaces the link, never
    best.ckpt."""

    def __init__(self) -> None:
        super().__init__()
        self._written: tuple[tuple[Any, Any], Path] | None = None  # (epoch, step), its file

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        state = (checkpoint.get("epoch"), checkpoint.get("global_step"))
        if self._written and self._written[0] == state and self._written[1].parent == path.parent:
            try:
                link_atomically(self._written[1], path)
                return
            except OSError:  # a file system without hard links, or the file is gone: write it
                pass  # (a full disk is a DiskFull, not an OSError: it goes on up)
        buffer = io.BytesIO()  # torch.save to a file reports a full disk as a RuntimeError
        torch.save(checkpoint, buffer)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
        self._written = (state, path)


class SnapshotCheckpointIO(AtomicCheckpointIO):
    """Saving takes a copy of the state (on its device, as Lightning's AsyncCheckpointIO does)
    and keeps it; `write(path)` writes that copy, atomically, later and from any thread. For a
    caller with a writing thread of its own: the search's worker hands each epoch's write to
    Ray Train's checkpoint upload thread (worker.EpochReports)."""

    def __init__(self) -> None:
        super().__init__()
        self._copies: dict[str, dict[str, Any]] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        self._copies[str(path)] = apply_to_collection(checkpoint, torch.Tensor,
                                                      lambda t: t.detach().clone())

    def write(self, path) -> None:
        super().save_checkpoint(self._copies.pop(str(path)), path)


def build_trainer(device: str, precision: str = "auto", write_behind: bool = False,
                  **options: Any) -> pl.Trainer:
    """A Lightning Trainer on `device` ('cpu' or 'cuda') with the project's defaults; `options`
    are Trainer arguments that add to or replace them.

    `write_behind`: checkpoints are written by a thread while training goes on (Lightning's
    AsyncCheckpointIO: the state is copied on the caller's thread, on its device, then
    serialised and written, atomically as ever, in the background, one at a time and in
    order). An epoch then waits for the copy, not for the 79 MB write and fsync (0.2-0.35 s
    on the 2-core VM; on the H200 an epoch trains in about half a second). A failed write (a
    full disk) is raised at the next save or when fit ends, which waits for the last write.
    A CheckpointIO among the caller's `plugins` replaces the project's (the search's worker
    brings its own, runtime.SnapshotCheckpointIO)."""
    if device == "cuda":
        # fp32 matmuls outside autocast may use TF32 tensor cores: chosen here, on purpose
        # (Lightning otherwise suggests it on every start).
        torch.set_float32_matmul_precision("high")
    defaults: dict[str, Any] = {
        "accelerator": "gpu" if device == "cuda" else "cpu",
        "devices": 1,
        "precision": resolve_precision(device, precision),
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,  # validation runs at each epoch's end anyway
    }
    plugins = list(options.get("plugins", []))
    if not any(isinstance(plugin, pl.plugins.CheckpointIO) for plugin in plugins):
        io = AtomicCheckpointIO()
        # Lightning's AsyncCheckpointIO copies the state before it returns since 2.5.4; an
        # older one (the `lightning` package some images carry) would write tensors that
        # training changes.
        if write_behind and Version(pl.__version__) >= Version("2.5.4"):
            io = pl.plugins.AsyncCheckpointIO(io)
        plugins.append(io)
    options["plugins"] = plugins
    return pl.Trainer(**{**defaults, **options})
