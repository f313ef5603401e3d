"""Finding processes by pid, for tests that start Ray nodes and must stop exactly those."""

import os
import signal
import socket
import time
import uuid
from pathlib import Path

# Command-line fragments of the processes a Ray node runs.
RAY_PROCESS_NAMES = ("gcs_server", "raylet", "ray::", "dashboard", "default_worker",
                     "log_monitor", "runtime_env_agent", "ray/_private")


# Every process this pytest process starts inherits this mark, so that two test runs on one
# machine, or two pytest-xdist workers, never count or stop each other's processes. Ray renames
# some of its processes (setproctitle overwrites their environment), so a process also counts
# when an ancestor carries the mark.
os.environ["CIFAR_RAY_TEST_SESSION"] = uuid.uuid4().hex
SESSION_MARK = f"CIFAR_RAY_TEST_SESSION={os.environ['CIFAR_RAY_TEST_SESSION']}"


def _processes() -> dict[int, tuple[int, str, bool]]:
    """pid -> (parent pid, command line, whether its environment carries SESSION_MARK)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
                environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            table[int(entry.name)] = (ppid, cmd, SESSION_MARK in environ)
    return table


def pids_with(*texts: str) -> set[int]:
    """This test session's processes whose command line contains any of `texts`."""
    table = _processes()

    def ours(pid: int) -> bool:
        seen = set()
        while pid in table and pid not in seen:
            seen.add(pid)
            if table[pid][2]:
                return True
            pid = table[pid][0]
        return False

    return {pid for pid, (_, cmd, _) in table.items()
            if any(text in cmd for text in texts) and ours(pid)}


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
