"""The libvirt connection: event loop, reconnect after libvirtd restarts, and
fan-out of domain events to subscribers.

Events only make the agent faster; whoever subscribes must still treat a poll
of libvirt as the truth, because events are lost while nobody listens.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import libvirt

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

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, daemon=True, name="libvirt-events").start()
        _event_loop_started = True


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
            conn = libvirt.open(self.uri)
            conn.setKeepAlive(5, 3)
            self._conn = conn
            self._register()
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
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for cb in self._callback_ids:
            try:
                conn.domainEventDeregisterAny(cb)
            except libvirt.libvirtError:
                pass
        self._callback_ids = []
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    def _register(self) -> None:
        c = self._conn
        assert c is not None
        self._callback_ids = [
            c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                     self._on_lifecycle, None),
            c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                                     self._on_block_job, None),
            c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON,
                                     self._on_io_error, None),
        ]

    # Callbacks run on the libvirt event thread: keep them short, never call
    # back into libvirt synchronously from here.
    def _on_lifecycle(self, conn, dom, event, detail, opaque) -> None:
        self._fan_out(self.lifecycle_listeners, dom.UUIDString(), event, detail)

    def _on_block_job(self, conn, dom, disk, job_type, status, opaque) -> None:
        self._fan_out(self.block_job_listeners, dom.UUIDString(), disk, job_type, status)

    def _on_io_error(self, conn, dom, src_path, dev_alias, action, reason, opaque) -> None:
        self._fan_out(self.io_error_listeners, dom.UUIDString(), dev_alias, reason)

    @staticmethod
    def _fan_out(listeners, *args) -> None:
        for listener in list(listeners):
            try:
                listener(*args)
            except Exception:
                log.exception("libvirt event listener failed")
