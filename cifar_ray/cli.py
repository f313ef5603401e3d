"""What every command line shares: its program name (`python -m cifar_ray.X` or the
`cifar-ray X` subcommand, as it was called) and its help's format."""

from __future__ import annotations

import argparse
from typing import Any

# module -> its subcommand of `cifar-ray`
SUBCOMMANDS = {"tune": "tune", "train": "train", "gradcam": "gradcam", "predict": "predict",
               "export": "export", "app": "app", "bench": "bench", "lr_find": "lr-find"}
invoked_as = ""  # "cifar-ray" when the console script dispatched the command
invoked_sub = ""  # the subcommand typed, where it is another's alias ("plan": tune --plan)


def program(module: str) -> str:
    """The command as the user typed it, for `usage:` lines."""
    if invoked_as:
        return f"{invoked_as} {invoked_sub or SUBCOMMANDS[module]}"
    return f"python -m cifar_ray.{module}"


def shown(value: Any) -> str:
    """A default as a person reads it: 3 significant digits, no empty quotes."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ",".join(shown(v) for v in value)
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default once, after its help, where it has one (not None, False or ''),
    unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "(default" in text
                or action.default in (None, False, "", [], argparse.SUPPRESS)):
            return text
        return f"{text} (default: {shown(action.default).replace('%', '%%')})"


def parser(module: str, description: str, usage: str | None = None) -> argparse.ArgumentParser:
    """`usage`: after the program's name, instead of every flag (a config's are dozens)."""
    return argparse.ArgumentParser(prog=program(module), description=description,
                                   usage=f"%(prog)s {usage}" if usage else None,
                                   formatter_class=HelpFormatter)
