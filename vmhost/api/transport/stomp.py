"""JSON-RPC over STOMP 1.2, as VDSM speaks it, behind the acceptor.

What a client does (VDSM's `vdsm.client`, the engine, `stomp.py`):

    CONNECT accept-version:1.2 heart-beat:cx,cy   -> CONNECTED version:1.2 heart-beat:sx,sy
    SUBSCRIBE destination:<queue> id:<sub> ack:auto
    SEND destination:jms.topic.vdsm_requests reply-to:<queue>  + JSON-RPC request or batch
                                                   -> MESSAGE destination:<queue> subscription:<sub>
                                                      message-id:<n> + the JSON-RPC answer
    SUBSCRIBE destination:jms.queue.events id:<sub2>  -> MESSAGE ... for every event
                                                      (vmhost/api/notifications.py)
    DISCONNECT receipt:<r>                         -> RECEIPT receipt-id:<r>, then close

Requests go to the one Dispatcher (the same as HTTP's) on a pool of
MAX_WORKERS threads shared by all STOMP connections, as VDSM runs them on
its executor: one connection (an engine uses one for everything) is not
held up by a slow call, e.g. one waiting on a hung storage domain, and its
answers may come in another order than the requests (a client matches them
by JSON-RPC id). A connection has at most MAX_IN_FLIGHT requests running;
past that it stops reading until one ends. A SEND without reply-to is answered
on jms.topic.vdsm_responses (the engine's queue). Any frame with a `receipt`
header gets its RECEIPT. Protocol errors (malformed or oversized frames, an
unknown destination, too many subscriptions, transactions, which are not
supported) get an ERROR frame saying what was wrong, and the connection
ends.

Heart-beats: the server sends one (a bare EOL) every sx = max(cy, 1000) ms
of silence when the client asks for them (cy > 0), and expects something
from the client every sy = max(cx, 1000) ms when it offers them (cx > 0):
a client silent for 1.5 sy is dropped. A client that offers none (cx = 0,
as VDSM's own client does) is not timed out; the acceptor's connection cap
bounds what such clients can hold.

All of a connection's socket I/O happens in its own thread (an SSL socket
must not be used by two threads at once). Events arrive on the bus
publisher's thread, are turned into a notification once, and queued for
each subscribed connection (at most MAX_OUTBOX frames waiting: a client
that does not read is dropped, never the agent), whose thread is woken by
an eventfd. A write blocked for SEND_TIMEOUT (a client that stopped
reading) ends the connection too.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.notifications import EVENTS_DESTINATION, to_notification
from vmhost.api.transport.refusal import end_and_drain
from vmhost.api.transport.frames import HEARTBEAT, Frame, FrameError, FrameLimits, Parser, encode
from vmhost.events import EventBus

log = logging.getLogger(__name__)

REQUEST_DESTINATIONS = frozenset({"jms.topic.vdsm_requests", "jms.topic.vdsm_irs_requests"})
DEFAULT_REPLY_TO = "jms.topic.vdsm_responses"
MIN_HEARTBEAT_MS = 1000
# A client that offered heart-beats is dropped after this many intervals of silence.
HEARTBEAT_GRACE = 1.5
# The CONNECT frame must be complete within this long of the first byte.
CONNECT_TIMEOUT = 10.0
MAX_SUBSCRIPTIONS = 100
MAX_OUTBOX = 1000
MAX_WORKERS = 16
MAX_IN_FLIGHT = 8
DISCONNECT_WAIT = 10.0
_SLOT_CHECK = 0.5
SEND_TIMEOUT = 30.0
_READ_SIZE = 1 << 16


class StompProtocol:
    def __init__(self, dispatcher: Dispatcher, events: EventBus | None = None,
                 limits: FrameLimits = FrameLimits(),
                 max_subscriptions: int = MAX_SUBSCRIPTIONS):
        self._dispatcher = dispatcher
        self.limits = limits
        self.max_subscriptions = max_subscriptions
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._stopping = False
        self._workers = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="stomp-call")
        if events is not None:
            events.listen(self._on_event)

    def serve(self, conn: socket.socket, prefix: bytes, peer: str) -> None:
        connection = _Connection(self, conn, peer)
        with self._lock:
            if self._stopping:
                connection.close()
                return
            self._connections.add(connection)
        try:
            connection.run(prefix)
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            connections = list(self._connections)
        for connection in connections:
            connection.end()
        self._workers.shutdown(wait=False, cancel_futures=True)

    def submit(self, call: Callable[[], None]) -> bool:
        """Run `call` on the workers; False once stopped."""
        try:
            self._workers.submit(call)
        except RuntimeError:  # shut down
            return False
        return True

    def dispatch(self, body: bytes) -> bytes | None:
        try:
            return self._dispatcher.handle_bytes(body)
        except Exception:  # the Dispatcher should not raise; stay up if it does
            log.exception("dispatcher failed")
            return None

    def _on_event(self, event: dict) -> None:
        # On the publisher's thread: cheap, never blocks.
        with self._lock:
            if self._stopping:
                return
            subscribers = [c for c in self._connections if c.subscribed(EVENTS_DESTINATION)]
        if not subscribers:
            return
        body = json.dumps(to_notification(event), separators=(",", ":"),
                          default=str).encode("utf-8")
        for connection in subscribers:
            connection.offer(EVENTS_DESTINATION, body)


class _Closing(Exception):
    """End the connection (after sending what is queued)."""


class _Connection:
    def __init__(self, protocol: StompProtocol, sock: socket.socket, peer: str):
        self._protocol = protocol
        self._sock = sock
        self.peer = peer
        self._parser = Parser(protocol.limits)
        self._connected = False
        self._subscriptions: dict[str, str] = {}   # id -> destination
        self._lock = threading.Lock()               # outbox, subscriptions, flags
        self._outbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._overflow = False
        self._ended = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._message_ids = itertools.count(1)
        self._in_flight = threading.Semaphore(MAX_IN_FLIGHT)
        self._send_every = 0.0      # seconds; 0: no heart-beats to send
        self._expect_every = 0.0    # seconds; 0: the client sends none
        self._last_sent = self._last_received = time.monotonic()

    # --- called from other threads -------------------------------------------------

    def subscribed(self, destination: str) -> bool:
        with self._lock:
            return destination in self._subscriptions.values()

    def offer(self, destination: str, body: bytes) -> None:
        with self._lock:
            if self._ended:
                return
            if len(self._outbox) >= MAX_OUTBOX:
                self._overflow = True
            else:
                self._outbox.append((destination, body))
        self._signal()

    def end(self) -> None:
        with self._lock:
            self._ended = True
        self._signal()

    def _signal(self) -> None:
        with self._lock:  # not after close(): the fd number may be reused
            if self._wake < 0:
                return
            try:
                os.eventfd_write(self._wake, 1)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._ended = True
            wake, self._wake = self._wake, -1
        if wake >= 0:
            os.close(wake)

    # --- the connection's thread --------------------------------------------------------

    def run(self, prefix: bytes) -> None:
        self._sock.settimeout(0)
        self._poller = select.poll()
        self._poller.register(self._sock, select.POLLIN)
        self._poller.register(self._wake, select.POLLIN)
        connect_deadline = time.monotonic() + CONNECT_TIMEOUT
        try:
            self._received(prefix)
            while True:
                self._flush()
                now = time.monotonic()
                if not self._connected and now >= connect_deadline:
                    log.info("STOMP: %s sent no complete CONNECT within %gs; closed",
                             self.peer, CONNECT_TIMEOUT)
                    return
                self._check_heartbeats(now)
                data = self._wait_and_read(self._next_timeout(now, connect_deadline))
                if data == b"":
                    log.debug("STOMP: %s closed the connection", self.peer)
                    self._finish_calls()  # it may still read (a half-close)
                    return
                if data is not None:
                    self._received(data)
        except FrameError as e:
            self._error(str(e))
        except _Closing:
            pass

    def _received(self, data: bytes) -> None:
        if data:
            self._last_received = time.monotonic()
        for frame in self._parser.feed(data):
            self._handle(frame)

    def _next_timeout(self, now: float, connect_deadline: float) -> float:
        deadlines = []
        if not self._connected:
            deadlines.append(connect_deadline)
        if self._send_every:
            deadlines.append(self._last_sent + self._send_every)
        if self._expect_every:
            deadlines.append(self._last_received + self._expect_every * HEARTBEAT_GRACE)
        return max(0.0, min(deadlines) - now) if deadlines else -1

    def _check_heartbeats(self, now: float) -> None:
        if self._expect_every and now - self._last_received > self._expect_every * HEARTBEAT_GRACE:
            log.info("STOMP: %s silent for more than %.1fs (heart-beat %dms); dropped",
                     self.peer, self._expect_every * HEARTBEAT_GRACE, self._expect_every * 1000)
            raise _Closing()
        if self._send_every and now - self._last_sent >= self._send_every:
            self._write(HEARTBEAT)

    def _wait_and_read(self, timeout: float) -> bytes | None:
        """What the socket has (b"" at end of file), or None: woken by an
        event, or the timeout passed."""
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return self._read()
        ready = dict(self._poller.poll(None if timeout < 0 else timeout * 1000))
        if self._wake in ready:
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
        if self._sock.fileno() in ready:
            return self._read()
        return None

    def _read(self) -> bytes | None:
        try:
            return self._sock.recv(_READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None  # a TLS record without data yet, or woken for nothing

    def _flush(self) -> None:
        with self._lock:
            ended, overflow = self._ended, self._overflow
            queued = list(self._outbox)
            self._outbox.clear()
        if overflow:
            log.warning("STOMP: %s does not read its events (%d waiting); dropped",
                        self.peer, MAX_OUTBOX)
            self._error(f"too slow: more than {MAX_OUTBOX} messages waiting; closing")
            raise _Closing()
        for destination, body in queued:
            self._message(destination, body)
        if ended:
            raise _Closing()

    def _write(self, data: bytes) -> None:
        self._sock.settimeout(SEND_TIMEOUT)
        try:
            self._sock.sendall(data)
        except TimeoutError:
            log.warning("STOMP: %s has not read for %gs; dropped", self.peer, SEND_TIMEOUT)
            raise _Closing() from None
        except OSError as e:
            log.debug("STOMP: writing to %s failed: %s", self.peer, e)
            raise _Closing() from None
        finally:
            try:
                self._sock.settimeout(0)
            except OSError:
                pass
        self._last_sent = time.monotonic()

    def _send(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        self._write(encode(command, headers, body))

    def _message(self, destination: str, body: bytes) -> None:
        with self._lock:
            subscriptions = [sid for sid, dest in self._subscriptions.items() if dest == destination]
        for sid in subscriptions or [None]:
            headers = {"destination": destination, "content-type": "application/json",
                       "message-id": str(next(self._message_ids))}
            if sid is not None:
                headers["subscription"] = sid
            self._send("MESSAGE", headers, body)

    def _error(self, message: str, frame: Frame | None = None,
               extra: dict[str, str] | None = None) -> None:
        log.info("STOMP: error to %s: %s", self.peer, message)
        headers = {"message": message[:200], "content-type": "text/plain", **(extra or {})}
        if frame is not None and "receipt" in frame.headers:
            headers["receipt-id"] = frame.headers["receipt"]
        try:
            self._send("ERROR", headers, message.encode("utf-8"))
        except _Closing:
            return
        end_and_drain(self._sock)

    # --- frames ------------------------------------------------------------------------------

    def _handle(self, frame: Frame) -> None:
        if not self._connected and frame.command not in ("CONNECT", "STOMP"):
            self._refuse(f"{frame.command} before CONNECT", frame)
        handler = getattr(self, f"_on_{frame.command.lower()}")
        handler(frame)
        receipt = frame.headers.get("receipt")
        if receipt is not None and frame.command != "DISCONNECT":
            self._send("RECEIPT", {"receipt-id": receipt})

    def _refuse(self, message: str, frame: Frame, extra: dict[str, str] | None = None) -> None:
        self._error(message, frame, extra)
        raise _Closing()

    def _on_connect(self, frame: Frame) -> None:
        if self._connected:
            self._refuse("already connected", frame)
        versions = frame.headers.get("accept-version", "1.0").split(",")
        if "1.2" not in (v.strip() for v in versions):
            self._refuse("this server speaks STOMP 1.2 only", frame, {"version": "1.2"})
        cx, cy = _heart_beat(frame.headers.get("heart-beat", "0,0"), self, frame)
        sx = max(cy, MIN_HEARTBEAT_MS) if cy else 0
        sy = max(cx, MIN_HEARTBEAT_MS) if cx else 0
        self._send_every, self._expect_every = sx / 1000, sy / 1000
        self._connected = True
        self._send("CONNECTED", {"version": "1.2", "heart-beat": f"{sx},{sy}",
                                 "server": "vmhost"})

    _on_stomp = _on_connect

    def _on_subscribe(self, frame: Frame) -> None:
        destination, sid = frame.headers.get("destination"), frame.headers.get("id")
        if not destination or sid is None:
            self._refuse("SUBSCRIBE needs the destination and id headers", frame)
        with self._lock:
            count = len(self._subscriptions)
            duplicate = sid in self._subscriptions
        if duplicate:
            self._refuse(f"subscription id {sid[:80]!r} is already in use", frame)
        if count >= self._protocol.max_subscriptions:
            self._refuse(f"too many subscriptions: at most {self._protocol.max_subscriptions} "
                         "per connection", frame)
        with self._lock:
            self._subscriptions[sid] = destination  # type: ignore[index]

    def _on_unsubscribe(self, frame: Frame) -> None:
        sid = frame.headers.get("id")
        if sid is None:
            self._refuse("UNSUBSCRIBE needs the id header", frame)
        with self._lock:
            self._subscriptions.pop(sid, None)  # type: ignore[arg-type]

    def _on_send(self, frame: Frame) -> None:
        destination = frame.headers.get("destination")
        if destination not in REQUEST_DESTINATIONS:
            self._refuse(f"unknown destination {str(destination)[:80]!r}: send JSON-RPC requests "
                         f"to {' or '.join(sorted(REQUEST_DESTINATIONS))}", frame)
        reply_to = frame.headers.get("reply-to") or DEFAULT_REPLY_TO
        body = frame.body
        # Past MAX_IN_FLIGHT: wait, reading nothing more (until stop()).
        while not self._in_flight.acquire(timeout=_SLOT_CHECK):
            with self._lock:
                if self._ended:
                    raise _Closing()

        def call() -> None:
            try:
                answer = self._protocol.dispatch(body)
            finally:
                self._in_flight.release()
            if answer is not None:
                self.offer(reply_to, answer)

        if not self._protocol.submit(call):
            self._in_flight.release()
            raise _Closing()

    def _finish_calls(self) -> None:
        """Send the answers to the requests still running (waiting at most
        DISCONNECT_WAIT for them)."""
        deadline = time.monotonic() + DISCONNECT_WAIT
        taken = 0
        while taken < MAX_IN_FLIGHT and self._in_flight.acquire(
                timeout=max(0.0, deadline - time.monotonic())):
            taken += 1
        for _ in range(taken):
            self._in_flight.release()
        self._flush()

    def _on_disconnect(self, frame: Frame) -> None:
        self._finish_calls()  # their answers come before the receipt
        receipt = frame.headers.get("receipt")
        if receipt is not None:
            self._send("RECEIPT", {"receipt-id": receipt})
        raise _Closing()

    def _on_ack(self, frame: Frame) -> None:
        pass  # every subscription is ack:auto in effect; nothing to acknowledge

    _on_nack = _on_ack

    def _on_begin(self, frame: Frame) -> None:
        self._refuse("transactions (BEGIN, COMMIT, ABORT) are not supported", frame)

    _on_commit = _on_abort = _on_begin


def _heart_beat(value: str, connection: _Connection, frame: Frame) -> tuple[int, int]:
    try:
        cx, cy = (int(part) for part in value.split(","))
        if cx < 0 or cy < 0 or cx > 1 << 31 or cy > 1 << 31:
            raise ValueError
    except ValueError:
        connection._refuse(f"invalid heart-beat header {value[:40]!r}: expected cx,cy in ms", frame)
        raise AssertionError("unreachable") from None
    return cx, cy
