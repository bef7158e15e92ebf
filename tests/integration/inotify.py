"""Count file-system accesses under directories with inotify (ctypes, no deps):
the proof that recovery reads no storage."""
from __future__ import annotations

import ctypes
import os
import struct

IN_ACCESS, IN_MODIFY, IN_OPEN = 0x1, 0x2, 0x20
_libc = ctypes.CDLL(None, use_errno=True)


class AccessCounter:
    def __init__(self, dirs: list[str], mask: int = IN_ACCESS | IN_MODIFY | IN_OPEN):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.watches = {}
        for d in dirs:
            wd = _libc.inotify_add_watch(self.fd, d.encode(), mask)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")
            self.watches[wd] = d
        self.events: list[tuple[str, int, str]] = []

    def drain(self) -> list[tuple[str, int, str]]:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.events
            pos = 0
            while pos < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16: pos + 16 + length].rstrip(b"\0").decode()
                self.events.append((self.watches.get(wd, "?"), mask, name))
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)
