"""The libvirt connection: event loop, reconnect after libvirtd restarts, and
fan-out of domain events to subscribers.

Events only make the agent faster; whoever subscribes must still treat a poll
of libvirt as the truth, because events are lost while nobody listens.

The threads here follow vmhost.backoff's rule (log, back off, carry on): an
error in an event-loop iteration or in an event callback never ends the event
thread; when libvirt closes the connection (libvirtd restarted, keepalive
timed out) a reconnect thread reopens it with a backoff, so the event
subscriptions come back without waiting for the next caller of `get`.
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Callable

import libvirt

from vmhost.backoff import Backoff, run_forever, survived

log = logging.getLogger(__name__)

_event_loop_lock = threading.Lock()
_event_loop_started = False

LifecycleListener = Callable[[str, int, int], None]          # (vm uuid, event, detail)
BlockJobListener = Callable[[str, str, int, int], None]      # (vm uuid, disk, type, status)
IoErrorListener = Callable[[str, str, str], None]            # (vm uuid, disk, reason)
ReconnectListener = Callable[[], None]


def _start_event_loop() -> None:
    """libvirt needs its default event loop registered before the first open."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=run_event_loop, args=(libvirt.virEventRunDefaultImpl,),
                         daemon=True, name="libvirt-events").start()
        _event_loop_started = True


def run_event_loop(run_once: Callable[[], object],
                   stop: threading.Event | None = None) -> None:
    """Run libvirt's event loop until `stop` (never, in the agent): an
    iteration that raises is logged, counted and backed off."""
    run_forever("libvirt-events", run_once, stop or threading.Event(), Backoff(0.05, 5.0))


def _event_callback(handler):
    """A libvirt callback runs on the event thread, called from C: an error in
    it (the domain vanished before UUIDString, a bug) is logged and counted
    here instead of being printed to stderr by the binding."""
    @functools.wraps(handler)
    def guarded(*args) -> None:
        try:
            handler(*args)
        except Exception:
            survived("libvirt-events", f"event callback {handler.__name__} failed")
    return guarded


def _silence_default_error_handler() -> None:
    # libvirt prints every error to stderr by default; we log what matters.
    libvirt.registerErrorHandler(lambda ctx, err: None, None)


class Connection:
    def __init__(self, uri: str = "qemu:///system"):
        self.uri = uri
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._ever_connected = False
        self._closed = threading.Event()
        self._reconnect_lock = threading.Lock()
        self._reconnector: threading.Thread | None = None
        self.lifecycle_listeners: list[LifecycleListener] = []
        self.block_job_listeners: list[BlockJobListener] = []
        self.io_error_listeners: list[IoErrorListener] = []
        self.reconnect_listeners: list[ReconnectListener] = []
        _silence_default_error_handler()
        _start_event_loop()

    def get(self) -> libvirt.virConnect:
        """The live connection, reopened if libvirtd went away."""
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._drop()
            conn = self._conn = libvirt.open(self.uri)
            try:
                conn.setKeepAlive(5, 3)
                self._register()
            except BaseException:
                self._drop()   # never keep a half-registered connection; the next get retries
                raise
            reconnected, self._ever_connected = self._ever_connected, True
            log.info("%s to %s", "reconnected" if reconnected else "connected", self.uri)
        if reconnected:
            for listener in list(self.reconnect_listeners):
                try:
                    listener()
                except Exception:
                    log.exception("reconnect listener failed")
        return conn

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Cleanup of a connection that may be dead already: nothing here may raise.
        try:
            conn.unregisterCloseCallback()   # our own close must not look like a lost link
        except Exception:
            pass
        for cb in self._callback_ids:
            try:
                conn.domainEventDeregisterAny(cb)
            except Exception:
                pass
        self._callback_ids = []
        try:
            conn.close()
        except Exception:
            pass

    def _register(self) -> None:
        c = self._conn
        assert c is not None
        self._callback_ids = []
        for event_id, callback in (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job),
                (libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, self._on_io_error)):
            # One by one, so that _drop deregisters those made before a failure.
            self._callback_ids.append(c.domainEventRegisterAny(None, event_id, callback, None))
        c.registerCloseCallback(self._on_close, c)

    # Callbacks run on the libvirt event thread: keep them short, never call
    # back into libvirt synchronously from here.
    @_event_callback
    def _on_lifecycle(self, conn, dom, event, detail, opaque) -> None:
        self._fan_out(self.lifecycle_listeners, dom.UUIDString(), event, detail)

    @_event_callback
    def _on_block_job(self, conn, dom, disk, job_type, status, opaque) -> None:
        self._fan_out(self.block_job_listeners, dom.UUIDString(), disk, job_type, status)

    @_event_callback
    def _on_io_error(self, conn, dom, src_path, dev_alias, action, reason, opaque) -> None:
        self._fan_out(self.io_error_listeners, dom.UUIDString(), dev_alias, reason)

    @_event_callback
    def _on_close(self, conn, reason, opaque) -> None:
        if opaque is not self._conn or self._closed.is_set():
            return  # an older connection, or we are shutting down
        log.warning("libvirt closed the connection to %s (reason %s); reconnecting",
                    self.uri, reason)
        self._start_reconnector()

    def _start_reconnector(self) -> None:
        with self._reconnect_lock:
            if self._reconnector is not None and self._reconnector.is_alive():
                return
            self._reconnector = threading.Thread(target=self._reconnect, daemon=True,
                                                 name="libvirt-reconnect")
            self._reconnector.start()

    def _reconnect(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while not self._closed.is_set():
            try:
                self.get()
                return
            except libvirt.libvirtError as e:   # libvirtd not back yet: expected, no traceback
                delay = backoff.next()
                log.warning("reconnect to %s failed (%s); retrying in %.1fs", self.uri, e, delay)
            except Exception:
                delay = backoff.next()
                survived("libvirt-reconnect", f"reconnect to {self.uri} failed", delay)
            self._closed.wait(delay)

    @staticmethod
    def _fan_out(listeners, *args) -> None:
        for listener in list(listeners):
            try:
                listener(*args)
            except Exception:
                survived("libvirt-events", "libvirt event listener failed")
