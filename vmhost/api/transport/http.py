"""HTTP for the JSON-RPC API, behind the acceptor (transport/acceptor.py).

HTTP/1.1 keep-alive, on the connection's own thread. Routing is a table of
path -> HTTP method -> Route, so each endpoint is one entry. Every response,
including errors found by http.server itself, carries a JSON-RPC body,
except the event stream and the metrics.

Endpoints:

    POST /jsonrpc   JSON-RPC 2.0 requests and batches (vmhost/api/schema.yaml)
    GET  /events    notifications as server-sent events (when given an EventBus)
    GET  /metrics   Prometheus text (when given a metrics callable)

Notifications are server-sent events (text/event-stream), not WebSocket:
they flow one way only, SSE is plain HTTP on the same port (any HTTP client,
`curl -N`, reads it) and needs nothing beyond the standard library. Every
EventBus event is one SSE event:

    event: <event["event"]>
    id: <event["seq"]>
    data: <the event as one line of JSON>

and a comment line `: keepalive` is sent after KEEPALIVE_INTERVAL seconds of
silence, so a client that vanished without closing is noticed (the write
fails) and its subscription is closed. The stream works while the agent is
still recovering (it does not go through the Dispatcher), has no replay
(the `id` is for ordering and gap detection only: after a reconnect, read
the current state through the API), and ends when the server stops. Event
shapes (`seq` and `time`, added by the bus, are in all of them):

    {"event": "job", "vmId", "jobId", "drive", "from", "to", "reason", "error"}
        a merge job changed state (vmhost/virt/merge.py): `from` is null for
        a new job; `to` is STARTING, COMMIT, READY, PIVOT, ABORTING, CLEANUP,
        FAILED, or the terminal DONE / ABORTED; `error` is null unless failed
    {"event": "vm", "vmId", "status", "pauseCode"}
        a VM's status changed (Up, Paused, Down, ...; pauseCode NOERR or EIO)
    {"event": "domain", "domainID", "status": "VALID" | "INVALID", "reason"}
        a storage domain's health changed
"""
from __future__ import annotations

import io
import json
import logging
import queue
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from vmhost.api.jsonrpc import INVALID_REQUEST, Dispatcher, encode_error
from vmhost.events import EventBus, Subscription

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20
# Idle keep-alive connections (and stalled clients) give their thread back
# after this many seconds.
IDLE_TIMEOUT = 120.0
# After refusing a request whose body is still arriving, discard input for at
# most this long / this much before closing (see _RequestHandler._linger).
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 << 20
# A silent event stream sends a comment this often: a client that is gone
# without closing (host down, network cut) is noticed when the write fails.
KEEPALIVE_INTERVAL = 15.0
# How often a silent event stream checks whether its client closed.
PEER_CHECK_INTERVAL = 1.0
# Queued into open event streams by stop(), to wake them at once.
_WAKE: dict = {}

_DIGITS = re.compile(r"[0-9]{1,19}\Z")
_INTERNAL_ERROR = -32603


@dataclass(frozen=True)
class Route:
    handle: Callable[[_RequestHandler, bytes], None]
    takes_body: bool = False  # True: a JSON body within max_body is required


class HttpProtocol:
    """Serves `dispatcher` at POST /jsonrpc, `events` (if given) at GET
    /events and `metrics` (if given) at GET /metrics."""

    def __init__(self, dispatcher: Dispatcher, max_body: int = DEFAULT_MAX_BODY,
                 events: EventBus | None = None,
                 metrics: Callable[[], bytes] | None = None):
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._events = events
        self.max_body = max_body
        self._stopping = threading.Event()
        self._streams: set[Subscription] = set()
        self._streams_lock = threading.Lock()
        self.routes: dict[str, dict[str, Route]] = {
            "/jsonrpc": {"POST": Route(self._jsonrpc, takes_body=True)}}
        if events is not None:
            self.routes["/events"] = {"GET": Route(self._event_stream)}
        if metrics is not None:
            self.routes["/metrics"] = {"GET": Route(self._scrape)}

    def serve(self, conn: socket.socket, prefix: bytes, peer: str) -> None:
        _RequestHandler(conn, peer, self, prefix)

    def stop(self) -> None:
        """End the event streams at once rather than at their next keepalive."""
        self._stopping.set()
        with self._streams_lock:
            streams = list(self._streams)
        for sub in streams:
            try:
                sub.queue.put_nowait(_WAKE)
            except queue.Full:  # busy anyway; the acceptor shutting the socket ends it
                pass

    # --- POST /jsonrpc ------------------------------------------------------------

    def _jsonrpc(self, request: _RequestHandler, body: bytes) -> None:
        try:
            answer = self._dispatcher.handle_bytes(body)
        except Exception:  # the Dispatcher should not raise; stay up if it does
            log.exception("dispatcher failed")
            request.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                              encode_error(_INTERNAL_ERROR, "internal error (see agent log)"))
            return
        if answer is None:  # only notifications: nothing to say
            request.send_json(HTTPStatus.NO_CONTENT, None)
        else:
            request.send_json(HTTPStatus.OK, answer)

    # --- GET /metrics -------------------------------------------------------------

    def _scrape(self, request: _RequestHandler, body: bytes) -> None:
        assert self._metrics is not None  # the route exists only with metrics
        try:
            text = self._metrics()
        except Exception:  # a collector bug must not take the API down
            log.exception("metrics collection failed")
            request.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                              encode_error(_INTERNAL_ERROR, "metrics collection failed"))
            return
        request.send_response(HTTPStatus.OK)
        request.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        request.send_header("Content-Length", str(len(text)))
        request.end_headers()
        request.wfile.write(text)

    # --- GET /events --------------------------------------------------------------

    def _event_stream(self, request: _RequestHandler, body: bytes) -> None:
        assert self._events is not None  # the route exists only with a bus
        # Subscribed before the headers go out: a client that has the
        # headers misses no event published after that.
        sub = self._events.subscribe()
        with self._streams_lock:
            self._streams.add(sub)
        try:
            request.start_event_stream()
            self._pump(request, sub)
        except OSError:  # the client went away (or stop() shut the socket)
            pass
        finally:
            with self._streams_lock:
                self._streams.discard(sub)
            sub.close()

    def _pump(self, request: _RequestHandler, sub: Subscription) -> None:
        """Send events until the server stops or the client is gone."""
        last_write = time.monotonic()
        while not self._stopping.is_set():
            silent_for = time.monotonic() - last_write
            event = sub.get(timeout=max(0.0, min(PEER_CHECK_INTERVAL,
                                                 KEEPALIVE_INTERVAL - silent_for)))
            if event is _WAKE:
                continue
            if event is not None:
                request.write_stream(format_event(event))
            elif request.peer_closed():
                return
            elif time.monotonic() - last_write >= KEEPALIVE_INTERVAL:
                request.write_stream(b": keepalive\n\n")
            else:
                continue
            last_write = time.monotonic()


def format_event(event: dict) -> bytes:
    """One bus event as one server-sent event."""
    name = str(event.get("event", "message")).replace("\r", "").replace("\n", "")
    data = json.dumps(event, separators=(",", ":"), default=str)  # one line: no indent
    return f"event: {name}\nid: {event.get('seq', '')}\ndata: {data}\n\n".encode("utf-8")


class _Prefixed(io.RawIOBase):
    """`prefix`, then what `raw` reads."""

    def __init__(self, prefix: bytes, raw: io.RawIOBase):
        self._prefix = memoryview(prefix)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Nobody speaks HTTP/0.9; answering unparsable request lines as 1.0
    # gives them a status line and headers instead of a bare body.
    default_request_version = "HTTP/1.0"
    server_version = "vmhost"
    sys_version = ""  # no need to advertise the Python version
    timeout = IDLE_TIMEOUT
    server: HttpProtocol

    _body_read = False

    def __init__(self, request: Any, client_address: Any, server: HttpProtocol, prefix: bytes):
        self._prefix = prefix
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        if self._prefix:
            # The acceptor read the first bytes to detect the protocol: they
            # are read again, then the socket.
            plain = self.rfile
            self.rfile = io.BufferedReader(_Prefixed(self._prefix, self.connection.makefile("rb", 0)))
            plain.close()

    def parse_request(self) -> bool:
        self._body_read = False  # the handler object lives as long as the connection
        return super().parse_request()

    def _serve(self) -> None:
        accepted = self._accept()
        if accepted is None:
            return
        route, length = accepted
        body = b""
        if route.takes_body:
            body = self.rfile.read(length)
            if len(body) < length:  # client went away mid-body
                self.close_connection = True
                return
            self._body_read = True
        route.handle(self, body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _serve

    def _accept(self) -> tuple[Route, int] | None:
        """Check everything the headers tell; answer and return None if the
        request is refused. Never reads the body."""
        path = urlsplit(self.path).path
        methods = self.server.routes.get(path)
        if methods is None:
            return self._refuse(HTTPStatus.NOT_FOUND, f"no such path {path[:100]!r}")
        route = methods.get(self.command)
        if route is None:
            allowed = ", ".join(sorted(methods))
            return self._refuse(HTTPStatus.METHOD_NOT_ALLOWED,
                                f"{self.command} not allowed on {path}; use {allowed}",
                                {"Allow": allowed})
        if not route.takes_body:
            return route, 0
        if self.headers.get_content_type() != "application/json":
            return self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                "Content-Type must be application/json")
        if "Transfer-Encoding" in self.headers:
            return self._refuse(HTTPStatus.LENGTH_REQUIRED,
                                "chunked bodies are not supported; send Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        if len(set(lengths)) != 1 or not _DIGITS.match(lengths[0].strip()):
            return self._refuse(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        length = int(lengths[0])
        if length > self.server.max_body:
            return self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"request body of {length} bytes exceeds the limit of "
                                f"{self.server.max_body} bytes")
        return route, length

    def _refuse(self, status: HTTPStatus, message: str,
                headers: dict[str, str] | None = None) -> None:
        self.send_json(status, encode_error(INVALID_REQUEST, message), headers)

    def send_json(self, status: int, body: bytes | None,
                  headers: dict[str, str] | None = None, *, close: bool = False) -> None:
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        # An unread body is still on the socket and cannot be told apart
        # from the next request, so such a connection ends here.
        unread = self._has_unread_body()
        if close or unread:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body is not None and self.command != "HEAD":
            self.wfile.write(body)
        if unread:
            self._linger()

    def start_event_stream(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        # No length and no chunking: the stream ends when the connection does.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()

    def write_stream(self, data: bytes) -> None:
        self.wfile.write(data)

    def peer_closed(self) -> bool:
        """True if the client closed its side: a stream client sends nothing
        after its request, so readable-with-no-data means end of file."""
        if isinstance(self.connection, ssl.SSLSocket):
            return self._tls_peer_closed()
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _tls_peer_closed(self) -> bool:
        # No peeking through TLS: read, without waiting. What is readable may
        # be a TLS record without data (e.g. a key update); a stream client
        # sends no data, so anything read is dropped.
        conn = self.connection
        timeout = conn.gettimeout()
        try:
            if not conn.pending():
                poller = select.poll()
                poller.register(conn, select.POLLIN)
                if not poller.poll(0):
                    return False
            conn.settimeout(0)
            return conn.recv(1) == b""
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (OSError, ValueError):
            return True
        finally:
            try:
                conn.settimeout(timeout)
            except OSError:
                pass

    def _linger(self) -> None:
        """Closing a socket with unread input makes the kernel send a reset,
        which can destroy our answer before a client still busy sending its
        body reads it (RFC 9112 section 9.6). So signal the end of our
        answer, then discard input (never store it) for a bounded time."""
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while drained < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def _has_unread_body(self) -> bool:
        headers = getattr(self, "headers", None)
        if self._body_read or headers is None:
            return False
        return "Transfer-Encoding" in headers or headers.get("Content-Length", "0").strip() != "0"

    def handle_expect_100(self) -> bool:
        # Refuse (e.g. an oversized body) before the client sends it.
        if self._accept() is None:
            return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Errors http.server finds itself (bad request line, unknown method,
        # headers too long) get a JSON-RPC body too.
        self.send_json(code, encode_error(INVALID_REQUEST, message or HTTPStatus(code).phrase),
                       close=True)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
