"""User-facing errors: each becomes one line on stderr and exit code 2, never a traceback.
Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import functools
import sys
from typing import Callable

from cifar_ray.names import shown_name

EXIT_USAGE = 2




class UserError(Exception):
    """A problem with the user's input, stated in one line."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str = ""):
        # Quoted input (a YAML key, a file name) is shown escaped: one printable line.
        super().__init__(shown_name(message, limit=4000))


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


# Errors raised in a Ray worker are pickled to reach the driver: these say how to rebuild.


class Interrupted(UserError):
    """A run or search asked to stop (Ctrl-C, SIGTERM) that saved what `--resume` needs."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code  # the shell's: 130 after Ctrl-C, 143 after SIGTERM

    def __reduce__(self):
        return type(self), (str(self), self.exit_code)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """A write failed for want of space: which file, why (the OSError or its text), and what
    was kept."""

    def __init__(self, path, exc: OSError | str):
        self.path = str(path)
        self.reason = exc if isinstance(exc, str) else (exc.strerror or str(exc))
        super().__init__(f"no space left to write {path} ({self.reason}); files written "
                         "before it are intact: free some space and run the same command again")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def full_disk(exc: BaseException | None) -> DiskFull | None:
    """The DiskFull in `exc` or its causes (Ray wraps an error raised in a worker: a
    RayTaskError's `cause`), an OSError for want of space made one; else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return exc
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return DiskFull(exc.filename or "a file", exc)
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def cli_entry(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a command's main(): a UserError prints `error: ...` and returns exit code 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            # A write deep in a library (a checkpoint, an event file) that ran out of space.
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"error: no space left on the device{where} ({exc.strerror}); files written "
                  "before it are intact: free some space and run the same command again",
                  file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped
