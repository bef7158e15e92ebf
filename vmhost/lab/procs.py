"""Processes by pid, safe against pid reuse: a pid is always paired with its start time."""
from __future__ import annotations

import os
import signal
import time


def start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot, or None if no such live process
    (a zombie counts as gone: it runs nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, started: int) -> bool:
    return pid > 0 and start_time(pid) == started


def kill(pid: int, started: int, sig: int) -> bool:
    """Send sig if pid is still the process started at `started`. Returns whether sent."""
    if not alive(pid, started):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def pids_in_namespace(ns: str) -> list[int]:
    """Live processes (seen from this namespace) whose PID namespace is ns."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_namespace(int(entry)) == ns and start_time(int(entry)):
            found.append(int(entry))
    return found


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry))
    return found


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def sigkill(pid: int, started: int) -> bool:
    return kill(pid, started, signal.SIGKILL)
