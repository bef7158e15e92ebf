"""HTTP transport for the JSON-RPC API, on the standard library.

One thread per connection, HTTP/1.1 keep-alive. Routing is a table of
path -> HTTP method -> Route, so later endpoints (GET /events as
server-sent events, GET /metrics) are one entry each; TLS would wrap the
accepted sockets in _HttpServer.get_request. Every response, including
errors found by http.server itself, carries a JSON-RPC body.
"""
from __future__ import annotations

import logging
import re
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from vmhost.api.jsonrpc import INVALID_REQUEST, Dispatcher, encode_error

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20
# Idle keep-alive connections (and stalled clients) give their thread back
# after this many seconds.
IDLE_TIMEOUT = 120.0

_DIGITS = re.compile(r"[0-9]{1,19}\Z")
_INTERNAL_ERROR = -32603


@dataclass(frozen=True)
class Route:
    handle: Callable[[_RequestHandler, bytes], None]
    takes_body: bool = False  # True: a JSON body within max_body is required


class ApiServer:
    """Serves `dispatcher` at POST /jsonrpc on `address` (port 0: any free
    port, see .port). Binds at construction; serves after start()."""

    def __init__(self, address: tuple[str, int], dispatcher: Dispatcher,
                 max_body: int = DEFAULT_MAX_BODY):
        self._dispatcher = dispatcher
        routes = {"/jsonrpc": {"POST": Route(self._jsonrpc, takes_body=True)}}
        self._httpd = _HttpServer(address, routes, max_body)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="api-server", daemon=True)
        self._thread.start()
        log.info("serving JSON-RPC on %s:%d", self._httpd.server_address[0], self.port)

    def stop(self) -> None:
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


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], routes: dict[str, dict[str, Route]],
                 max_body: int):
        self.routes = routes
        self.max_body = max_body
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
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

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
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("connection from %s failed", client_address, exc_info=True)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
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
        if close or self._has_unread_body():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body is not None and self.command != "HEAD":
            self.wfile.write(body)

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
