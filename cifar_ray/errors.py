"""User-facing errors: each becomes one line on stderr and exit code 2, never a traceback.

Code raises these for problems the *user* can fix (bad data, bad config, bad checkpoint);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import sys
from typing import Callable

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with the user's input, stated in one line."""

    exit_code = EXIT_USAGE


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class Interrupted(UserError):
    """A run or search asked to stop (Ctrl-C, SIGTERM) that saved what `--resume` needs."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code  # the shell's: 130 after Ctrl-C, 143 after SIGTERM


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """A write failed for want of space: which file, and what was kept."""

    def __init__(self, path, exc: OSError):
        super().__init__(f"no space left to write {path} ({exc.strerror or exc}); files written "
                         "before it are intact: free some space and run the same command again")


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
