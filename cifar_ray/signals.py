"""Ctrl-C and SIGTERM, handled in one place: a training run raises at once (Lightning then
tears down); a search sets a Stop its driver checks where it waits (an exception raised
inside Ray's C++ calls comes out as a SystemError traceback)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

from cifar_ray.errors import DiskFull


def signal_name(sig: int) -> str:
    return "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name


@contextlib.contextmanager
def handling(handler) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM during the body; the previous handlers afterwards."""
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def raise_on_signals(error: Callable[[str, int], Exception]) -> Iterator[None]:
    """A signal raises error(its name, the shell's exit code for it) where the process is."""

    def on_signal(sig, frame) -> None:
        raise error(signal_name(sig), 128 + sig)

    with handling(on_signal):
        yield


class Stop(threading.Event):
    """Set when the search was asked to stop (`exit_code`: the shell's for the signal), or
    stopped itself when a trial ran out of disk space (every other trial would too)."""

    exit_code = 0
    full_disk: DiskFull | None = None

    def __init__(self, then=None):
        super().__init__()
        self.then = then

    def request(self, exit_code: int, full_disk: DiskFull | None = None) -> None:
        """Stop, once: note why, set, and call `then` (for the search: ask Tune to stop)."""
        if not self.is_set():
            self.exit_code, self.full_disk = exit_code, full_disk
            self.set()
            if self.then:
                self.then()

    def stop_for_full_disk(self, error: DiskFull) -> None:
        self.request(error.exit_code, error)


@contextlib.contextmanager
def stop_signals(doing: str, then=None) -> Iterator[Stop]:
    """A signal sets the Stop yielded here (and calls `then`); a second one aborts. The SIGTERM
    handler also replaces Ray's, which prints C++ stack dumps."""
    stop = Stop(then)

    def on_signal(sig, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(f"\n{signal_name(sig)}: {doing} (Ctrl-C again to abort) ...", flush=True)
        stop.request(128 + sig)

    with handling(on_signal):
        yield stop


@contextlib.contextmanager
def ctrl_c_stops_tune() -> Iterator[Stop]:
    """stop_signals during the search: the first signal asks Tune to stop gracefully, through
    its own SIGUSR1 handler (its SIGINT handler off, so the Stop tells that it was asked)."""
    # Until Tune installs its SIGUSR1 handler, SIGUSR1 must not kill the process.
    previous_usr1 = signal.signal(signal.SIGUSR1, lambda sig, frame: None)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        with stop_signals("stopping the search",
                          then=lambda: os.kill(os.getpid(), signal.SIGUSR1)) as interrupted:
            yield interrupted
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)


def sigterm_as_ctrl_c() -> None:
    """SIGTERM ends a long-running command (the app's server) as Ctrl-C does, so that what
    runs on KeyboardInterrupt (its temporary files' removal) runs for both."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
