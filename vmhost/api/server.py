"""HTTP transport for the JSON-RPC API, on the standard library.

One thread per connection, HTTP/1.1 keep-alive. Routing is a table of
path -> HTTP method -> Route, so each endpoint is one entry. Every response,
including errors found by http.server itself, carries a JSON-RPC body,
except the event stream.

TLS (ssl_context, see vmhost/api/tls.py): each accepted connection does its
handshake in its own handler thread, never in the accept loop, within
HANDSHAKE_TIMEOUT seconds in all, so a client that connects and stalls holds
up nobody. A failed handshake (no client certificate, one from another CA,
a timeout) is logged and the connection closed; a plain HTTP request on the
TLS port gets a 400 saying HTTPS is required, and is closed.

Endpoints:

    POST /jsonrpc   JSON-RPC 2.0 requests and batches (vmhost/api/schema.yaml)
    GET  /events    notifications as server-sent events (when the server was
                    given an EventBus)

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

import logging
import json
import queue
import re
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

# A TLS client must finish its handshake within this many seconds of
# connecting (the first byte included).
HANDSHAKE_TIMEOUT = 10.0
# First byte of a TLS connection: a handshake record.
_TLS_HANDSHAKE_RECORD = 0x16

# How often serve_forever looks for a stop request; stop() waits up to this.
_POLL_INTERVAL = 0.1
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


class ApiServer:
    """Serves `dispatcher` at POST /jsonrpc on `address` (port 0: any free
    port, see .port), and `events` (if given) at GET /events. Binds at
    construction; serves after start(). With `ssl_context` (see
    vmhost.api.tls.server_context) it serves HTTPS only."""

    def __init__(self, address: tuple[str, int], dispatcher: Dispatcher,
                 max_body: int = DEFAULT_MAX_BODY, events: EventBus | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 metrics: Callable[[], bytes] | None = None):
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._events = events
        self._stopping = threading.Event()
        self._streams: set[Subscription] = set()
        self._streams_lock = threading.Lock()
        routes = {"/jsonrpc": {"POST": Route(self._jsonrpc, takes_body=True)}}
        if events is not None:
            routes["/events"] = {"GET": Route(self._event_stream)}
        if metrics is not None:
            routes["/metrics"] = {"GET": Route(self._scrape)}
        self._httpd = _HttpServer(address, routes, max_body, ssl_context)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(_POLL_INTERVAL,),
                                        name="api-server", daemon=True)
        self._thread.start()
        log.info("serving JSON-RPC on %s:%d (%s)", self._httpd.server_address[0], self.port,
                 "HTTPS, client certificate required" if self.tls else "plain HTTP")

    @property
    def tls(self) -> bool:
        return self._httpd.ssl_context is not None

    def stop(self) -> None:
        # Event streams end at once rather than at their next keepalive.
        self._stopping.set()
        self._wake_streams()
        if self._thread is not None:
            self._httpd.shutdown()  # blocks until serve_forever returns
            self._thread.join()
            self._thread = None
        self._httpd.close_connections()
        self._httpd.server_close()

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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


    # --- GET /metrics -----------------------------------------------------------

    def _scrape(self, request: _RequestHandler, body: bytes) -> None:
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

    # --- GET /events ----------------------------------------------------------

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

    def _wake_streams(self) -> None:
        with self._streams_lock:
            streams = list(self._streams)
        for sub in streams:
            try:
                sub.queue.put_nowait(_WAKE)
            except queue.Full:  # busy anyway; stop() shutting the socket ends it
                pass


def format_event(event: dict) -> bytes:
    """One bus event as one server-sent event."""
    name = str(event.get("event", "message")).replace("\r", "").replace("\n", "")
    data = json.dumps(event, separators=(",", ":"), default=str)  # one line: no indent
    return f"event: {name}\nid: {event.get('seq', '')}\ndata: {data}\n\n".encode("utf-8")


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], routes: dict[str, dict[str, Route]],
                 max_body: int, ssl_context: ssl.SSLContext | None = None):
        self.routes = routes
        self.max_body = max_body
        self.ssl_context = ssl_context
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _RequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup of the address
        # (socket.getfqdn), which can stall startup; we never use the name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        # Headers and body go out in two writes; without NODELAY, Nagle plus
        # delayed ACKs add ~40 ms to every call.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # In the connection's own thread (ThreadingMixIn): a slow or silent
        # TLS client holds up nobody else.
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        tls = self._tls_handshake(request, client_address)
        if tls is None:
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            _close_notify(tls)
            # The plain socket `request` was detached by the wrap; the caller
            # (process_request_thread) shutting it down is a no-op.
            self.shutdown_request(tls)

    def _tls_handshake(self, request: socket.socket, peer: Any) -> ssl.SSLSocket | None:
        """The TLS socket over `request` once the handshake succeeded, or None
        (logged, answered if it was plain HTTP; the caller closes `request`)."""
        assert self.ssl_context is not None
        timeout = HANDSHAKE_TIMEOUT
        deadline = time.monotonic() + timeout
        who = _peer(peer)
        try:
            request.settimeout(timeout)
            first = request.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            log.info("TLS: %s sent nothing within %gs; closed", who, timeout)
            return None
        except OSError as e:
            log.info("TLS: connection from %s failed before the handshake: %s", who, e)
            return None
        if not first:
            log.debug("TLS: %s closed without a handshake", who)
            return None
        if first[0] != _TLS_HANDSHAKE_RECORD:
            if first.isalpha():  # a request line: GET, POST, ...
                log.warning("TLS: refused plain HTTP from %s on the HTTPS port", who)
                _answer_plain_http(request)
            else:
                log.warning("TLS: refused %s: not a TLS handshake", who)
            return None
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True,
                                               do_handshake_on_connect=False)
        except (OSError, ValueError) as e:
            log.warning("TLS: cannot start TLS with %s: %s", who, e)
            return None
        with self._lock:  # so that stop() reaches it (the plain socket is detached)
            self._connections.discard(request)
            self._connections.add(tls)
        try:
            _handshake(tls, deadline)
        except TimeoutError:
            log.info("TLS: handshake with %s not done within %gs; closed", who, timeout)
            self.shutdown_request(tls)
            return None
        except ssl.SSLCertVerificationError as e:
            log.warning("TLS: refused %s: its client certificate is not accepted (%s)", who,
                        e.verify_message or e.reason)
        except ssl.SSLEOFError:
            log.info("TLS: %s closed the connection during the handshake", who)
        except ssl.SSLError as e:
            if e.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
                log.warning("TLS: refused %s: no client certificate", who)
            elif e.reason in _CLIENT_REFUSED_US:
                log.warning("TLS: %s does not accept the agent's certificate (%s)", who, e.reason)
            else:
                log.warning("TLS: handshake with %s failed: %s", who, e.reason or e)
        except OSError as e:
            log.info("TLS: handshake with %s failed: %s", who, e)
        else:
            return tls
        # The alert that says why is sent; closing with the client's request
        # unread would reset the connection and could destroy it.
        _end_and_drain(tls)
        self.shutdown_request(tls)
        return None

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake every handler thread (idle keep-alive ones included) so a
        stopped server answers nothing more."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                # The socket's own shutdown, also under TLS (SSLSocket.shutdown
                # drops the TLS state under a thread that may be using it).
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("connection from %s failed", client_address, exc_info=True)


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return str(address)


def _handshake(tls: ssl.SSLSocket, deadline: float) -> None:
    """do_handshake with one deadline for the whole of it (a socket timeout
    would apply to each read, and a client trickling bytes could stretch it)."""
    tls.setblocking(False)
    poller = select.poll()
    poller.register(tls, select.POLLIN)
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("TLS handshake timed out")
        poller.modify(tls, events)
        if not poller.poll(left * 1000):
            raise TimeoutError("TLS handshake timed out")


def _close_notify(tls: ssl.SSLSocket) -> None:
    """Tell the client the TLS session ends (without waiting for its answer)
    so it can tell our end of an event stream from a cut connection."""
    try:
        tls.settimeout(0)
        tls.unwrap()
    except (OSError, ValueError):  # no answer yet (expected), or already shut down
        pass


# Alerts a client sends when it does not trust the agent's certificate.
_CLIENT_REFUSED_US = frozenset({"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                                "SSLV3_ALERT_CERTIFICATE_UNKNOWN"})


_PLAIN_HTTP_MESSAGE = ("this agent speaks HTTPS only, with client certificates (mutual TLS): "
                       "use an https:// URL with --tls-cert, --tls-key and --tls-ca")


def _answer_plain_http(sock: socket.socket) -> None:
    """A plain HTTP request on the TLS port: say why it is refused, in the
    same form as every other refusal, then close (see _RequestHandler._linger
    for why the input is drained first)."""
    body = encode_error(INVALID_REQUEST, _PLAIN_HTTP_MESSAGE)
    head = (f"HTTP/1.1 400 Bad Request\r\nServer: vmhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
    try:
        sock.settimeout(LINGER_SECONDS)
        sock.sendall(head + body)
    except OSError:
        return
    _end_and_drain(sock)


def _end_and_drain(sock: socket.socket) -> None:
    """Signal the end of what we sent, then discard the client's input
    until it closes, for at most LINGER_SECONDS / LINGER_BYTES (as
    _RequestHandler._linger does). On the plain socket, also under a TLS
    socket whose session failed: nothing more is said in TLS."""
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


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Nobody speaks HTTP/0.9; answering unparsable request lines as 1.0
    # gives them a status line and headers instead of a bare body.
    default_request_version = "HTTP/1.0"
    server_version = "vmhost"
    sys_version = ""  # no need to advertise the Python version
    timeout = IDLE_TIMEOUT
    server: _HttpServer

    _body_read = False

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
