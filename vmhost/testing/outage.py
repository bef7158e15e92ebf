"""Storage outages made for real, for the tests and the demo."""
from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

HIDE_SOURCE = "vmhost-hide"   # the tmpfs's name in /proc/mounts


@contextlib.contextmanager
def storage_hidden(path: str) -> Iterator[None]:
    """A real outage at the file-system level: an empty tmpfs mounted over the
    storage. QEMU keeps its open files and runs on; everything that opens a
    path (the agent, its domain monitor, qemu-img) finds nothing."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", HIDE_SOURCE, path], check=True)
    try:
        if os.listdir(path):
            raise RuntimeError(f"{path} should look empty while hidden")
        yield
    finally:
        subprocess.run(["umount", "-l", path], check=True)


def unhide_all(path: str) -> int:
    """Remove every hiding tmpfs still mounted on `path` (left by a run that
    was killed); returns how many were removed."""
    removed = 0
    while is_hidden(path):
        subprocess.run(["umount", "-l", path], check=True)
        removed += 1
    return removed


def is_hidden(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[:2] == [HIDE_SOURCE, real] for line in f)
