"""GET /events (server-sent events) on a real ApiServer, read with
Client.events() and with raw sockets."""
from __future__ import annotations

import io
import socket
import struct
import threading
import time

import pytest

from vmhost.api.transport import http as server_module
from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.schema import load_schema
from vmhost.api.server import ApiServer, format_event
from vmhost.client import Client, EventStream, RpcError, TransportError
from countingbus import CountingBus

JOB = "5b5b5b5b-5555-4555-8555-55555555abcd"


@pytest.fixture
def bus() -> CountingBus:
    return CountingBus()


@pytest.fixture(autouse=True)
def quick_peer_check(monkeypatch):
    # Closed clients are noticed within this; tests wait for it.
    monkeypatch.setattr(server_module, "PEER_CHECK_INTERVAL", 0.05)


def make_server(bus, ready=True):
    dispatcher = Dispatcher(load_schema(), {"Host.ping": lambda p: True,
                                            "Host.getVMList": lambda p: []},
                            is_ready=lambda: ready)
    server = ApiServer(("127.0.0.1", 0), dispatcher, events=bus)
    server.start()
    return server


@pytest.fixture
def server(bus):
    server = make_server(bus)
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with Client(f"http://127.0.0.1:{server.port}/jsonrpc", timeout=10) as client:
        yield client


def raw_stream(port: int) -> socket.socket:
    """A GET /events on a plain socket, headers read: the stream is subscribed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "the server closed before the headers"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Type: text/event-stream" in head
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, f"stream ended before {marker!r}: {data!r}"
        data += chunk
    return data


def job_event(n: int) -> dict:
    return {"event": "job", "vmId": "vm", "jobId": JOB, "drive": "vda", "from": None,
            "to": f"STATE{n}", "reason": "test", "error": None}


# --- delivery ----------------------------------------------------------------------

def test_published_events_arrive_in_order(bus, client):
    with client.events(timeout=5) as stream:
        assert bus.open == 1  # subscribed once events() returned: nothing can be missed
        publisher = threading.Thread(target=lambda: [bus.publish(job_event(n)) for n in range(200)])
        publisher.start()
        got = [next(stream) for _ in range(200)]
        publisher.join()
    assert [e["to"] for e in got] == [f"STATE{n}" for n in range(200)]
    assert [e["seq"] for e in got] == list(range(1, 201))
    assert got[0] == {**job_event(0), "seq": 1, "time": got[0]["time"]}
    assert stream.last_id == "200"
    assert bus.wait_open(0)


def test_calls_go_on_while_a_stream_is_open(bus, client):
    with client.events(timeout=5) as stream:
        assert client.call("Host.ping") is True
        bus.publish({"event": "vm", "vmId": "v", "status": "Up", "pauseCode": "NOERR"})
        assert next(stream)["status"] == "Up"


def test_every_stream_gets_every_event(bus, server):
    url = f"http://127.0.0.1:{server.port}/jsonrpc"
    with Client(url).events(timeout=5) as a, Client(url).events(timeout=5) as b:
        bus.publish({"event": "domain", "domainID": "d", "status": "INVALID", "reason": "gone"})
        assert next(a) == next(b)


def test_wire_format(bus, server):
    sock = raw_stream(server.port)
    try:
        bus.publish({"event": "job", "jobId": JOB, "to": "COMMIT"})
        data = read_until(sock, b"\n\n")
    finally:
        sock.close()
    head, _, rest = data.partition(b"data: ")
    assert head == b"event: job\nid: 1\n"
    assert rest.startswith(b'{"event":"job","jobId":"' + JOB.encode() + b'","to":"COMMIT","seq":1,')
    assert rest.endswith(b"}\n\n") and rest.count(b"\n") == 2


def test_format_event_keeps_one_event_one_record():
    data = format_event({"event": "x\ny", "seq": 3, "text": "a\nb"})
    assert data.startswith(b"event: xy\nid: 3\ndata: ")
    assert data.count(b"\n") == 4  # the newline in the text is escaped in JSON


def test_events_work_while_the_agent_recovers(bus):
    server = make_server(bus, ready=False)
    try:
        with Client(f"http://127.0.0.1:{server.port}/jsonrpc", timeout=10) as client:
            with pytest.raises(RpcError) as e:
                client.call("Host.getVMList")
            assert e.value.code == 99
            with client.events(timeout=5) as stream:
                bus.publish(job_event(1))
                assert next(stream)["to"] == "STATE1"
    finally:
        server.stop()


def test_without_a_bus_there_is_no_event_stream():
    server = ApiServer(("127.0.0.1", 0), Dispatcher(load_schema(), {}))
    server.start()
    try:
        with pytest.raises(RpcError, match="no such path '/events'"):
            Client(f"http://127.0.0.1:{server.port}/jsonrpc").events()
    finally:
        server.stop()


def test_only_get(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    finally:
        sock.close()


# --- keepalive, disconnect, stop -------------------------------------------------------

def test_keepalive_on_a_silent_stream(bus, server, monkeypatch):
    monkeypatch.setattr(server_module, "KEEPALIVE_INTERVAL", 0.05)
    sock = raw_stream(server.port)
    try:
        assert read_until(sock, b": keepalive\n\n: keepalive\n\n")
    finally:
        sock.close()
    assert bus.wait_open(0)


def test_client_skips_keepalives(bus, client, monkeypatch):
    monkeypatch.setattr(server_module, "KEEPALIVE_INTERVAL", 0.01)
    write = server_module._RequestHandler.write_stream
    keepalives = []

    def counting_write(handler, data):
        write(handler, data)
        if data.startswith(b":"):
            keepalives.append(data)
            if len(keepalives) == 3:  # the client has had keepalives to skip by now
                bus.publish(job_event(7))

    monkeypatch.setattr(server_module._RequestHandler, "write_stream", counting_write)
    with client.events(timeout=5) as stream:
        assert next(stream)["to"] == "STATE7"
    assert len(keepalives) >= 3


def test_a_client_that_closes_leaves_no_subscription(bus, server, monkeypatch):
    # No keepalive will come: the server must notice the close by itself.
    monkeypatch.setattr(server_module, "KEEPALIVE_INTERVAL", 3600)
    monkeypatch.setattr(server_module, "PEER_CHECK_INTERVAL", 0.02)
    socks = [raw_stream(server.port) for _ in range(5)]
    assert bus.open == 5
    for sock in socks:
        sock.close()
    assert bus.wait_open(0, timeout=5)


def test_a_vanished_client_is_found_by_the_keepalive(bus, server, monkeypatch):
    # A client whose host went down sends no FIN the peer check could see;
    # only a write finds out. Simulate: the peer check sees nothing, and the
    # client's socket is reset.
    monkeypatch.setattr(server_module._RequestHandler, "peer_closed", lambda handler: False)
    monkeypatch.setattr(server_module, "KEEPALIVE_INTERVAL", 0.02)
    sock = raw_stream(server.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # linger 0: the server's next write meets a reset
    assert bus.wait_open(0, timeout=5)


def test_stop_with_open_streams_is_prompt(bus, monkeypatch):
    monkeypatch.setattr(server_module, "KEEPALIVE_INTERVAL", 3600)
    monkeypatch.setattr(server_module, "PEER_CHECK_INTERVAL", 3600)
    server = make_server(bus)
    url = f"http://127.0.0.1:{server.port}/jsonrpc"
    streams = [Client(url).events(timeout=10) for _ in range(3)]
    assert bus.open == 3
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    for stream in streams:
        assert list(stream) == []  # the stream ends, it does not hang or raise
    assert bus.wait_open(0)


def test_client_timeout_on_silence(bus, client, monkeypatch):
    monkeypatch.setattr(server_module, "KEEPALIVE_INTERVAL", 3600)
    with client.events(timeout=0.2) as stream:
        with pytest.raises(TransportError, match="nothing from .*/events for 0.2s"):
            next(stream)
    assert bus.wait_open(0)


def test_unreachable_agent():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(TransportError, match="cannot talk to http://127.0.0.1:.*/events"):
        Client(f"http://127.0.0.1:{port}/jsonrpc").events()


def test_events_url_is_the_same_origin():
    assert Client("https://h.example:4433/api/jsonrpc").events_url == "https://h.example:4433/events"


# --- parsing -----------------------------------------------------------------------------

class _NoConnection:
    def close(self):
        pass


def parse(text: bytes, timeout=None) -> list[dict]:
    return list(EventStream(_NoConnection(), io.BytesIO(text), "test", timeout))  # type: ignore[arg-type]


def test_parses_the_sse_grammar():
    text = (b": hello\n\n"
            b"event: job\r\nid: 4\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"   # CRLF, two data lines
            b"retry: 10\nevent: x\n\n"                                       # no data: no event
            b"data:{\"b\": 2}\n\n"                                          # no space after the colon
            b"data: {\"c\": 3}\n")                                          # cut off: dropped
    assert parse(text) == [{"a": 1}, {"b": 2}]


def test_data_that_is_not_a_json_object_is_an_error():
    with pytest.raises(TransportError, match="not JSON"):
        parse(b"data: {oops\n\n")
    with pytest.raises(TransportError, match="not a JSON object"):
        parse(b"data: [1]\n\n")
