"""Atomic output files: a reader (or a crash) sees the old file or the new one, never a torn one.

Each writer writes a temporary file beside the target, flushes it to disk, then `os.replace`s it
over the target, which POSIX makes atomic within one filesystem.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cifar_ray.errors import NO_SPACE, DiskFull

UMASK = os.umask(0)  # read once: os.umask can only be read by setting it
os.umask(UMASK)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600 would make every output private
    os.close(fd)
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
