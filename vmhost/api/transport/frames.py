"""STOMP 1.2 frames: an incremental parser with limits, and the encoder.

A frame is a command line, `key:value` header lines, a blank line, a body
and a NUL byte. Lines end in LF or CRLF. Bare EOLs between frames are
heart-beats. Header names and values are escaped (`\\\\`, `\\n`, `\\r`,
`\\c` for `:`), except in CONNECT and CONNECTED frames; an undefined escape
is an error. A repeated header keeps its first value. With `content-length`
the body is exactly that many bytes (NULs allowed) followed by NUL; without
it, the body ends at the first NUL.

Everything a peer can make large is bounded (FrameLimits): the header
section, the number of headers, the body. Crossing a bound, or any
malformed input, raises FrameError with a message fit for an ERROR frame;
the parser then is unusable (the connection ends).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Commands a client may send (STOMP 1.2, section "Client Frames") and the
# ones a server sends.
CLIENT_COMMANDS = frozenset({"CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK",
                             "BEGIN", "COMMIT", "ABORT", "DISCONNECT"})
SERVER_COMMANDS = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
_UNESCAPED_COMMANDS = frozenset({"CONNECT", "CONNECTED"})

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", ":": "\\c"}
_UNESCAPES = {"\\\\": "\\", "\\n": "\n", "\\r": "\r", "\\c": ":"}
_ESCAPE = re.compile(r"[\\\n\r:]")
_UNESCAPE = re.compile(r"\\.?", re.DOTALL)
_DIGITS = re.compile(r"[0-9]{1,19}\Z")


class FrameError(ValueError):
    """Malformed or oversized input; the message says what was wrong."""


@dataclass(frozen=True)
class FrameLimits:
    max_header_bytes: int = 64 << 10   # command line and headers together
    max_headers: int = 128
    max_body: int = 1 << 20


@dataclass
class Frame:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def encode(command: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    """One frame on the wire; content-length is always set when there is a body."""
    lines = [command]
    escape = command not in _UNESCAPED_COMMANDS
    for name, value in (headers or {}).items():
        name, value = str(name), str(value)
        if escape:
            name, value = _escape(name), _escape(value)
        lines.append(f"{name}:{value}")
    if body and "content-length" not in (headers or {}):
        lines.append(f"content-length:{len(body)}")
    return ("\n".join(lines) + "\n\n").encode("utf-8") + body + b"\x00"


HEARTBEAT = b"\n"


def _escape(text: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group()], text)


def _unescape(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        try:
            return _UNESCAPES[m.group()]
        except KeyError:
            raise FrameError(f"undefined escape sequence {m.group()!r} in a header") from None
    return _UNESCAPE.sub(one, text) if "\\" in text else text


class Parser:
    """feed(bytes) -> the frames completed by them, in order. `commands`:
    the commands accepted (CLIENT_COMMANDS on a server)."""

    def __init__(self, limits: FrameLimits = FrameLimits(),
                 commands: frozenset[str] = CLIENT_COMMANDS):
        self._limits = limits
        self._commands = commands
        self._buffer = bytearray()
        self._head: Frame | None = None   # command and headers parsed, body pending
        self._length: int | None = None   # the body's content-length, if given
        self.heartbeats = 0               # bare EOLs seen (for tests and idleness)

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        if self._head is None:
            self._skip_heartbeats()
            if not self._parse_head():
                return None
        return self._parse_body()

    def _skip_heartbeats(self) -> None:
        start = 0
        buffer = self._buffer
        while start < len(buffer):
            if buffer[start] == 0x0A:
                start += 1
            elif buffer[start] == 0x0D and start + 1 < len(buffer) and buffer[start + 1] == 0x0A:
                start += 2
            else:
                break
        if start:
            self.heartbeats += 1
            del buffer[:start]

    def _parse_head(self) -> bool:
        end = self._buffer.find(b"\n\n")
        crlf = self._buffer.find(b"\r\n\r\n")
        candidates = [(i, 2) for i in (end,) if i >= 0] + [(i, 4) for i in (crlf,) if i >= 0]
        mixed = _mixed_blank_line(self._buffer)
        if mixed is not None:
            candidates.append(mixed)
        if not candidates:
            self._check_command_line()
            if len(self._buffer) > self._limits.max_header_bytes:
                raise FrameError(f"frame headers exceed the limit of {self._limits.max_header_bytes} bytes")
            if 0 in self._buffer:
                raise FrameError("frame without a blank line after its headers")
            return False
        position, skip = min(candidates)
        if position > self._limits.max_header_bytes:
            raise FrameError(f"frame headers exceed the limit of {self._limits.max_header_bytes} bytes")
        head = bytes(self._buffer[:position])
        del self._buffer[:position + skip]
        self._head = self._frame_head(head)
        return True

    def _check_command_line(self) -> None:
        # Garbage is refused as soon as its first line is complete, not
        # after max_header_bytes of it.
        newline = self._buffer.find(b"\n")
        if newline >= 0:
            command = bytes(self._buffer[:newline]).rstrip(b"\r").decode("utf-8", "replace")
            if command not in self._commands:
                raise FrameError(f"unknown command {command[:40]!r}")

    def _frame_head(self, head: bytes) -> Frame:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("frame headers are not UTF-8") from None
        if "\x00" in text:
            raise FrameError("NUL byte in frame headers")
        lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
        command = lines[0]
        if command not in self._commands:
            raise FrameError(f"unknown command {command[:40]!r}")
        if len(lines) - 1 > self._limits.max_headers:
            raise FrameError(f"more than {self._limits.max_headers} headers in a frame")
        escaped = command not in _UNESCAPED_COMMANDS
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise FrameError(f"header line without a colon: {line[:40]!r}")
            if escaped:
                name, value = _unescape(name), _unescape(value)
            headers.setdefault(name, value)  # STOMP 1.2: the first one wins
        self._length = None
        if "content-length" in headers:
            length = headers["content-length"].strip()
            if not _DIGITS.match(length):
                raise FrameError(f"invalid content-length {length[:40]!r}")
            self._length = int(length)
            if self._length > self._limits.max_body:
                raise FrameError(f"frame body of {self._length} bytes exceeds the limit of "
                                 f"{self._limits.max_body} bytes")
        return Frame(command, headers)

    def _parse_body(self) -> Frame | None:
        assert self._head is not None
        if self._length is not None:
            if len(self._buffer) < self._length + 1:
                return None
            if self._buffer[self._length] != 0:
                raise FrameError("frame body is longer than its content-length (no NUL after it)")
            body_end = self._length
        else:
            body_end = self._buffer.find(b"\x00")
            if body_end < 0:
                if len(self._buffer) > self._limits.max_body:
                    raise FrameError(f"frame body exceeds the limit of {self._limits.max_body} bytes")
                return None
            if body_end > self._limits.max_body:
                raise FrameError(f"frame body exceeds the limit of {self._limits.max_body} bytes")
        frame, self._head = self._head, None
        frame.body = bytes(self._buffer[:body_end])
        del self._buffer[:body_end + 1]
        return frame


def _mixed_blank_line(buffer: bytearray) -> tuple[int, int] | None:
    """A header section ending in CRLF then LF, or LF then CRLF."""
    hits = [(i, 3) for i in (buffer.find(b"\r\n\n"), buffer.find(b"\n\r\n")) if i >= 0]
    return min(hits) if hits else None
