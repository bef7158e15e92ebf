"""The domain monitor survives its own prober failing (EMFILE, ENOMEM, any
exception): a transient failure keeps the last verdict, a persistent one turns
the domain INVALID after the probe timeout, and later checks update the status."""
from __future__ import annotations

import errno
import os
import subprocess
import threading

import pytest

from vmhost.backoff import thread_errors
from vmhost.storage import monitor as monitor_mod
from vmhost.storage.monitor import DomainMonitor, Prober
from vmhost.testing.waiting import wait_for

DEADLINE = 10.0


class ScriptedProber:
    """Answers from a script; an exception in it is raised. After the script,
    repeats its last answer."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
            step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, BaseException):
            raise step
        return step

    def set(self, *script):
        with self._lock:
            self.script = list(script)


class Changes:
    def __init__(self):
        self.seen: list[tuple[bool, str]] = []

    def __call__(self, sd, valid, reason):
        self.seen.append((valid, reason))


@pytest.fixture
def monitors():
    started: list[DomainMonitor] = []

    def make(prober, interval=0.02, timeout=60.0, probe_path="/nonexistent", start=True):
        changes = Changes()
        mon = DomainMonitor("sd-robust", probe_path, interval=interval, timeout=timeout,
                            on_change=changes, prober=prober)
        started.append(mon)
        if start:
            mon.start()
        return mon, changes
    yield make
    for mon in started:
        mon.stop()


VALID = (True, "", 0.001)
GONE = (False, "dd: failed to open 'metadata': No such file or directory", 0.001)


def test_prober_raising_once_leaves_the_monitor_alive(monitors):
    prober = ScriptedProber(VALID, OSError(errno.EMFILE, "Too many open files"), VALID)
    errors_before = thread_errors.get("monitor/sd-robus")
    mon, changes = monitors(prober)
    wait_for(lambda: prober.calls >= 3, what="checks after the prober error")
    assert mon._thread.is_alive()
    assert changes.seen == [(True, "")]     # one prober error does not flap the domain
    assert thread_errors.get("monitor/sd-robus") == errors_before + 1
    # Later checks still update the status, both ways.
    prober.set(GONE)
    wait_for(lambda: mon.status.valid is False, what="INVALID after a failed read")
    prober.set(VALID)
    wait_for(lambda: mon.status.valid is True, what="VALID again")
    assert changes.seen == [(True, ""), (False, GONE[1]), (True, "")]


def test_prober_failing_for_the_timeout_turns_the_domain_invalid(monitors):
    prober = ScriptedProber(VALID, MemoryError("cannot allocate"))
    mon, changes = monitors(prober, timeout=0.3)
    wait_for(lambda: mon.status.valid is False, what="INVALID after the grace")
    reason = mon.status.reason
    assert "cannot check the domain" in reason and "MemoryError: cannot allocate" in reason
    assert changes.seen[0] == (True, "") and changes.seen[1] == (False, reason)
    prober.set(VALID)
    wait_for(lambda: mon.status.valid is True, what="VALID once the prober works again")
    assert mon._thread.is_alive()


def test_first_check_failing_in_the_prober_reports_invalid_not_unknown(monitors):
    prober = ScriptedProber(OSError(errno.ENOMEM, "Cannot allocate memory"))
    mon, changes = monitors(prober, timeout=0.2)
    assert mon.status.valid is None
    wait_for(lambda: changes.seen, what="a verdict")
    assert changes.seen[0][0] is False and "Cannot allocate memory" in changes.seen[0][1]


def test_error_outside_the_probe_does_not_kill_the_thread(monitors, monkeypatch):
    prober = ScriptedProber(VALID)
    mon, changes = monitors(prober, start=False)
    real, calls = mon._set, []

    def broken_once(status):
        calls.append(status)
        if len(calls) == 1:
            raise RuntimeError("bug while recording the status")
        real(status)
    monkeypatch.setattr(mon, "_set", broken_once)
    mon.start()
    wait_for(lambda: mon.status.valid is True, what="a status after the bug")
    assert mon._thread.is_alive() and len(calls) >= 2 and changes.seen == [(True, "")]


def test_real_prober_survives_popen_emfile(monitors, monkeypatch, tmp_path):
    probe = tmp_path / "metadata"
    probe.write_bytes(b"x" * 4096)
    real_popen, refused = subprocess.Popen, []

    def popen(*args, **kwargs):
        if not refused:
            refused.append(True)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_popen(*args, **kwargs)
    monkeypatch.setattr(monitor_mod.subprocess, "Popen", popen)
    mon, changes = monitors(None, probe_path=str(probe), timeout=5)
    wait_for(lambda: mon.status.valid is True, what="VALID after EMFILE")
    assert refused and mon._thread.is_alive()
    probe.unlink()
    wait_for(lambda: mon.status.valid is False, what="INVALID once the file is gone")
    assert "metadata" in mon.status.reason


def test_prober_kills_its_child_when_waiting_fails(tmp_path, monkeypatch):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)              # dd blocks opening it, like a hung mount
    prober = Prober(str(fifo), timeout=5)
    started: list[subprocess.Popen] = []

    def communicate(self, *args, **kwargs):
        started.append(self)
        raise MemoryError("no memory for the pipe buffer")
    monkeypatch.setattr(subprocess.Popen, "communicate", communicate)
    with pytest.raises(MemoryError):
        prober()
    monkeypatch.undo()
    started[0].wait(DEADLINE)    # killed, not left blocked on the fifo
    assert started[0].returncode == -9
    fifo.unlink()
    fifo.write_bytes(b"x" * 4096)
    assert prober()[:2] == (True, "")   # the killed child was reaped; a new read ran
