"""The one gate for what the project writes and deletes in a user's folders: writes beside
the target then renamed over it, appends through `open_own` (no link), `check_no_links` before
a run writes, and deletes of folders only if `make_dir` marked them (docs/architecture.md)."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from cifar_ray.errors import NO_SPACE, DiskFull, UserError

MARKER = ".cifar_ray-made"  # in each folder the project made, and may therefore delete
MAX_ENTRIES = 1_000_000  # a walk of an output dir stops here: not an output dir


def _create_temporary(folder: Path, target: Path) -> Path:
    """A new empty file beside `target`, with the permissions the process's umask gives
    (mkstemp's 0600 would make every output private)."""
    while True:
        path = folder / f".{target.name}.{secrets.token_hex(6)}{target.suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
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
        if os.path.lexists(tmp):
            os.unlink(tmp)


def link_atomically(source: str | Path, target: str | Path) -> None:
    """Make `target` a hard link to `source` (the same bytes, not a copy), replacing it
    atomically. OSError where the file system has no hard links, or `source` is gone."""
    if Path(source) == Path(target):
        return
    with atomic_path(target) as tmp:
        tmp.unlink()
        os.link(source, tmp)


def write_bytes(target: str | Path, data: bytes | memoryview) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: str | Path, data: Any) -> None:
    """Standard JSON: a NaN or an infinity (a diverged loss) is written as null."""
    write_text(target, json.dumps(finite(data), indent=2, allow_nan=False) + "\n")


def finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")


def save_figure(fig, target: str | Path, **kwargs: Any) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", **kwargs)
    finally:
        plt.close(fig)


def refuse(path: Path, why: str) -> UserError:
    return UserError(f"refusing to use {path}: {why}; the project writes only into folders "
                     "whose files are its own (remove it, or choose another folder)")


def open_own(path: str | Path, append: bool = False) -> int:
    """A file descriptor for reading and writing `path` (created if missing), which is neither
    a symbolic link nor a file with a second hard link (writing would reach another file)."""
    path = Path(path)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if os.path.islink(path):
            raise refuse(path, "it is a symbolic link") from None
        if exc.errno in NO_SPACE:
            raise DiskFull(path, exc) from None
        raise refuse(path, exc.strerror or str(exc)) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise refuse(path, "it is not a plain file" if not stat.S_ISREG(info.st_mode)
                     else "it is a hard link to another file")
    return fd


def open_log(path: str | Path) -> IO[str]:
    """A log to append lines to (line-buffered), opened through `open_own`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return os.fdopen(open_own(path, append=True), "a", buffering=1, encoding="utf-8",
                     errors="backslashreplace")


def append_line(path: str | Path, line: str) -> None:
    with open_log(path) as f:
        f.write(line + "\n")


def check_no_links(root: str | Path, skip: tuple[str, ...] = ()) -> None:
    """UserError if `root` holds a symbolic link at any depth, or a file with a hard link
    outside it (more links than found inside); `skip`: top-level names left out."""
    root = Path(root)
    if root.is_symlink():
        raise refuse(root, "it is a symbolic link")
    if not root.is_dir():
        return
    seen: dict[tuple[int, int], int] = {}
    counts: dict[tuple[int, int], tuple[int, Path]] = {}
    entries = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            listing = list(os.scandir(folder))
        except OSError as exc:
            raise refuse(folder, f"it cannot be listed ({exc.strerror})") from None
        for entry in listing:
            entries += 1
            if entries > MAX_ENTRIES:
                raise refuse(root, f"it holds more than {MAX_ENTRIES:,} files")
            if folder == root and entry.name in skip:
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                raise refuse(path, "it is a symbolic link")
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise refuse(path, exc.strerror or str(exc)) from None
            if stat.S_ISDIR(info.st_mode):
                stack.append(path)
            elif info.st_nlink > 1:
                key = (info.st_dev, info.st_ino)
                seen[key] = seen.get(key, 0) + 1
                counts[key] = (info.st_nlink, path)
    for key, (nlink, path) in counts.items():
        if seen[key] < nlink:
            raise refuse(path, "it is a hard link to a file outside the folder")


def inside(root: str | Path, path: str | Path, verb: str = "delete") -> Path:
    """`path` with its folder resolved, once proven to lie strictly inside `root`; UserError
    (refusing to `verb` it) otherwise."""
    root = Path(root).resolve()
    path = Path(path)
    parent = path.parent.resolve()
    if path.name in ("", ".", "..") or not (parent == root or root in parent.parents):
        raise UserError(f"refusing to {verb} {path}: it is not inside {root}")
    return parent / path.name


def make_dir(path: str | Path) -> Path:
    """Make the folder `path` and mark it as the project's (`remove_made` may delete it); one
    already there with files the project did not make is refused."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise refuse(path, "it is a symbolic link" if path.is_symlink() else "it is not a folder")
    if path.is_dir() and any(path.iterdir()) and not is_made(path):
        raise refuse(path, f"it holds files that the project did not make (no {MARKER})")
    path.mkdir(parents=True, exist_ok=True)
    if not is_made(path):
        os.close(os.open(path / MARKER, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
    return path


def is_made(folder: Path) -> bool:
    """Whether `folder` is a real folder carrying the project's mark (a plain file)."""
    mark = folder / MARKER
    return (folder.is_dir() and not folder.is_symlink() and mark.is_file()
            and not mark.is_symlink())


def remove_made(root: str | Path, path: str | Path) -> None:
    """Delete `path` if it lies strictly inside `root` and, if a folder, carries `make_dir`'s
    mark; UserError otherwise. A link is removed, never followed."""
    target = inside(root, path)
    try:
        info = target.lstat()
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISDIR(info.st_mode):
            target.unlink()
        elif is_made(target):
            shutil.rmtree(target)
        else:
            raise UserError(f"refusing to delete {target}: the project did not make it (no "
                            f"{MARKER} in it); move or delete it yourself")
    except OSError as exc:
        raise UserError(f"cannot delete {target}: {exc.strerror or exc}") from None


def remove_if_empty(folder: str | Path) -> None:
    """Remove `folder` if it holds nothing (an output dir a refused run made)."""
    try:
        os.rmdir(folder)
    except OSError:
        pass


def read_inside(root: str | Path, name: str, limit: int) -> bytes:
    """The bytes of the plain file `root/name` (not a link), at most `limit`; else UserError."""
    target = inside(root, Path(root) / name, "read")
    if target.parent != Path(root).resolve():
        raise UserError(f"refusing to read {target}: not directly in {root}")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise UserError(f"cannot read {target}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise refuse(target, "it is not a plain file of its own")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{target}: larger than {limit:,} bytes")
    return data


def check_trusted(root: str | Path) -> None:
    """UserError unless all of `root` is this user's and nobody else can write it (as ssh
    checks its keys' folder): what Tune unpickles on --resume runs as code."""
    root = Path(root)
    me = os.geteuid()
    for folder in root.resolve().parents:  # whoever can replace a folder above can plant it
        info = folder.stat()
        if info.st_uid not in (me, 0) or (info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX):
            raise UserError(f"--resume: refusing to load the search in {root}: {folder} above it "
                            "can be written by other users, who could plant what resuming runs")
    for path in [root, *_walk(root)]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            raise refuse(path, "it is a symbolic link")
        if info.st_uid != me:
            raise UserError(f"--resume: refusing to load {path}: it belongs to another user "
                            f"(uid {info.st_uid}), and resuming runs the code a search's saved "
                            "state holds; resume only a search this user wrote")
        if info.st_mode & 0o002 or (info.st_mode & 0o020 and not _own_group(info.st_gid)):
            raise UserError(f"--resume: refusing to load {path}: other users can write it, and "
                            "resuming runs the code a search's saved state holds; "
                            f"chmod go-w it if only you wrote it")


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            yield Path(folder) / name


def _own_group(gid: int) -> bool:
    """Whether group `gid` is this user's private group (a umask of 002 assumes one)."""
    import grp
    import pwd

    try:
        me = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    others = [u for u in pwd.getpwall() if u.pw_gid == gid and u.pw_uid != me.pw_uid]
    return gid == me.pw_gid and set(group.gr_mem) <= {me.pw_name} and not others
