"""Crash-safe writes on storage that several hosts share."""
from __future__ import annotations

import os
import socket

from vmhost import fsutil


def test_stale_temps_of_this_host_go_and_other_hosts_temps_stay(tmp_path, monkeypatch):
    path = str(tmp_path / "vol.meta")
    mine = f"{path}.tmp.{socket.gethostname()}.4242"       # a writer of ours that died
    theirs = f"{path}.tmp.otherhost.4242"                  # in flight on another host
    for temp in (mine, theirs):
        with open(temp, "wb") as f:
            f.write(b"partial")
    names = []
    real_open = os.open
    monkeypatch.setattr(fsutil.os, "open", lambda p, *a: names.append(p) or real_open(p, *a))
    fsutil.atomic_write(path, b"new")
    with open(path, "rb") as f:
        assert f.read() == b"new"
    assert not os.path.exists(mine)
    assert os.path.exists(theirs)
    assert f"{path}.tmp.{socket.gethostname()}.{os.getpid()}" in names
