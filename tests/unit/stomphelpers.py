"""Helpers for the STOMP tests: a server with a small verb table, a raw
frame reader, and stomp.py (an independent STOMP client) listeners."""
from __future__ import annotations

import json
import queue
import socket
import time

import pytest
import stomp

from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.schema import load_schema
from vmhost.api.server import ApiServer
from vmhost.api.tls import server_context
from vmhost.cli import pki
from vmhost.events import EventBus
from vmhost.api.transport.frames import SERVER_COMMANDS, Frame, FrameLimits, Parser, encode

VM = "11111111-1111-4111-8111-111111111111"
STATS = [{"vmId": VM, "status": "Up", "vmJobs": {}}]


def table() -> dict:
    return {"Host.ping": lambda p: True, "Host.ping2": lambda p: True,
            "Host.getAllVmStats": lambda p: STATS,
            "VM.getStats": lambda p: [dict(STATS[0], vmId=p["vmID"])]}


def make_server(bus=None, **kwargs) -> ApiServer:
    server = ApiServer(("127.0.0.1", 0), Dispatcher(load_schema(), table()), events=bus, **kwargs)
    server.start()
    return server


# Fixtures, imported by the test modules that use them.

@pytest.fixture
def bus():
    return EventBus()


@pytest.fixture
def server(bus):
    server = make_server(bus)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return pki.init(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def tls_server(bus, certs):
    server = make_server(bus, ssl_context=server_context(certs["server_cert"], certs["server_key"],
                                                         certs["ca"]))
    yield server
    server.stop()


def request(method: str, params: dict | None = None, id: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}}


class RawStomp:
    """A socket speaking frames by hand (to send what no client would)."""

    def __init__(self, port: int, sock: socket.socket | None = None):
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
        self._parser = Parser(FrameLimits(max_body=64 << 20), SERVER_COMMANDS)
        self._frames: list[Frame] = []

    def send(self, command: str, headers: dict | None = None, body: bytes = b"") -> None:
        self.sock.sendall(encode(command, headers or {}, body))

    def connect(self, heart_beat: str = "0,0") -> Frame:
        self.send("CONNECT", {"accept-version": "1.2", "heart-beat": heart_beat})
        frame = self.frame()
        assert frame.command == "CONNECTED", frame
        return frame

    def frame(self, timeout: float = 10) -> Frame:
        deadline = time.monotonic() + timeout
        while not self._frames:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("closed by the server")
            self._frames += self._parser.feed(data)
        return self._frames.pop(0)

    @property
    def heartbeats(self) -> int:
        return self._parser.heartbeats

    def closed_within(self, seconds: float) -> bool:
        """True if the server closes within `seconds` (reading what it sends)."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    return False
                if not data:
                    return True
                self._frames += self._parser.feed(data)
        except ConnectionResetError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


class Collector(stomp.ConnectionListener):
    """Frames stomp.py received, by destination, to wait on."""

    def __init__(self):
        self.messages: queue.Queue = queue.Queue()
        self.errors: queue.Queue = queue.Queue()

    def on_message(self, frame) -> None:
        self.messages.put(frame)

    def on_error(self, frame) -> None:
        self.errors.put(frame)

    def next(self, destination: str, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while True:
            frame = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if frame.headers.get("destination") == destination:
                return frame


def connected_stomp_py(port: int, tls: dict | None = None, heartbeats=(0, 0)):
    conn = stomp.Connection12([("127.0.0.1", port)], heartbeats=heartbeats,
                              reconnect_attempts_max=1, timeout=10)
    if tls is not None:
        conn.set_ssl(for_hosts=[("127.0.0.1", port)], key_file=tls["client_key"],
                     cert_file=tls["client_cert"], ca_certs=tls["ca"])
    listener = Collector()
    conn.set_listener("collector", listener)
    conn.connect(wait=True)
    return conn, listener


def call(conn, listener: Collector, payload, reply_to: str = "replies") -> object:
    conn.send("jms.topic.vdsm_requests", json.dumps(payload), content_type="application/json",
              headers={"reply-to": reply_to})
    return json.loads(listener.next(reply_to).body)
