"""User-facing errors: each becomes one line on stderr and exit code 2, never a traceback.

Code raises these for problems the *user* can fix (bad data, bad config, bad checkpoint);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

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


def cli_entry(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a command's main(): a UserError prints `error: ...` and returns exit code 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped
