"""The API server: one port, two protocols, one dispatcher.

    Acceptor (transport/acceptor.py)   listen, connection cap, TLS handshake,
                                       protocol detection on the first bytes
      -> HttpProtocol (transport/http.py)    POST /jsonrpc, GET /events (SSE),
                                             GET /metrics
      -> StompProtocol (transport/stomp.py)  JSON-RPC over STOMP 1.2, as VDSM
                                             speaks it, with events on
                                             jms.queue.events
    both calling the one Dispatcher (jsonrpc.py) with the one schema.

With `ssl_context` (see vmhost.api.tls.server_context) every connection is
mutual TLS, whichever protocol follows.
"""
from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.transport.acceptor import DEFAULT_MAX_CONNECTIONS, Acceptor
from vmhost.api.transport.frames import FrameLimits
from vmhost.api.transport.http import DEFAULT_MAX_BODY, HttpProtocol, format_event
from vmhost.api.transport.stomp import StompProtocol
from vmhost.events import EventBus

__all__ = ["ApiServer", "format_event"]

log = logging.getLogger(__name__)


class ApiServer:
    """Serves `dispatcher` on `address` (port 0: any free port, see .port)
    over HTTP and STOMP, and `events` (if given) as server-sent events and
    STOMP messages. Binds at construction; serves after start()."""

    def __init__(self, address: tuple[str, int], dispatcher: Dispatcher,
                 max_body: int = DEFAULT_MAX_BODY, events: EventBus | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 metrics: Callable[[], bytes] | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS):
        self.http = HttpProtocol(dispatcher, max_body, events, metrics)
        self.stomp = StompProtocol(dispatcher, events, FrameLimits(max_body=max_body))
        self.acceptor = Acceptor(address, {"http": self.http, "stomp": self.stomp},
                                 ssl_context, max_connections)

    @property
    def port(self) -> int:
        return self.acceptor.port

    @property
    def tls(self) -> bool:
        return self.acceptor.ssl_context is not None

    def start(self) -> None:
        self.acceptor.start()
        log.info("serving JSON-RPC over HTTP and STOMP on %s:%d (%s)", self.acceptor.address[0],
                 self.port, "TLS, client certificate required" if self.tls else "plain")

    def stop(self) -> None:
        # Event streams and STOMP connections end at once, not at their next
        # keepalive; then the acceptor shuts every connection.
        self.http.stop()
        self.stomp.stop()
        self.acceptor.stop()

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
