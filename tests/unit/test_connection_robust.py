"""The libvirt event thread and the reconnect logic survive errors: an event-loop
iteration that raises, a callback that raises, a connection whose set-up fails
half-way, and a libvirtd that stays away for a while after closing the link."""
from __future__ import annotations

import threading

import libvirt
import pytest

from vmhost.backoff import thread_errors
from vmhost.virt import connection as connection_mod
from vmhost.virt.connection import Connection, run_event_loop
from vmhost.testing.waiting import wait_for

DEADLINE = 10.0


class FakeConn:
    """The part of virConnect that Connection uses."""

    def __init__(self, fail_register_at: int | None = None, fail_keepalive: bool = False):
        self.alive = True
        self.closed = False
        self.registered: dict[int, tuple] = {}
        self.close_cb = None
        self._ids = iter(range(100))
        self._fail_register_at = fail_register_at
        self._fail_keepalive = fail_keepalive

    def isAlive(self):
        return self.alive

    def setKeepAlive(self, interval, count):
        if self._fail_keepalive:
            raise libvirt.libvirtError("keepalive not supported")

    def domainEventRegisterAny(self, dom, event_id, cb, opaque):
        if self._fail_register_at is not None and len(self.registered) == self._fail_register_at:
            raise libvirt.libvirtError("cannot register")
        cb_id = next(self._ids)
        self.registered[cb_id] = (event_id, cb)
        return cb_id

    def domainEventDeregisterAny(self, cb_id):
        del self.registered[cb_id]

    def registerCloseCallback(self, cb, opaque):
        self.close_cb = (cb, opaque)

    def unregisterCloseCallback(self):
        self.close_cb = None

    def close(self):
        self.closed = True
        if self.close_cb:   # libvirt reports our own close too (reason CLIENT)
            cb, opaque = self.close_cb
            cb(self, libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT, opaque)

    def lose_link(self):
        """libvirtd went away: the link is dead and libvirt says so."""
        self.alive = False
        cb, opaque = self.close_cb
        cb(self, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, opaque)


class FakeLibvirt:
    """libvirt.open that hands out prepared connections or errors, in order."""

    def __init__(self, *script):
        self.script = list(script)
        self.opened: list[FakeConn] = []
        self.calls = 0
        self._lock = threading.Lock()

    def open(self, uri):
        with self._lock:
            self.calls += 1
            step = self.script.pop(0) if self.script else FakeConn()
        if isinstance(step, BaseException):
            raise step
        self.opened.append(step)
        return step


@pytest.fixture
def connect(monkeypatch):
    made: list[Connection] = []

    def make(*script):
        fake = FakeLibvirt(*script)
        monkeypatch.setattr(connection_mod.libvirt, "open", fake.open)
        conn = Connection("test:///fake")
        made.append(conn)
        return conn, fake
    yield make
    for conn in made:
        conn.close()


def test_event_loop_survives_iterations_that_raise():
    stop, calls = threading.Event(), []

    def run_once():
        calls.append(1)
        if len(calls) <= 2:
            raise libvirt.libvirtError("virEventRunDefaultImpl failed")
        if len(calls) == 3:
            raise RuntimeError("bug in a handle callback")
        if len(calls) >= 6:
            stop.set()
    before = thread_errors.get("libvirt-events")
    thread = threading.Thread(target=run_event_loop, args=(run_once, stop))
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive() and len(calls) == 6
    assert thread_errors.get("libvirt-events") == before + 3


class Dom:
    def __init__(self, uuid="vm-1", gone=False):
        self.uuid, self.gone = uuid, gone

    def UUIDString(self):
        if self.gone:
            raise libvirt.libvirtError("Domain not found: no domain with matching uuid")
        return self.uuid


def test_callback_errors_never_reach_libvirt_and_other_listeners_still_run(connect):
    conn, _ = connect()
    seen = []

    def broken(*args):
        raise ValueError("listener bug")
    conn.lifecycle_listeners += [broken, lambda *a: seen.append(a)]
    before = thread_errors.get("libvirt-events")
    conn._on_lifecycle(None, Dom(), 5, 0, None)                 # must not raise
    conn._on_lifecycle(None, Dom(gone=True), 5, 0, None)        # must not raise either
    conn._on_block_job(None, Dom(gone=True), "vda", 3, 0, None)
    conn._on_io_error(None, Dom(gone=True), "/p", "vda", 1, "enospc", None)
    assert seen == [("vm-1", 5, 0)]
    assert thread_errors.get("libvirt-events") == before + 4


def test_half_registered_connection_is_dropped_and_the_next_get_retries(connect):
    half = FakeConn(fail_register_at=2)
    no_keepalive = FakeConn(fail_keepalive=True)
    conn, fake = connect(half, no_keepalive)
    with pytest.raises(libvirt.libvirtError, match="cannot register"):
        conn.get()
    assert half.closed and half.registered == {}     # the two made before were undone
    with pytest.raises(libvirt.libvirtError, match="keepalive"):
        conn.get()
    assert no_keepalive.closed
    good = conn.get()
    assert good is fake.opened[2] and len(good.registered) == 3 and good.close_cb
    assert conn.get() is good


def test_lost_link_is_reopened_in_the_background_despite_errors(connect):
    first = FakeConn()
    conn, fake = connect(first, libvirt.libvirtError("Failed to connect socket"),
                         RuntimeError("unexpected"), FakeConn())
    reconnected = threading.Event()

    def broken_listener():
        raise ValueError("listener bug")
    conn.reconnect_listeners += [broken_listener, reconnected.set]
    assert conn.get() is first
    before = thread_errors.get("libvirt-reconnect")
    first.lose_link()                     # called on the event thread in real life
    assert reconnected.wait(DEADLINE)     # after a libvirtError and an unexpected error
    assert fake.calls == 4 and first.closed
    new = fake.opened[-1]
    assert conn.get() is new and len(new.registered) == 3
    assert thread_errors.get("libvirt-reconnect") == before + 1


def test_own_close_does_not_reconnect(connect):
    conn, fake = connect()
    first = conn.get()
    conn.close()
    assert first.closed and fake.calls == 1
    assert conn._reconnector is None


def test_close_stops_a_reconnect_in_progress(connect):
    first = FakeConn()
    failures = [libvirt.libvirtError("Failed to connect socket")] * 50
    conn, fake = connect(first, *failures)
    conn.get()
    first.lose_link()
    wait_for(lambda: fake.calls >= 2, what="a reconnect attempt")
    conn.close()
    conn._reconnector.join(DEADLINE)
    assert not conn._reconnector.is_alive()
