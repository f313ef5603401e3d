"""Where a run computes, in what precision, and the Lightning Trainer: decided here, once, for
every caller. `device` is `auto` (CUDA when this process sees a GPU), `cpu` or `cuda`."""

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
    """Checkpoints written as every output is (files.atomic_path), beside the target then
    renamed (Lightning's writer moves across file systems: a full disk tore last.ckpt). In a
    best epoch, last.ckpt is a hard link to best.ckpt, not a second copy."""

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
            except OSError:  # no hard links here, or the file is gone: write it
                pass  # (a full disk is DiskFull, not OSError: it goes on up)
        buffer = io.BytesIO()  # torch.save to a file reports a full disk as a RuntimeError
        torch.save(checkpoint, buffer)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
        self._written = (state, path)


class SnapshotCheckpointIO(AtomicCheckpointIO):
    """Saving takes a copy of the state and keeps it; `write(path)` writes it, atomically,
    later and from any thread (the search's worker: Ray Train's upload thread)."""

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
    """A Lightning Trainer on `device` with the project's defaults, which `options` add to or
    replace; `write_behind`: checkpoints written by a thread while training goes on."""
    if device == "cuda":
        # TF32 for fp32 matmuls outside autocast, chosen here on purpose.
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
        # AsyncCheckpointIO copies the state first since Lightning 2.5.4.
        if write_behind and Version(pl.__version__) >= Version("2.5.4"):
            io = pl.plugins.AsyncCheckpointIO(io)
        plugins.append(io)
    options["plugins"] = plugins
    return pl.Trainer(**{**defaults, **options})
