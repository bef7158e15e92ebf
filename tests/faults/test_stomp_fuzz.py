"""STOMP frame fuzzing against one live agent (a real `vmhost serve`
process): frames built from valid ones (CONNECT, SUBSCRIBE, SEND of
harmless JSON-RPC calls, UNSUBSCRIBE, ACK, DISCONNECT, ...) then mutated
(bytes flipped, dropped, duplicated; NULs, EOLs, colons and backslashes
inserted; bodies and headers cut or grown past the limits; bad
content-lengths; unknown commands; invalid UTF-8), sent on fresh
connections in chunks of random sizes.

For every connection (a CONNECT, usually valid, and 1-6 fuzzed frames; the
client half-closes after sending):
  * the agent closes it within CONNECTION_DEADLINE (no hang, whatever was
    sent, complete or not);
  * what the agent sent is well-formed STOMP: only CONNECTED, MESSAGE,
    RECEIPT and ERROR frames; every ERROR says why (a `message` header);
    every MESSAGE body is JSON;
and every PING_EVERY connections Host.ping answers over a fresh STOMP
connection within PING_DEADLINE. At the end the agent process is alive and
its log holds no traceback (no unexpected exception in any connection).

Size: VMHOST_FUZZ_STOMP_FRAMES fuzzed frames, else VMHOST_FUZZ_REQUESTS
(`make faults` sets it to 10000), else 1500 so that `make test` runs a
fast subset. VMHOST_FUZZ_SEED sets the seed. The counts go to
reports/stomp-fuzz.json in the full run (/var/tmp/vmhost-tests/ in the fast
one).
"""
from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from test_fuzz import TEST_BASE, libvirtd, start_agent, workdir  # noqa: E402,F401  (fixtures)
from vmhost.api.transport.frames import (SERVER_COMMANDS, FrameError, FrameLimits,  # noqa: E402
                                         Parser, encode)

pytestmark = pytest.mark.integration

FAST_DEFAULT = 1500
TARGET = int(os.environ.get("VMHOST_FUZZ_STOMP_FRAMES") or os.environ.get("VMHOST_FUZZ_REQUESTS")
             or FAST_DEFAULT)
SEED = int(os.environ.get("VMHOST_FUZZ_SEED") or 20240611)
CONNECTION_DEADLINE = 15.0
PING_EVERY = 200
PING_DEADLINE = 10.0
MAX_BODY = 1 << 20  # the agent's default max_request_bytes
ROOT = os.path.dirname(os.path.dirname(HERE))
REPORT = (os.path.join(ROOT, "reports", "stomp-fuzz.json") if os.environ.get("VMHOST_FUZZ_REQUESTS")
          else os.path.join(TEST_BASE, "stomp-fuzz-fast.json"))

REQUESTS = "jms.topic.vdsm_requests"
HARMLESS = ["Host.ping", "Host.ping2", "Host.getVMList", "Host.getAllVmStats",
            "Host.getCapabilities", "Host.getJobHistory", "VM.getStats", "No.such",
            "Host.getStorageRepoStats", "StorageDomain.getInfo"]
SPECIAL = [b"\x00", b"\n", b"\r", b"\r\n", b":", b"\\", b"\\c", b"\\x", b"\xff", b"\xc3",
           b"\n\n", b"\x00\n", b"content-length:", b"\xe2\x80\xa8"]


def _rpc_body(rng: random.Random) -> bytes:
    def one() -> dict:
        params = {}
        if rng.random() < 0.5:
            params["vmID"] = rng.choice([str(uuid.uuid4()), "", "x" * 50, 7])
        if rng.random() < 0.2:
            params["storagedomainID"] = str(uuid.uuid4())
        message = {"jsonrpc": "2.0", "method": rng.choice(HARMLESS), "params": params}
        if rng.random() < 0.9:
            message["id"] = rng.choice([rng.randrange(1 << 30), str(uuid.uuid4()), None])
        return message
    shape = rng.random()
    if shape < 0.6:
        body = json.dumps([one() for _ in range(rng.randint(1, 4))])
    elif shape < 0.8:
        body = json.dumps(one())
    elif shape < 0.9:
        body = rng.choice(["", "[", "{}", "[]", "null", '{"jsonrpc":"2.0"', "[1,2]", "\u2028"])
    else:
        body = json.dumps([one()])[: rng.randint(0, 30)]
    return body.encode("utf-8")


def _valid_frame(rng: random.Random) -> bytes:
    kind = rng.random()
    sid = rng.choice(["1", "2", "events", str(uuid.uuid4()), "a:b", "\\"])
    receipt = {"receipt": str(rng.randrange(100))} if rng.random() < 0.3 else {}
    if kind < 0.45:
        headers = {"destination": rng.choice([REQUESTS, "jms.topic.vdsm_irs_requests", REQUESTS,
                                              "/queue/other", ""]),
                   "reply-to": rng.choice(["replies", "jms.topic.vdsm_responses", "r\nx"]),
                   "content-type": "application/json", **receipt}
        body = _rpc_body(rng)
        if rng.random() < 0.5:
            return encode("SEND", headers, body)
        # Without content-length: the body ends at the first NUL.
        return ("SEND\n" + "".join(f"{k}:{v}\n" for k, v in headers.items() if "\n" not in v)
                + "\n").encode() + body.replace(b"\x00", b"") + b"\x00"
    if kind < 0.65:
        return encode("SUBSCRIBE", {"destination": rng.choice(["replies", "jms.queue.events"]),
                                    "id": sid, "ack": "auto", **receipt})
    if kind < 0.75:
        return encode("UNSUBSCRIBE", {"id": sid, **receipt})
    if kind < 0.8:
        return encode(rng.choice(["ACK", "NACK"]), {"id": sid})
    if kind < 0.85:
        return encode(rng.choice(["BEGIN", "COMMIT", "ABORT"]), {"transaction": "t"})
    if kind < 0.9:
        return encode("DISCONNECT", receipt)
    if kind < 0.95:
        return rng.choice([b"\n", b"\r\n", b"\n\n\n"])  # heart-beats
    return encode("CONNECT", {"accept-version": "1.2"})


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.choice([0, 1, 1, 2, 3, 5])):
        op = rng.random()
        at = rng.randrange(len(data) + 1)
        if op < 0.2 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op < 0.35:
            data[at:at] = rng.choice(SPECIAL)
        elif op < 0.5 and data:
            del data[at:at + rng.randint(1, 8)]
        elif op < 0.6:
            data = data[:at]
        elif op < 0.7:
            data[at:at] = data[at:at + rng.randint(1, 40)] * rng.randint(1, 3)
        elif op < 0.78:
            length = rng.choice([-1, 0, 1, 10, MAX_BODY, MAX_BODY + 1, 1 << 40, 10 ** 30])
            data = bytearray(data.replace(b"\n\n", f"\ncontent-length:{length}\n\n".encode(), 1))
        elif op < 0.84:
            data[at:at] = b"h" * rng.choice([100, 5000, 70_000])
        elif op < 0.9:
            data[at:at] = (b"x:y\n" * rng.choice([10, 200]))
        elif op < 0.95:
            data = bytearray(rng.choice([b"SEND", b"CONNECTED", b"FOO", b"send", b"",
                                         b"MESSAGE"]) + data[data.find(b"\n"):])
        else:
            data += b"y" * rng.choice([1000, MAX_BODY + 10])
    return bytes(data)


def _connection_bytes(rng: random.Random, frames: int) -> bytes:
    if rng.random() < 0.9:
        heart = rng.choice(["0,0", "0,24000", "1000,0", "10,10"])
        first = encode("CONNECT", {"accept-version": "1.2", "heart-beat": heart})
        if rng.random() < 0.1:
            first = _mutate(rng, first)
    else:
        first = b"STOMP\naccept-version:1.2\n\n\x00"
    body = b"".join(_mutate(rng, _valid_frame(rng)) if rng.random() < 0.4 else _valid_frame(rng)
                    for _ in range(frames))
    return first + body


def _exchange(port: int, data: bytes, rng: random.Random) -> bytes:
    """Send `data` in random chunks, half-close, read until the agent closes."""
    deadline = time.monotonic() + CONNECTION_DEADLINE
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=CONNECTION_DEADLINE) as sock:
        at = 0
        try:
            while at < len(data):
                size = rng.choice([1, 7, 64, 1500, 1 << 16, len(data)])
                sock.sendall(data[at:at + size])
                at += size
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN
            pass  # refused (an ERROR frame, or HTTP's answer) before all was sent
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the agent kept the connection open after "
                                     f"{CONNECTION_DEADLINE}s; sent {data[:300]!r}")
            sock.settimeout(left)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:  # reset: closed with our input unread
                break
            if not chunk:
                break
            received += chunk
    return received


def _check_answer(data: bytes, received: bytes, counts: dict) -> None:
    if not received:
        counts["closed-silently"] = counts.get("closed-silently", 0) + 1
        return
    if received.startswith(b"HTTP/1.1 "):  # not opened by CONNECT: the HTTP side answered
        assert b'"jsonrpc"' in received or b"\r\n\r\n" in received, received[:300]
        counts["http"] = counts.get("http", 0) + 1
        return
    parser = Parser(FrameLimits(max_body=64 << 20), SERVER_COMMANDS)
    try:
        frames = parser.feed(received)
    except FrameError as e:
        raise AssertionError(f"malformed STOMP from the agent ({e}): {received[:300]!r} "
                             f"for {data[:300]!r}") from None
    for frame in frames:
        counts[frame.command] = counts.get(frame.command, 0) + 1
        if frame.command == "ERROR":
            assert frame.headers.get("message"), frame
        if frame.command == "MESSAGE":
            json.loads(frame.body)


def _ping(port: int) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=PING_DEADLINE) as sock:
        sock.sendall(encode("CONNECT", {"accept-version": "1.2"}) +
                     encode("SEND", {"destination": REQUESTS, "reply-to": "q"},
                            json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "Host.ping",
                                         "params": {}}]).encode()))
        parser = Parser(FrameLimits(), SERVER_COMMANDS)
        frames = []
        while len(frames) < 2:
            chunk = sock.recv(65536)
            assert chunk, "the agent closed instead of answering Host.ping"
            frames += parser.feed(chunk)
    assert frames[0].command == "CONNECTED"
    assert json.loads(frames[1].body)[0]["result"] is True
    assert time.monotonic() - started < PING_DEADLINE


def test_fuzzed_stomp_frames(workdir):
    agent = start_agent(os.path.join(workdir, "state"))
    rng = random.Random(SEED)
    counts: dict[str, int] = {}
    sent = connections = 0
    try:
        while sent < TARGET:
            frames = min(rng.randint(1, 6), TARGET - sent)
            data = _connection_bytes(rng, frames)
            received = _exchange(agent.port, data, rng)
            _check_answer(data, received, counts)
            sent += frames
            connections += 1
            if connections % PING_EVERY == 0:
                _ping(agent.port)
                assert agent.proc.poll() is None, "the agent died"
        _ping(agent.port)
        assert agent.proc.poll() is None, "the agent died"
    finally:
        agent.stop()
    with open(agent.log_path, errors="replace") as f:
        log = f.read()
    assert "Traceback" not in log, log[log.find("Traceback") - 500:][:3000]
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT, "w") as f:
        json.dump({"frames": sent, "connections": connections, "seed": SEED, "answers": counts,
                   "crashed": False, "hung": False}, f, indent=1)
    print(f"\nSTOMP fuzz: {sent} frames on {connections} connections, seed {SEED}; "
          f"answers: {json.dumps(counts, sort_keys=True)}")
