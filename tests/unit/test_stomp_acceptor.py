"""The acceptor: the connection cap (a flood gets refusals, established
clients keep being answered) and protocol detection."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from stomphelpers import RawStomp, make_server, request
from vmhost.api.transport import refusal
from vmhost.client import Client
from vmhost.events import EventBus
from vmhost.testing.waiting import wait_for

CAP = 8


@pytest.fixture
def server():
    server = make_server(EventBus(), max_connections=CAP)
    yield server
    server.stop()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(10)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


class Pinger(threading.Thread):
    """Calls Host.ping on an established connection, over and over, and
    records the slowest answer and any failure."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.client = Client(url, timeout=10)
        self.client.call("Host.ping")  # connected before the flood
        self.stop = threading.Event()
        self.calls = 0
        self.slowest = 0.0
        self.failure: Exception | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                assert self.client.call("Host.ping") is True
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.calls += 1
        except Exception as e:  # reported by the test
            self.failure = e
        finally:
            self.client.close()


def test_a_flood_past_the_cap_is_refused_and_ping_goes_on(server):
    pingers = [Pinger(f"http://127.0.0.1:{server.port}/jsonrpc"),
               Pinger(f"stomp://127.0.0.1:{server.port}")]
    for p in pingers:
        p.start()
    # Fill the cap with silent connections, then flood past it.
    held = []
    try:
        while server.acceptor.open_connections < CAP:
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            wait_for(lambda: server.acceptor.open_connections >= len(held) + 2 or
                     server.acceptor.open_connections == CAP)
        http_refusals = stomp_refusals = 0
        for i in range(100):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            with sock:
                if i % 2:
                    sock.sendall(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: 2\r\n\r\n{}")
                    answer = read_all(sock)
                    assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
                    assert b"too many connections" in answer
                    http_refusals += 1
                else:
                    sock.sendall(b"CONNECT\naccept-version:1.2\n\n\x00")
                    answer = read_all(sock)
                    assert answer.startswith(b"ERROR\n"), answer[:100]
                    assert b"too many connections" in answer
                    stomp_refusals += 1
        assert (http_refusals, stomp_refusals) == (50, 50)
        assert server.acceptor.open_connections == CAP
        for p in pingers:
            assert p.is_alive() and p.failure is None, p.failure
            assert p.calls > 0 and p.slowest < 5
    finally:
        for p in pingers:
            p.stop.set()
        for p in pingers:
            p.join(10)
        for sock in held:
            sock.close()
    for p in pingers:
        assert p.failure is None, p.failure
    # Slots come back as connections end.
    wait_for(lambda: server.acceptor.open_connections == 0)
    with Client(f"stomp://127.0.0.1:{server.port}", timeout=10) as client:
        assert client.call("Host.ping2") is True


def test_refusals_past_the_cap_are_bounded(server, monkeypatch):
    monkeypatch.setattr(refusal, "MAX_REFUSING", 4)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(CAP)]
    wait_for(lambda: server.acceptor.open_connections == CAP)
    # Silent connections past the cap: at most 4 wait for their refusal,
    # the others are closed at once; none gets a thread.
    extra = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
    try:
        closed = 0
        for sock in extra:
            sock.settimeout(refusal.REFUSE_WAIT + 5)
            try:
                if sock.recv(100) == b"":
                    closed += 1
            except ConnectionResetError:
                closed += 1
        assert closed == 20
        assert server.acceptor.open_connections == CAP
    finally:
        for sock in held + extra:
            sock.close()


def test_detection_waits_for_a_whole_first_line(server):
    raw = RawStomp(server.port)
    for byte in b"CONN":
        raw.sock.sendall(bytes([byte]))
        time.sleep(0.02)
    raw.sock.sendall(b"ECT\naccept-version:1.2\n\n\x00")
    assert raw.frame().command == "CONNECTED"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/jsonrpc", json.dumps(request("Host.ping")),
                 {"Content-Type": "application/json"})
    assert json.loads(conn.getresponse().read())["result"] is True
