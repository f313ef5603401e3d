"""One run per output dir: a search or a training run holds `<output dir>/.lock` (the kernel's
flock, gone with its process however it ended) while it runs; a second command refuses at once.
Also what a training run's output dir may hold (`resume_point`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from cifar_ray.errors import ConfigError, UserError
from cifar_ray.files import check_no_links, open_own, remove_if_empty, remove_made

LOCK_NAME = ".lock"


def check_resume_or_overwrite(resume: bool, overwrite: bool) -> None:
    """Both flags at once are refused before anything in the output dir is touched."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other (--resume continues "
                        "what is in the output dir, --overwrite discards it): give one of them")


def resume_point(out: Path, overwrite: bool, resume: bool) -> Path | None:
    """A training run's output dir: never destroy a finished run by accident; return the
    checkpoint to resume from."""
    if resume:
        last = out / "last.ckpt"
        if not last.is_file():
            raise ConfigError(f"--resume: no {last} to resume from")
        return last
    if (out / "results.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a finished run (results.json); "
                          "pass --overwrite or choose another --output-dir")
    return None


@contextlib.contextmanager
def output_dir_lock(out: Path, command: str, lock_name: str = LOCK_NAME,
                    skip: tuple[str, ...] = (), check: Path | None = None) -> Iterator[None]:
    """Holds the folder's lock for the body, once no link in `check` (default: the folder)
    could lead a write outside it (files.check_no_links; `skip`: top-level names the run
    removes first); UserError (one line) if another live process holds it."""
    created = not out.exists()
    path = out / lock_name
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = open_own(path)
    except OSError as exc:  # a file of that name, no permission, a read-only disk
        raise UserError(f"cannot use {out} as the output dir: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{out} is in use by {holder}; wait for it to finish or choose "
                            "another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command} (pid {os.getpid()})\n".encode(), 0)
        check_no_links(check or out, skip)
        yield
    finally:
        # A run that stopped before writing anything (bad input) leaves no dir behind.
        if created and os.listdir(out) == [lock_name]:
            remove_made(out, path)
            remove_if_empty(out)
        os.close(fd)  # releases the lock
