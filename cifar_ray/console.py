"""The console of a long command: lines, and one progress line a terminal redraws in place
under them. Workers' lines that start with CONSOLE_MARK reach it through the driver."""

from __future__ import annotations

import sys
import threading

CONSOLE_MARK = "[cifar_ray] "


class Console:
    """Prints lines, and one progress line that a terminal shows in place under them."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.lock = threading.Lock()
        self.status = ""  # the progress line shown in place (a terminal only)

    def line(self, text: str) -> None:
        with self.lock:
            if self.status:
                self.stream.write("\r\033[K")
            self.stream.write(text + "\n")
            if self.status:
                self.stream.write(self.status)
            self.stream.flush()

    def progress(self, text: str) -> None:
        if not self.tty:
            return self.line(text)
        with self.lock:
            self.status = text
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    def clear(self) -> None:
        """Take the progress line off (a terminal), before something else prints."""
        self._end("\r\033[K")

    def finish(self) -> None:
        """Leave the progress line where it is, as an ordinary line."""
        self._end("\n")

    def _end(self, text: str) -> None:
        with self.lock:
            if self.status:
                self.stream.write(text)
                self.stream.flush()
            self.status = ""


screen = Console()


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
