"""Crash-safe file writes: a reader sees the old content or the new, never a torn file."""
from __future__ import annotations

import glob
import os
import socket

from vmhost import failpoints


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write data to path via temp file + fsync + rename + fsync of the directory."""
    directory = os.path.dirname(path) or "."
    _remove_stale_temps(path)
    tmp = f"{_temp_prefix(path)}{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    failpoints.hit("storage.metadata.temp_written")
    try:
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(directory)


def _temp_prefix(path: str) -> str:
    """Temp names carry the host name: hosts sharing storage (or lab hosts, whose
    agents have the same pid in their own PID namespaces) never pick the same one."""
    return f"{path}.tmp.{socket.gethostname()}."


def _remove_stale_temps(path: str) -> None:
    """Temp files of this host's writers that died before their rename (one writer
    per file on a host: the agent holds the file's lock while it writes). Another
    host's temp files are its own business: they may be in flight. `<path>.tmp.<pid>`
    is the name agents used before temps carried the host name (one host only)."""
    legacy = glob.escape(path) + ".tmp.[0-9]*"
    for stale in glob.glob(glob.escape(_temp_prefix(path)) + "*") + [
            p for p in glob.glob(legacy) if p.rsplit(".", 1)[1].isdigit()]:
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass


def unlink_durable(path: str) -> bool:
    """Remove path (if present) and make the removal durable. Returns whether it existed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(path) or ".")
    return True
