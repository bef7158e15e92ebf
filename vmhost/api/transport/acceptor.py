"""The one listening socket of the API: accept, cap, TLS, protocol detection.

Every connection gets its own thread (a slow or silent client holds up
nobody else) which, in order:

1. With TLS (ssl_context, see vmhost/api/tls.py): checks that the first
   byte starts a TLS handshake and completes the handshake, all within
   HANDSHAKE_TIMEOUT seconds. A failed handshake (no client certificate,
   one from another CA, a timeout) is logged and the connection closed; a
   plain HTTP request gets a 400 saying TLS is required.
2. Detects the protocol on the first (decrypted) bytes, as VDSM's
   protocol detector does: a first line `CONNECT` or `STOMP` (after any
   heart-beat EOLs) is STOMP, anything else goes to HTTP, whose parser
   answers garbage with an error. The bytes read to decide are handed to
   the protocol, which reads the rest.
3. Runs the protocol (Protocol.serve) until the connection ends.

The number of open connections is capped (max_connections). Past the cap
a connection gets no thread: one refuser thread for all of them waits
briefly for their first bytes, answers in their protocol (HTTP 503 or a
STOMP ERROR frame, both saying the limit was reached; a TLS client is
just closed: a handshake to say so would cost what the cap saves) and
closes them (transport/refusal.py). At most MAX_REFUSING wait at a time;
more are closed at once.
So a flood costs a bounded number of threads and file descriptors, and
connections already open keep being served.
"""
from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from typing import Any, Protocol

from vmhost.api.transport.refusal import (LINGER_SECONDS, STOMP_COMMANDS, TLS_HANDSHAKE_RECORD,
                                          Refuser, end_and_drain, http_refusal, stomp_refusal)

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 256
# A TLS client must finish its handshake within this many seconds of
# connecting (the first byte included).
HANDSHAKE_TIMEOUT = 10.0
# The first bytes of a connection (after TLS) must come within this long.
FIRST_BYTES_TIMEOUT = 30.0
# Bytes read at most to tell STOMP from HTTP (heart-beat EOLs included).
_DETECT_LIMIT = 1024
# How often the accept loop looks for a stop request.
_POLL_INTERVAL = 0.1


class ConnectionProtocol(Protocol):
    def serve(self, conn: socket.socket, prefix: bytes, peer: str) -> None:
        """Serve one connection whose first bytes, `prefix`, were already read."""


class Acceptor:
    """Listens on `address` (port 0: any free port, see .port) from
    construction; accepts after start()."""

    def __init__(self, address: tuple[str, int], protocols: dict[str, ConnectionProtocol],
                 ssl_context: ssl.SSLContext | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS):
        self._protocols = protocols
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self.address = self._listener.getsockname()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()  # to shut down at stop()
        self._open = 0                                 # slots taken, <= max_connections
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._refuser = Refuser(ssl_context is not None)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="api-acceptor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._listener.close()
        self._refuser.stop()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _shutdown(conn)

    # --- accepting --------------------------------------------------------------------

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(_POLL_INTERVAL * 1000):
                continue
            try:
                conn, address = self._listener.accept()
            except OSError as e:  # EMFILE, ECONNABORTED, ...: try again shortly
                log.warning("accept failed: %s", e)
                time.sleep(_POLL_INTERVAL)
                continue
            self._admit(conn, address)

    def _admit(self, conn: socket.socket, address: Any) -> None:
        with self._lock:
            admitted = self._open < self.max_connections
            if admitted:
                self._open += 1
                self._connections.add(conn)
        if not admitted:
            self._refuser.refuse(conn, _peer(address), self.max_connections)
            return
        try:
            threading.Thread(target=self._serve, args=(conn, address),
                             name=f"api-conn-{_peer(address)}", daemon=True).start()
        except RuntimeError:  # cannot start a thread: refuse rather than die
            log.warning("cannot start a thread for %s; connection closed", _peer(address))
            self._release(conn)
            conn.close()

    def _release(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)
            self._open -= 1

    def _track(self, old: socket.socket, new: socket.socket) -> None:
        with self._lock:
            self._connections.discard(old)
            self._connections.add(new)

    def _serve(self, conn: socket.socket, address: Any) -> None:
        who = _peer(address)
        tracked = conn   # the socket to close: the TLS one once wrapped
        tls = None
        try:
            # Headers and body go out in separate writes; without NODELAY,
            # Nagle plus delayed ACKs add ~40 ms to every call.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                tls, tracked = self._tls_handshake(conn, who)
                if tls is None:
                    return
            detected = _detect(tracked, who)
            if detected is None or self._stopping.is_set():
                return
            name, prefix = detected
            self._protocols[name].serve(tracked, prefix, who)
        except OSError as e:  # the client went away, or stop() shut the socket
            log.debug("connection from %s ended: %s", who, e)
        except Exception:
            log.exception("connection from %s failed", who)
        finally:
            if tls is not None:
                _close_notify(tls)
            _shutdown(tracked)
            tracked.close()
            self._release(tracked)

    # --- TLS --------------------------------------------------------------------------

    def _tls_handshake(self, conn: socket.socket,
                       who: str) -> tuple[ssl.SSLSocket | None, socket.socket]:
        """(the TLS socket over `conn` once the handshake succeeded, or None
        if it failed: logged, answered if it was plain text; the socket to
        close in the end)."""
        assert self.ssl_context is not None
        timeout = HANDSHAKE_TIMEOUT
        deadline = time.monotonic() + timeout
        try:
            conn.settimeout(timeout)
            first = conn.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            log.info("TLS: %s sent nothing within %gs; closed", who, timeout)
            return None, conn
        except OSError as e:
            log.info("TLS: connection from %s failed before the handshake: %s", who, e)
            return None, conn
        if not first:
            log.debug("TLS: %s closed without a handshake", who)
            return None, conn
        if first[0] != TLS_HANDSHAKE_RECORD:
            if first.isalpha():  # a request line (GET, POST, ...) or a STOMP CONNECT
                log.warning("TLS: refused plain text from %s on the TLS port", who)
                _answer_plain(conn)
            else:
                log.warning("TLS: refused %s: not a TLS handshake", who)
            return None, conn
        try:
            tls = self.ssl_context.wrap_socket(conn, server_side=True,
                                               do_handshake_on_connect=False)
        except (OSError, ValueError) as e:
            log.warning("TLS: cannot start TLS with %s: %s", who, e)
            return None, conn
        self._track(conn, tls)  # so that stop() reaches it (the plain socket is detached)
        try:
            _handshake(tls, deadline)
        except TimeoutError:
            log.info("TLS: handshake with %s not done within %gs; closed", who, timeout)
            return None, tls
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
            tls.setblocking(True)
            return tls, tls
        # The alert that says why is sent; closing with the client's request
        # unread would reset the connection and could destroy it.
        end_and_drain(tls)
        return None, tls


def _detect(conn: socket.socket, who: str) -> tuple[str, bytes] | None:
    """("stomp" | "http", the bytes read), or None if the client closed or
    stayed silent."""
    deadline = time.monotonic() + FIRST_BYTES_TIMEOUT
    data = b""
    while True:
        content = data.lstrip(b"\r\n")
        newline = content.find(b"\n")
        if newline >= 0:
            line = content[:newline].rstrip(b"\r")
            return ("stomp" if line in STOMP_COMMANDS else "http"), data
        if len(content) > max(map(len, STOMP_COMMANDS)) + 1 or len(data) >= _DETECT_LIMIT:
            return "http", data
        left = deadline - time.monotonic()
        if left <= 0:
            log.info("%s sent no request within %gs; closed", who, FIRST_BYTES_TIMEOUT)
            return None
        conn.settimeout(left)
        try:
            chunk = conn.recv(_DETECT_LIMIT - len(data))
        except TimeoutError:
            continue
        if not chunk:
            return ("http", data) if data else None
        data += chunk


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return str(address)


def _shutdown(conn: socket.socket) -> None:
    try:
        # The socket's own shutdown, also under TLS (SSLSocket.shutdown drops
        # the TLS state under a thread that may be using it).
        socket.socket.shutdown(conn, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


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
_PLAIN_STOMP_MESSAGE = ("this agent speaks STOMP over TLS only, with client certificates "
                        "(mutual TLS): use a stomps:// URL with --tls-cert, --tls-key and --tls-ca")


def _answer_plain(sock: socket.socket) -> None:
    """Plain text on the TLS port: say why it is refused, in the client's
    protocol, then close (after draining: see end_and_drain)."""
    try:
        sock.settimeout(LINGER_SECONDS)
        first = sock.recv(16, socket.MSG_PEEK)
        if first.lstrip(b"\r\n").startswith(STOMP_COMMANDS):
            sock.sendall(stomp_refusal(_PLAIN_STOMP_MESSAGE))
        else:
            sock.sendall(http_refusal("400 Bad Request", _PLAIN_HTTP_MESSAGE))
    except OSError:
        return
    end_and_drain(sock)
