"""Running a cifar_ray command the way a user would, in a process of its own: what the
benchmarks measure end to end (`measure`, `recipe_bench`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cifar_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def run_command(module: str, args: list[str], timeout: float, tmp: str) -> float:
    """Run `python -m module args` from the project root in a process group of its own
    (ended whole if it fails or times out); its wall seconds, or UserError with its last line."""
    env = dict(os.environ, TMPDIR=tmp)  # Ray's sockets: a short path
    started = time.perf_counter()
    with open(Path(tmp) / "output.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except BaseException:  # a time-out, this section's limit, Ctrl-C
            end_group(proc)
            raise
        if returncode != 0:
            end_group(proc)
            log.seek(0)
            last = (log.read().strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"{module} failed: {last}")
    return time.perf_counter() - started


def end_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group `proc` leads (by its id, never by name)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
