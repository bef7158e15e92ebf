"""Python client for the vmhost JSON-RPC API.

    with Client() as c:
        c.call("VM.getStats", vmID=vm_id)

Calls are checked against the same schema.yaml the agent uses before they
are sent (validate=False to skip, e.g. against a newer agent). One Client
keeps one HTTP/1.1 connection open; it is not thread-safe.

Notifications (server-sent events from GET /events, same host and port):

    with c.events(timeout=60) as stream:
        for event in stream:          # {"event": "job", "jobId": ..., "to": ...}
            ...

Each stream has its own connection, so calls can go on meanwhile.

An agent serving HTTPS wants a client certificate signed by its CA (mutual
TLS), and is checked against `tls_ca` (its certificate must name the host
in the URL):

    Client("https://localhost:54321/jsonrpc", tls_cert="client.pem",
           tls_key="client-key.pem", tls_ca="ca.pem")

The same port speaks STOMP, VDSM's transport: `stomp://host:port` (plain)
and `stomps://host:port` (mutual TLS, the same three files) send the same
calls as JSON-RPC over STOMP 1.2, on one connection kept open, and
events() subscribes to jms.queue.events there (the notifications are turned
back into the same event dicts, see vmhost/api/notifications.py).
"""
from __future__ import annotations

import http.client
import itertools
import json
import socket
import ssl
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vmhost.api.notifications import EVENTS_DESTINATION, from_notification
from vmhost.api.schema import InvalidParams, Schema, UnknownVerb, load_schema
from vmhost.api.tls import client_context
from vmhost.api.transport.frames import Frame
from vmhost.stomp_client import REQUESTS, StompClosed, StompConnection, StompError

DEFAULT_URL = "http://127.0.0.1:54321/jsonrpc"
EVENTS_PATH = "/events"

# Errors that, on a reused keep-alive connection, mean the agent had already
# closed it while idle.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
_TLS_SCHEMES = ("https", "stomps")
_STOMP_SCHEMES = ("stomp", "stomps")
# A STOMP event stream asks the agent for a heart-beat this often (at most),
# so that a vanished agent is noticed by the stream's timeout.
_EVENT_HEART_BEAT = 15.0


class RpcError(Exception):
    """The agent (or client-side validation) answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str):
        super().__init__(f"error {code}: {message}")
        self.code = code
        self.message = message


class TransportError(Exception):
    """The agent could not be reached, or did not answer in JSON-RPC."""


class Client:
    """`tls_cert`, `tls_key`, `tls_ca` (PEM files; https URLs only): the client
    certificate and its key (the key may be in the certificate file), and the
    CA that signed the agent's certificate (None: the system's CAs). Bad
    files raise vmhost.api.tls.TlsError (a ValueError) naming the file."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 60, validate: bool = True,
                 schema: Schema | None = None, *, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_ca: str | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", *_STOMP_SCHEMES) or not parts.hostname:
            raise ValueError(f"unsupported URL {url!r}; expected http(s)://host:port/path "
                             "or stomp(s)://host:port")
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert, tls_key, tls_ca
        self._ssl_context: ssl.SSLContext | None = None
        if parts.scheme in _TLS_SCHEMES:
            self._ssl_context = client_context(tls_cert, tls_key, tls_ca)
        elif tls_cert or tls_key or tls_ca:
            secure = "a stomps" if parts.scheme == "stomp" else "an https"
            raise ValueError(f"TLS certificates given for the plain URL {url!r}; "
                             f"use {secure}:// URL")
        self.url = url
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path or "/"
        self.stomp = parts.scheme in _STOMP_SCHEMES
        self.events_url = (url if self.stomp else
                           urlunsplit((parts.scheme, parts.netloc, EVENTS_PATH, "", "")))
        self._timeout = timeout
        self._schema = (schema or load_schema()) if validate else None
        self._conn: http.client.HTTPConnection | None = None
        self._stomp: StompConnection | None = None
        self._reply_to = ""
        self._ids = itertools.count(1)

    def call(self, method: str, /, **params: Any) -> Any:
        """The result of `method`, or raise RpcError."""
        request = self._request(method, params)
        return _result(self._post(request), request["id"])

    def batch(self, calls: Iterable[tuple[str, Mapping[str, Any]]]) -> list[Any]:
        """Send several calls in one request. Returns their results in call
        order; a call that failed has its RpcError in its slot (not raised),
        so one failure does not hide the other results."""
        requests = [self._request(method, dict(params)) for method, params in calls]
        if not requests:
            return []
        answer = self._post(requests)
        if not isinstance(answer, list):
            _raise_error(answer)  # the batch as a whole was refused (e.g. too large)
            raise TransportError("unexpected answer to a batch")
        by_id = {r.get("id"): r for r in answer if isinstance(r, dict)}
        results: list[Any] = []
        for request in requests:
            response = by_id.get(request["id"])
            if response is None:
                raise TransportError(f"no answer to {request['method']} in the batch")
            try:
                results.append(_result(response, request["id"]))
            except RpcError as e:
                results.append(e)
        return results

    def events(self, timeout: float | None = None) -> EventStream:
        """Subscribe to the agent's notifications: an iterator of event dicts,
        in the order the agent published them. The subscription is live when
        this returns. `timeout`: seconds without any data (the agent sends a
        keepalive every 15 s) after which iterating raises TransportError;
        None waits forever. Iteration ends when the agent closes the stream."""
        if self.stomp:
            return self._stomp_events(timeout)
        conn = self._connect()
        try:
            conn.request("GET", EVENTS_PATH, headers={"Accept": "text/event-stream"})
            # Kept: http.client hands the socket of a Connection: close
            # answer over to the response, and conn.sock is None after this.
            sock = conn.sock
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise TransportError(f"cannot talk to {self.events_url}: {e}") from e
        if response.status != 200 or response.getheader("Content-Type", "").partition(";")[0] \
                != "text/event-stream":
            _refused_stream(conn, response, self.events_url)
        if sock is not None:
            sock.settimeout(timeout)  # from now on: the wait for the next line
        return EventStream(conn, response, self.events_url, timeout, sock)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._stomp is not None:
            self._stomp.disconnect()
            self._stomp = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if self._schema is not None:
            try:
                self._schema.validate(method, params)
            except UnknownVerb as e:
                raise RpcError(-32601, str(e)) from None
            except InvalidParams as e:
                raise RpcError(-32602, e.message) from None
        return {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}

    def _post(self, payload: Any) -> Any:
        if self.stomp:
            return self._stomp_post(json.dumps(payload).encode("utf-8"))
        status, data = self._exchange(json.dumps(payload).encode("utf-8"))
        # Refusals (404, 413, ...) carry a JSON-RPC error body too.
        try:
            return json.loads(data)
        except ValueError:
            raise TransportError(f"HTTP {status} from {self.url}: not a JSON-RPC answer") from None

    def _exchange(self, body: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            reused = self._conn is not None
            try:
                return self._roundtrip(body)
            except (OSError, http.client.HTTPException) as e:
                self.close()
                # On a reused connection these errors mean the agent closed
                # it while idle, so the request never reached it and sending
                # it once more is safe (unless the agent died mid-call).
                if not (attempt == 1 and reused and isinstance(e, _STALE)):
                    raise TransportError(f"cannot talk to {self.url}: {e}") from e
        raise AssertionError("unreachable")

    def _roundtrip(self, body: bytes) -> tuple[int, bytes]:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        try:
            conn.request("POST", self._path, body,
                         {"Content-Type": "application/json", "Accept": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            # The agent may refuse a body early (413) and close; its answer
            # is still readable, and getresponse raises if there is none.
            # Unless the connection itself failed (an agent dying as we
            # connect): then there is no answer to read.
            if conn.sock is None:
                raise
        response = conn.getresponse()
        data = response.read()
        if response.will_close:
            self.close()
        return response.status, data


    def _connect(self) -> http.client.HTTPConnection:
        if self._ssl_context is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=self._ssl_context)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)


    # --- STOMP ---------------------------------------------------------------------------

    def _stomp_connect(self, heart_beat: float = 0) -> StompConnection:
        try:
            return StompConnection(self._host, self._port or 54321, ssl_context=self._ssl_context,
                                   timeout=self._timeout, heart_beat_ms=int(heart_beat * 1000))
        except StompClosed as e:  # not a retry on a kept connection: the agent is not there
            raise StompError(str(e)) from e

    def _stomp_post(self, body: bytes) -> Any:
        for attempt in (1, 2):
            reused = self._stomp is not None
            try:
                frame = self._stomp_exchange(body)
                break
            except (StompError, TimeoutError) as e:
                if self._stomp is not None:
                    self._stomp.close()
                    self._stomp = None
                # As over HTTP: a kept connection the agent closed meanwhile
                # (e.g. it restarted) is opened again, once.
                if attempt == 1 and reused and isinstance(e, StompClosed):
                    continue
                what = e if isinstance(e, StompError) else f"no answer within {self._timeout}s"
                raise TransportError(f"cannot talk to {self.url}: {what}") from e
        try:
            return json.loads(frame.body)
        except ValueError:
            raise TransportError(f"{self.url}: the answer is not JSON") from None

    def _stomp_exchange(self, body: bytes) -> Frame:
        if self._stomp is None:
            conn = self._stomp_connect()
            try:
                self._reply_to = f"vmhost-client-{uuid.uuid4()}"  # as VDSM's client does
                conn.subscribe(self._reply_to)
            except StompError:
                conn.close()
                raise
            self._stomp = conn
        conn = self._stomp
        conn.send(REQUESTS, body, reply_to=self._reply_to)
        while True:  # the answer is the next message to our queue
            frame = conn.read_frame()
            if frame.command == "MESSAGE" and frame.headers.get("destination") == self._reply_to:
                return frame

    def _stomp_events(self, timeout: float | None) -> StompEventStream:
        heart_beat = _EVENT_HEART_BEAT if timeout is None else min(_EVENT_HEART_BEAT, timeout / 3)
        try:
            conn = self._stomp_connect(heart_beat=max(heart_beat, 1.0))
        except StompError as e:
            raise TransportError(f"cannot talk to {self.url}: {e}") from e
        try:
            conn.subscribe(EVENTS_DESTINATION)
        except (StompError, TimeoutError) as e:
            conn.close()
            raise TransportError(f"cannot subscribe at {self.url}: {e}") from e
        return StompEventStream(conn, self.url, timeout)


class StompEventStream(Iterator[dict]):
    """Events from jms.queue.events, as the same dicts EventStream gives;
    `last_id` is the `seq` of the last event read."""

    def __init__(self, conn: StompConnection, url: str, timeout: float | None):
        self._conn: StompConnection | None = conn
        self.url = url
        self._timeout = timeout
        self.last_id: str | None = None

    def __next__(self) -> dict:
        while True:
            conn = self._conn
            if conn is None:
                raise StopIteration
            try:
                frame = conn.read_frame(timeout=self._timeout)
            except TimeoutError:
                self.close()
                raise TransportError(f"nothing from {self.url} for {self._timeout}s") from None
            except StompError:  # the agent closed the connection (it stopped), or we did
                self.close()
                raise StopIteration from None
            if frame.command != "MESSAGE":
                continue
            try:
                event = from_notification(json.loads(frame.body))
            except ValueError:
                event = None
            if event is None:
                continue
            if "seq" in event:
                self.last_id = str(event["seq"])
            return event

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> StompEventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventStream(Iterator[dict]):
    """Server-sent events as dicts (the JSON of each event's data). Comments
    (keepalives) are skipped; `last_id` is the id of the last event read."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 url: str, timeout: float | None, sock: socket.socket | None = None):
        self._conn: http.client.HTTPConnection | None = conn
        self._sock = sock
        self._response = response
        self.url = url
        self._timeout = timeout
        self.last_id: str | None = None

    def __next__(self) -> dict:
        data: list[str] = []
        while True:
            line = self._readline()
            if line is None:  # the agent closed the stream (it stopped)
                self.close()
                raise StopIteration
            if line == "":  # a blank line ends an event
                if data:
                    return self._decode(data)
                continue
            if line.startswith(":"):  # a comment: keepalive
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "id":
                self.last_id = value
            # "event" (the name) is in the JSON as "event" too; "retry" is for browsers.

    def close(self) -> None:
        # Take the connection first: a reader thread may close concurrently.
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._sock is not None:
                try:  # wakes a thread blocked reading the stream (close alone does not)
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            # The response holds the socket: for a Connection: close answer,
            # http.client hands it from the connection to the response.
            self._response.close()
            conn.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self) -> str | None:
        if self._conn is None:
            return None
        try:
            raw = self._response.readline()
        except TimeoutError:
            self.close()
            raise TransportError(f"nothing from {self.url} for {self._timeout}s") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.close()
            raise TransportError(f"event stream {self.url} broke: {e}") from e
        if not raw.endswith(b"\n"):  # end of stream (a cut-off line is dropped)
            return None
        return raw.decode("utf-8").rstrip("\r\n")

    def _decode(self, data: list[str]) -> dict:
        try:
            event = json.loads("\n".join(data))
        except ValueError:
            self.close()
            raise TransportError(f"event stream {self.url}: data is not JSON") from None
        if not isinstance(event, dict):
            self.close()
            raise TransportError(f"event stream {self.url}: data is not a JSON object")
        return event


def _refused_stream(conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                    url: str) -> None:
    """Raise what a refused GET /events means (the agent answers in JSON-RPC)."""
    try:
        data = response.read()
    except (OSError, http.client.HTTPException):
        data = b""
    finally:
        conn.close()
    try:
        _raise_error(json.loads(data))
    except ValueError:
        pass
    raise TransportError(f"HTTP {response.status} from {url}: not an event stream")


def _result(response: Any, request_id: Any) -> Any:
    _raise_error(response)
    if not isinstance(response, dict) or response.get("id") != request_id or "result" not in response:
        raise TransportError("JSON-RPC answer does not match the request")
    return response["result"]


def _raise_error(response: Any) -> None:
    if isinstance(response, dict) and isinstance(response.get("error"), dict):
        error = response["error"]
        raise RpcError(error.get("code", 0), str(error.get("message", "")))
