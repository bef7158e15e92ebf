"""Refusing a connection, in the client's protocol, without being held up.

An answer (HTTP with a JSON-RPC error body, or a STOMP ERROR frame) is sent,
then the client's input is drained for a bounded time before closing:
closing with unread input resets the connection, which can destroy the
answer before the client reads it. Refuser does this for the connections
past the acceptor's cap, all in one thread.
"""
from __future__ import annotations

import logging
import select
import selectors
import socket
import threading
import time

from vmhost.api.jsonrpc import INVALID_REQUEST, encode_error
from vmhost.api.transport.frames import encode

log = logging.getLogger(__name__)

# After refusing, discard the client's input for at most this long / this much.
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 << 20
# Connections past the cap waiting for their refusal, at most.
MAX_REFUSING = 64
REFUSE_WAIT = 2.0
STOMP_COMMANDS = (b"CONNECT", b"STOMP")
TLS_HANDSHAKE_RECORD = 0x16  # the first byte of a TLS connection


def http_refusal(status: str, message: str) -> bytes:
    body = encode_error(INVALID_REQUEST, message)
    return (f"HTTP/1.1 {status}\r\nServer: vmhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii") + body


def stomp_refusal(message: str) -> bytes:
    return encode("ERROR", {"message": message, "content-type": "text/plain"},
                  message.encode("utf-8"))


def end_and_drain(sock: socket.socket) -> None:
    """Signal the end of what we sent, then discard the client's input
    until it closes, for at most LINGER_SECONDS / LINGER_BYTES. On the plain
    socket, also under a TLS socket whose session failed: nothing more is
    said in TLS."""
    deadline = time.monotonic() + LINGER_SECONDS
    drained = 0
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while drained < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            if not poller.poll(left * 1000):
                break
            try:
                chunk = socket.socket.recv(sock, 1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:  # woken for nothing
                continue
            if not chunk:
                break
            drained += len(chunk)
    except OSError:  # reset by the client, or stop() shut the socket
        pass


class Refuser:
    """Refuses connections past the cap, all in one thread, without
    blocking on any of them: waits up to REFUSE_WAIT for a connection's
    first bytes, answers in its protocol, drains its input until it closes
    or the time is up. At most MAX_REFUSING at a time; more are closed at
    once."""

    def __init__(self, tls: bool):
        self._tls = tls
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._incoming: list[tuple[socket.socket, str]] = []
        self._pending: dict[socket.socket, float] = {}   # socket -> deadline
        self._answered: set[socket.socket] = set()       # draining after the answer
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.refused = 0
        self._last_log = 0.0
        self._message = ""

    def refuse(self, conn: socket.socket, who: str, cap: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log >= 10:
            self._last_log = now
            log.warning("connection limit of %d reached: refusing %s (%d refused so far)",
                        cap, who, self.refused)
        self._message = (f"too many connections: the agent serves at most {cap} at a time; "
                         "try again later")
        with self._lock:
            if self._stopping or len(self._incoming) + len(self._pending) >= MAX_REFUSING:
                full = True
            else:
                full = False
                self._incoming.append((conn, who))
            if not full and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="api-refuser", daemon=True)
                self._thread.start()
        if full:
            conn.close()
            return
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if thread is not None:
            thread.join()
        for sock in [*self._pending, *(s for s, _ in self._incoming)]:
            sock.close()
        self._pending.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                incoming, self._incoming = self._incoming, []
            for conn, _ in incoming:
                conn.setblocking(False)
                self._pending[conn] = time.monotonic() + REFUSE_WAIT
                self._selector.register(conn, selectors.EVENT_READ)
            timeout = max(0.0, min(self._pending.values(), default=time.monotonic() + 1)
                          - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.fileobj is self._wake_r:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                self._readable(key.fileobj)  # type: ignore[arg-type]
            now = time.monotonic()
            for conn in [c for c, deadline in self._pending.items() if deadline <= now]:
                self._close(conn)

    def _readable(self, conn: socket.socket) -> None:
        try:
            if conn in self._answered:
                if not conn.recv(1 << 16):
                    self._close(conn)
                return
            first = conn.recv(16, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not first or (self._tls and first[0] == TLS_HANDSHAKE_RECORD):
            self._close(conn)
            return
        if first.lstrip(b"\r\n").startswith(STOMP_COMMANDS):
            answer = stomp_refusal(self._message)
        else:
            answer = http_refusal("503 Service Unavailable", self._message)
        try:
            conn.send(answer)  # small: fits in the socket buffer
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self._answered.add(conn)

    def _close(self, conn: socket.socket) -> None:
        self._pending.pop(conn, None)
        self._answered.discard(conn)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()
