"""The console's progress line: on a terminal it stays under the lines printed above it (redrawn
in place), in a log it is an ordinary line."""

import io

from cifar_ray.console import Console


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_progress_line_is_redrawn_under_each_new_line():
    screen = Console(Terminal())
    screen.progress("progress: 1/4")
    screen.line("trial a started")
    screen.progress("progress: 2/4")
    screen.finish()
    assert screen.stream.getvalue() == ("\r\033[Kprogress: 1/4"
                                        "\r\033[Ktrial a started\nprogress: 1/4"
                                        "\r\033[Kprogress: 2/4"
                                        "\n")
    # What a terminal shows: each \r\033[K wipes the line the cursor is on.
    shown = []
    for chunk in screen.stream.getvalue().split("\n"):
        shown.append(chunk.split("\r\033[K")[-1])
    assert [line for line in shown if line] == ["trial a started", "progress: 2/4"]


def test_in_a_log_every_progress_line_is_a_line():
    log = io.StringIO()
    screen = Console(log)
    screen.progress("progress: 1/4")
    screen.line("trial a started")
    screen.progress("progress: 2/4")
    screen.finish()
    assert log.getvalue() == "progress: 1/4\ntrial a started\nprogress: 2/4\n"
