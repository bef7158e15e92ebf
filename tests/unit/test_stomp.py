"""JSON-RPC over STOMP 1.2 on the API's port: stomp.py (an independent
client) and raw frames against a real ApiServer, plain and mutual TLS."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import stomp

from stomphelpers import (STATS, VM, RawStomp, call, connected_stomp_py, make_server,
                          request, table)
from stomphelpers import bus, certs, server, tls_server  # noqa: F401 (fixtures)
from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.schema import load_schema
from vmhost.api.server import ApiServer
from vmhost.api.transport import stomp as stomp_module
from vmhost.testing.waiting import wait_for

JOB = "5b5b5b5b-5555-4555-8555-55555555abcd"
SD = "22222222-2222-4222-8222-222222222222"


@pytest.fixture
def stomp_py(server):
    conn, listener = connected_stomp_py(server.port)
    conn.subscribe("replies", id="r")
    yield conn, listener
    conn.disconnect()


# --- calls with stomp.py --------------------------------------------------------------------------

def test_calls_batches_and_unknown_methods(stomp_py):
    conn, listener = stomp_py
    # VDSM's client always sends a batch, even of one call.
    assert call(conn, listener, [request("Host.ping2")]) == [
        {"jsonrpc": "2.0", "id": 1, "result": True}]
    assert call(conn, listener, request("Host.getAllVmStats", id=7)) == {
        "jsonrpc": "2.0", "id": 7, "result": STATS}
    answer = call(conn, listener, [request("Host.ping", id=1), request("No.such", id=2),
                                   request("VM.getStats", {"vmID": VM}, id=3)])
    by_id = {a["id"]: a for a in answer}
    assert by_id[1]["result"] is True
    assert by_id[2]["error"]["code"] == -32601
    assert by_id[3]["result"][0]["vmId"] == VM
    assert call(conn, listener, [request("VM.getStats", {"vmID": "nope"})])[0]["error"]["code"] \
        == -32602


def test_the_answer_carries_subscription_and_message_id(stomp_py):
    conn, listener = stomp_py
    conn.send("jms.topic.vdsm_irs_requests", json.dumps([request("Host.ping")]),
              headers={"reply-to": "replies"})
    frame = listener.next("replies")
    assert frame.headers["subscription"] == "r"
    assert frame.headers["message-id"]
    assert frame.headers["content-type"] == "application/json"


def test_only_notifications_get_no_answer(stomp_py):
    conn, listener = stomp_py
    conn.send("jms.topic.vdsm_requests", json.dumps([{"jsonrpc": "2.0", "method": "Host.ping"}]),
              headers={"reply-to": "replies"})
    assert call(conn, listener, [request("Host.ping", id=5)])[0]["id"] == 5  # the next answer


def test_events_reach_every_subscriber_in_vdsm_shape(server, bus):
    clients = [connected_stomp_py(server.port) for _ in range(2)]
    for conn, listener in clients:
        conn.subscribe("jms.queue.events", id="events", headers={"receipt": "sub"})
    wait_for(lambda: all(stomp_subscribed(server, n) for n in [2]))
    bus.publish({"event": "vm", "vmId": VM, "status": "Paused", "pauseCode": "EIO"})
    bus.publish({"event": "job", "vmId": VM, "jobId": JOB, "drive": "vda", "from": "COMMIT",
                 "to": "READY", "reason": "", "error": None})
    bus.publish({"event": "domain", "domainID": SD, "status": "INVALID", "reason": "gone"})
    try:
        for conn, listener in clients:
            vm = json.loads(listener.next("jms.queue.events").body)
            assert vm["jsonrpc"] == "2.0" and "id" not in vm
            assert vm["method"] == f"|virt|VM_status|{VM}"
            assert vm["params"][VM]["status"] == "Paused"
            assert vm["params"][VM]["pauseCode"] == "EIO"
            assert isinstance(vm["params"]["notify_time"], int)
            job = json.loads(listener.next("jms.queue.events").body)
            assert job["method"] == f"|virt|VM_job|{VM}"
            assert job["params"][VM]["jobId"] == JOB and job["params"][VM]["to"] == "READY"
            domain = json.loads(listener.next("jms.queue.events").body)
            assert domain["method"] == f"|storage|domain_status|{SD}"
            assert domain["params"][SD] == {"status": "INVALID", "reason": "gone", "seq": 3}
    finally:
        for conn, _ in clients:
            conn.disconnect()


def stomp_subscribed(server, count: int) -> bool:
    with server.stomp._lock:
        return sum(c.subscribed("jms.queue.events") for c in server.stomp._connections) >= count


def test_unsubscribed_clients_get_no_events(server, bus):
    raw = RawStomp(server.port)
    raw.connect()
    raw.send("SUBSCRIBE", {"destination": "jms.queue.events", "id": "e", "receipt": "1"})
    assert raw.frame().command == "RECEIPT"
    raw.send("UNSUBSCRIBE", {"id": "e", "receipt": "2"})
    assert raw.frame().headers["receipt-id"] == "2"
    bus.publish({"event": "vm", "vmId": VM, "status": "Up", "pauseCode": "NOERR"})
    raw.send("DISCONNECT", {"receipt": "bye"})
    frame = raw.frame()
    assert (frame.command, frame.headers["receipt-id"]) == ("RECEIPT", "bye")  # no MESSAGE first
    assert raw.closed_within(5)


def test_http_and_stomp_share_the_port(server, stomp_py):
    conn, listener = stomp_py
    http_conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    http_conn.request("POST", "/jsonrpc", json.dumps(request("Host.ping2")),
                      {"Content-Type": "application/json"})
    assert json.loads(http_conn.getresponse().read())["result"] is True
    http_conn.close()
    assert call(conn, listener, [request("Host.ping")])[0]["result"] is True


# --- mutual TLS -------------------------------------------------------------------------------------

def test_mutual_tls_calls_and_events(tls_server, certs, bus):
    conn, listener = connected_stomp_py(tls_server.port, tls=certs)
    try:
        conn.subscribe("replies", id="r")
        conn.subscribe("jms.queue.events", id="e", headers={"receipt": "sub"})
        answer = call(conn, listener, [request("Host.ping2", id=1), request("No.such", id=2),
                                       request("Host.getAllVmStats", id=3)])
        by_id = {a["id"]: a for a in answer}
        assert by_id[1]["result"] is True and by_id[3]["result"] == STATS
        assert by_id[2]["error"]["code"] == -32601
        wait_for(lambda: stomp_subscribed(tls_server, 1))
        bus.publish({"event": "vm", "vmId": VM, "status": "Up", "pauseCode": "NOERR"})
        event = json.loads(listener.next("jms.queue.events").body)
        assert event["method"] == f"|virt|VM_status|{VM}"
    finally:
        conn.disconnect()


def test_tls_client_without_certificate_is_refused(tls_server, certs):
    conn = stomp.Connection12([("127.0.0.1", tls_server.port)], reconnect_attempts_max=1,
                              timeout=10)
    conn.set_ssl(for_hosts=[("127.0.0.1", tls_server.port)], ca_certs=certs["ca"])
    with pytest.raises(stomp.exception.StompException):
        conn.connect(wait=True)
    assert not conn.is_connected()


def test_plain_stomp_on_the_tls_port_gets_an_error_frame(tls_server):
    raw = RawStomp(tls_server.port)
    raw.send("CONNECT", {"accept-version": "1.2"})
    frame = raw.frame()
    assert frame.command == "ERROR"
    assert "stomps://" in frame.headers["message"]
    assert raw.closed_within(5)


# --- heart-beats ----------------------------------------------------------------------------------

def test_heart_beat_negotiation(server):
    raw = RawStomp(server.port)
    # VDSM's client: cannot send, wants one every 24 s -> the pair swapped.
    assert raw.connect("0,24000").headers["heart-beat"] == "24000,0"
    raw.close()
    raw = RawStomp(server.port)
    # Below 1000 ms is raised to 1000 (VDSM's minimum).
    assert raw.connect("300,200").headers["heart-beat"] == "1000,1000"
    raw.close()
    raw = RawStomp(server.port)
    assert raw.connect("0,0").headers["heart-beat"] == "0,0"
    raw.close()


def test_the_server_sends_heart_beats(server):
    raw = RawStomp(server.port)
    raw.connect("0,1000")
    deadline = time.monotonic() + 10
    while raw.heartbeats < 2:
        assert time.monotonic() < deadline, "no heart-beats"
        assert not raw.closed_within(0.2)
    raw.close()


def test_a_silent_client_is_dropped_after_its_interval(server):
    raw = RawStomp(server.port)
    raw.connect("1000,0")  # promises a heart-beat every second, then says nothing
    started = time.monotonic()
    assert raw.closed_within(10)
    assert 1.0 <= time.monotonic() - started < 6


def test_a_client_sending_heart_beats_stays(server):
    raw = RawStomp(server.port)
    raw.connect("2000,0")  # dropped after 3 s of silence; we say something every 0.5 s
    for _ in range(8):
        raw.sock.sendall(b"\n")
        assert not raw.closed_within(0.5)
    raw.send("SEND", {"destination": "jms.topic.vdsm_requests", "reply-to": "q"},
             json.dumps(request("Host.ping")).encode())
    assert json.loads(raw.frame().body)["result"] is True


def test_stomp_py_with_heart_beats(server):
    conn, listener = connected_stomp_py(server.port, heartbeats=(1000, 1000))
    try:
        conn.subscribe("replies", id="r")
        for _ in range(3):
            assert call(conn, listener, [request("Host.ping")])[0]["result"] is True
            assert not listener.errors.qsize()
            wait_until_passed(1.0)
        assert conn.is_connected()
    finally:
        conn.disconnect()


def wait_until_passed(seconds: float) -> None:
    """Let time pass (the heart-beats are what is tested here)."""
    done = threading.Event()
    done.wait(seconds)


# --- limits and errors ----------------------------------------------------------------------------

def test_an_oversized_body_is_refused_with_error(bus):
    server = make_server(bus, max_body=1000)
    try:
        raw = RawStomp(server.port)
        raw.connect()
        raw.sock.sendall(b"SEND\ndestination:jms.topic.vdsm_requests\ncontent-length:5000\n\n")
        frame = raw.frame()
        assert frame.command == "ERROR"
        assert "5000 bytes exceeds the limit of 1000" in frame.headers["message"]
        assert raw.closed_within(5)
        # Without content-length: refused once the body passes the limit.
        raw = RawStomp(server.port)
        raw.connect()
        try:
            raw.sock.sendall(b"SEND\ndestination:jms.topic.vdsm_requests\n\n" + b"x" * 3000)
        except OSError:
            pass
        frame = raw.frame()
        assert frame.command == "ERROR" and "exceeds the limit of 1000" in frame.headers["message"]
        raw = RawStomp(server.port)
        raw.connect()
        raw.sock.sendall(b"SEND\n" + b"h:" + b"v" * (70 << 10) + b"\n")
        frame = raw.frame()
        assert frame.command == "ERROR" and "headers exceed" in frame.headers["message"]
    finally:
        server.stop()


def test_subscriptions_are_bounded(server, monkeypatch):
    monkeypatch.setattr(server.stomp, "max_subscriptions", 3)
    raw = RawStomp(server.port)
    raw.connect()
    for i in range(3):
        raw.send("SUBSCRIBE", {"destination": f"q{i}", "id": str(i)})
    raw.send("SUBSCRIBE", {"destination": "q9", "id": "9"})
    frame = raw.frame()
    assert frame.command == "ERROR" and "too many subscriptions" in frame.headers["message"]
    assert raw.closed_within(5)


def test_a_connection_not_opened_by_connect_is_http(server):
    # As VDSM's protocol detector: only CONNECT or STOMP opens STOMP; the
    # HTTP side answers anything else with a JSON-RPC error.
    raw = RawStomp(server.port)
    raw.sock.sendall(b"SEND\ndestination:jms.topic.vdsm_requests\n\n[]\x00")
    answer = b""
    while chunk := raw.sock.recv(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"code":-32600' in answer


@pytest.mark.parametrize("data,message", [
    (b"CONNECT\naccept-version:1.0\n\n\x00", "STOMP 1.2 only"),
    (b"CONNECT\naccept-version:1.2\nheart-beat:x,1\n\n\x00", "invalid heart-beat"),
])
def test_bad_connects(server, data, message):
    raw = RawStomp(server.port)
    raw.sock.sendall(data)
    frame = raw.frame()
    assert frame.command == "ERROR" and message in frame.headers["message"], frame
    assert raw.closed_within(5)


@pytest.mark.parametrize("data,message", [
    (b"SEND\ndestination:/queue/x\n\n{}\x00", "unknown destination"),
    (b"HELLO\n\n\x00", "unknown command"),
    (b"SEND\nbad header\n\n\x00", "without a colon"),
    (b"SEND\nk:\\t\n\n\x00", "undefined escape"),
    (b"SEND\ncontent-length:-1\n\n\x00", "invalid content-length"),
    (b"SEND\ncontent-length:1\n\nxy\x00", "longer than its content-length"),
    (b"SUBSCRIBE\nid:1\n\n\x00", "needs the destination and id"),
    (b"BEGIN\ntransaction:t\n\n\x00", "not supported"),
    (b"CONNECT\naccept-version:1.2\n\n\x00", "already connected"),
    (b"SEND\n\xff\xfe:x\n\n\x00", "not UTF-8"),
])
def test_malformed_frames_get_an_error_and_the_server_goes_on(server, data, message):
    raw = RawStomp(server.port)
    raw.connect()
    raw.sock.sendall(data)
    frame = raw.frame()
    assert frame.command == "ERROR" and message in frame.headers["message"], frame
    assert raw.closed_within(5)
    other = RawStomp(server.port)
    other.connect()
    other.send("SEND", {"destination": "jms.topic.vdsm_requests", "reply-to": "q"},
               json.dumps(request("Host.ping")).encode())
    assert json.loads(other.frame().body)["result"] is True


def test_frames_split_anywhere_and_escaped_headers(server):
    raw = RawStomp(server.port)
    raw.connect()
    body = json.dumps([request("Host.ping")]).encode()
    data = (b"\r\n\n" + b"SUBSCRIBE\r\ndestination:a\\cb\\\\c\r\nid:s\r\n\r\n\x00"
            + b"SEND\ndestination:jms.topic.vdsm_requests\nreply-to:a\\cb\\\\c\ncontent-length:%d\n\n%s\x00"
            % (len(body), body))
    for i in range(len(data)):  # one byte at a time
        raw.sock.sendall(data[i:i + 1])
    frame = raw.frame()
    assert frame.headers["destination"] == "a:b\\c" and frame.headers["subscription"] == "s"
    assert json.loads(frame.body)[0]["result"] is True


def test_a_frame_with_receipt_gets_it(server):
    raw = RawStomp(server.port)
    raw.connect()
    raw.send("SUBSCRIBE", {"destination": "q", "id": "1", "receipt": "r-1"})
    frame = raw.frame()
    assert (frame.command, frame.headers["receipt-id"]) == ("RECEIPT", "r-1")


def test_a_client_that_never_reads_its_events_is_dropped(server, bus, monkeypatch):
    monkeypatch.setattr(stomp_module, "MAX_OUTBOX", 10)
    monkeypatch.setattr(stomp_module, "SEND_TIMEOUT", 1.0)
    raw = RawStomp(server.port)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect()
    raw.send("SUBSCRIBE", {"destination": "jms.queue.events", "id": "e", "receipt": "1"})
    raw.frame()
    started = time.monotonic()
    while stomp_subscribed(server, 1):
        assert time.monotonic() - started < 20, "the reader that does not read stays"
        bus.publish({"event": "vm", "vmId": VM, "status": "Up", "pauseCode": "x" * 2000})
    bus.publish({"event": "vm", "vmId": VM, "status": "Up"})  # the agent publishes on
    raw.close()


def test_stop_ends_stomp_connections_at_once(bus):
    server = make_server(bus)
    raw = RawStomp(server.port)
    raw.connect()
    started = time.monotonic()
    server.stop()
    assert raw.closed_within(5)
    assert time.monotonic() - started < 3


def test_a_slow_call_does_not_hold_up_the_connection(bus):
    release = threading.Event()

    def slow(params):
        release.wait(20)
        return {"slow": True}

    server = ApiServer(("127.0.0.1", 0), Dispatcher(load_schema(), {
        **table(), "Host.getCapabilities": slow}), events=bus)
    server.start()
    try:
        raw = RawStomp(server.port)
        raw.connect()
        raw.send("SEND", {"destination": "jms.topic.vdsm_requests", "reply-to": "q"},
                 json.dumps([request("Host.getCapabilities", id=1)]).encode())
        raw.send("SEND", {"destination": "jms.topic.vdsm_requests", "reply-to": "q"},
                 json.dumps([request("Host.ping", id=2)]).encode())
        assert json.loads(raw.frame().body)[0] == {"jsonrpc": "2.0", "id": 2, "result": True}
        release.set()
        assert json.loads(raw.frame().body)[0]["result"] == {"slow": True}
        # DISCONNECT waits for the answers of what was sent before it.
        release.clear()
        raw.send("SEND", {"destination": "jms.topic.vdsm_requests", "reply-to": "q"},
                 json.dumps([request("Host.getCapabilities", id=3)]).encode())
        raw.send("DISCONNECT", {"receipt": "bye"})
        threading.Timer(0.3, release.set).start()
        assert json.loads(raw.frame().body)[0]["id"] == 3
        assert raw.frame().command == "RECEIPT"
    finally:
        release.set()
        server.stop()
