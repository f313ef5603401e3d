"""Files the project writes and deletes. A writer writes a temporary file beside the target,
flushes it, then `os.replace`s it over the target: a reader sees the old file or the new one.
`remove_inside` deletes a path only once it is proven to lie inside the folder named for it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cifar_ray.errors import NO_SPACE, DiskFull, UserError


def _create_temporary(folder: Path, target: Path) -> Path:
    """A new empty file beside `target`, with the permissions the process's umask gives
    (mkstemp's 0600 would make every output private)."""
    while True:
        path = folder / f".{target.name}.{secrets.token_hex(6)}{target.suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(target.parent, target)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno in NO_SPACE:  # one line naming the file; the old one is still there
            raise DiskFull(target, exc) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def link_atomically(source: str | Path, target: str | Path) -> None:
    """Make `target` a hard link to `source` (the same bytes, not a copy), replacing it
    atomically. OSError where the file system has no hard links, or `source` is gone."""
    if Path(source) == Path(target):
        return
    with atomic_path(target) as tmp:
        tmp.unlink()
        os.link(source, tmp)


def write_json(target: str | Path, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def save_figure(fig, target: str | Path, **kwargs: Any) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", **kwargs)
    finally:
        plt.close(fig)


def remove_inside(root: str | Path, path: str | Path) -> None:
    """Delete `path` (a file, a link or a folder tree) if it exists, after proving that it lies
    strictly inside `root`; UserError otherwise. A link is removed, never followed."""
    root = Path(root).resolve()
    path = Path(path)
    parent = path.parent.resolve()
    if path.name in ("", ".", "..") or not (parent == root or root in parent.parents):
        raise UserError(f"refusing to delete {path}: it is not inside {root}")
    target = parent / path.name
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
