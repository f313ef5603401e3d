"""Finding processes by pid, for tests that start Ray nodes and must stop exactly those."""

import os
import signal
import socket
import time
from pathlib import Path

# Command-line fragments of the processes a Ray node runs.
RAY_PROCESS_NAMES = ("gcs_server", "raylet", "ray::", "dashboard", "default_worker",
                     "log_monitor", "runtime_env_agent", "ray/_private")


def pids_with(*texts: str) -> set[int]:
    """Processes whose command line contains any of `texts`."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(text in cmd for text in texts):
                pids.add(int(entry.name))
    return pids


def descendants(pid: int) -> set[int]:
    """Every process below `pid` in the process tree, now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def kill_all(pids, sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_gone(pids, timeout: float) -> set[int]:
    """Waits until none of `pids` is alive, or `timeout`; returns those still alive."""
    deadline = time.time() + timeout
    while (left := {pid for pid in pids if alive(pid)}) and time.time() < deadline:
        time.sleep(0.5)
    return left


def free_port() -> int:
    """A loopback port nothing listens on (for Ray's ports, and for "nothing there" errors)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_hosts(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (from /proc/net/tcp, IPv4)."""
    hosts = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            hosts.add(".".join(str(b) for b in reversed(bytes.fromhex(addr))))
    return hosts


def files_containing(root: Path, text: str) -> list[Path]:
    """Files under `root` whose bytes contain `text`."""
    needle = text.encode()
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]
