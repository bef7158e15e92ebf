"""The client side of vmhost's STOMP transport (see vmhost/api/transport/stomp.py).

StompConnection speaks just what vmhost.client needs: CONNECT, SUBSCRIBE,
SEND with reply-to, reading MESSAGE frames, DISCONNECT. One connection is
used by one thread at a time.
"""
from __future__ import annotations

import socket
import ssl
import time
import uuid

from vmhost.api.transport.frames import (SERVER_COMMANDS, Frame, FrameError, FrameLimits, Parser,
                                         encode)

REQUESTS = "jms.topic.vdsm_requests"
# What the client reads at most in one frame (the agent's answers can be
# large: Host.getAllVmStats of many VMs).
_LIMITS = FrameLimits(max_body=256 << 20)


class StompError(Exception):
    """The agent answered with an ERROR frame, or the connection broke; the
    message says which."""


class StompClosed(StompError):
    """The connection ended (closed or reset by the agent) without an ERROR frame."""


class StompConnection:
    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 timeout: float | None = 60, heart_beat_ms: int = 0):
        """Connected (CONNECT answered by CONNECTED) when this returns.
        heart_beat_ms: ask the agent to send a heart-beat this often (0: none)."""
        self._parser = Parser(_LIMITS, SERVER_COMMANDS)
        self._frames: list[Frame] = []
        self._timeout = timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise StompError(f"cannot connect to {host}:{port}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
        except (OSError, ValueError) as e:
            sock.close()
            raise StompError(f"TLS with {host}:{port} failed: {e}") from e
        self._sock = sock
        self.subscriptions: dict[str, str] = {}  # destination -> id
        try:
            self._send("CONNECT", {"accept-version": "1.2", "host": host,
                                   "heart-beat": f"0,{heart_beat_ms}"})
            frame = self.read_frame()
        except StompError:
            self.close()
            raise
        if frame.command != "CONNECTED":
            self.close()
            raise StompError(f"expected CONNECTED, got {frame.command}")

    def subscribe(self, destination: str) -> str:
        """Subscribe; live when this returns (the agent's RECEIPT came)."""
        sid = str(uuid.uuid4())
        self._send("SUBSCRIBE", {"destination": destination, "id": sid, "ack": "auto",
                                 "receipt": sid})
        held = []
        try:
            while True:
                frame = self.read_frame()
                if frame.command == "RECEIPT" and frame.headers.get("receipt-id") == sid:
                    break
                held.append(frame)
        except TimeoutError:
            raise StompError(f"no receipt for the subscription to {destination}") from None
        finally:
            self._frames[:0] = held  # read later, in order
        self.subscriptions[destination] = sid
        return sid

    def send(self, destination: str, body: bytes, reply_to: str | None = None) -> None:
        headers = {"destination": destination, "content-type": "application/json"}
        if reply_to is not None:
            headers["reply-to"] = reply_to
        self._send("SEND", headers, body)

    def read_frame(self, timeout: float | None = -1.0) -> Frame:
        """The next frame (heart-beats skipped); an ERROR frame raises
        StompError with its message. timeout -1: the connection's; None: no
        limit. TimeoutError if nothing arrived in time."""
        if timeout is not None and timeout < 0:
            timeout = self._timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._frames:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                raise
            except OSError as e:
                raise StompClosed(f"connection broke: {e}") from e
            if not data:
                raise StompClosed("the agent closed the connection")
            try:
                self._frames.extend(self._parser.feed(data))
            except FrameError as e:
                raise StompError(f"bad frame from the agent: {e}") from e
        frame = self._frames.pop(0)
        if frame.command == "ERROR":
            message = frame.headers.get("message") or frame.body.decode("utf-8", "replace")
            raise StompError(f"refused: {message}")
        return frame

    def disconnect(self) -> None:
        try:
            self._send("DISCONNECT", {"receipt": "bye"})
            self.read_frame(timeout=min(self._timeout or 5, 5))
        except (StompError, TimeoutError):
            pass
        self.close()

    def close(self) -> None:
        try:
            # Wakes a thread blocked reading it (close alone does not).
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass

    def _send(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        self._sock.settimeout(self._timeout)
        try:
            self._sock.sendall(encode(command, headers, body))
        except OSError as e:
            # Refused before it read us? Its ERROR frame says why.
            try:
                self.read_frame(timeout=1)
            except StompClosed:
                pass
            except StompError as refusal:
                raise refusal from e
            except TimeoutError:
                pass
            raise StompClosed(f"connection broke: {e}") from e
