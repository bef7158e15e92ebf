"""The STOMP frame parser and encoder (vmhost/api/transport/frames.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmhost.api.transport.frames import (CLIENT_COMMANDS, Frame, FrameError, FrameLimits, Parser,
                                         encode)

texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=20)


@settings(max_examples=300, deadline=None)
@given(command=st.sampled_from(sorted(CLIENT_COMMANDS - {"CONNECT"})),
       headers=st.dictionaries(texts.filter(lambda t: t != "content-length"), texts, max_size=5),
       body=st.binary(max_size=200), cuts=st.lists(st.integers(0, 400), max_size=5))
def test_round_trip_split_anywhere(command, headers, body, cuts):
    data = b"\n\r\n" + encode(command, headers, body) + b"\n"  # with heart-beats around
    parser = Parser()
    frames = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        frames += parser.feed(data[start:cut])
        start = cut
    frames += parser.feed(data[start:])
    assert len(frames) == 1
    frame = frames[0]
    assert frame.command == command and frame.body == body
    assert {k: v for k, v in frame.headers.items() if k != "content-length"} == headers


def test_first_header_wins_and_connect_is_not_unescaped():
    frames = Parser().feed(b"SEND\na:1\na:2\n\n\x00CONNECT\nhost:a\\cb\n\n\x00")
    assert frames[0].headers == {"a": "1"}
    assert frames[1].headers == {"host": "a\\cb"}


def test_body_without_content_length_ends_at_nul():
    assert Parser().feed(b"SEND\n\nab\x00c")[0].body == b"ab"


def test_content_length_body_may_hold_nul():
    assert Parser().feed(b"SEND\ncontent-length:3\n\na\x00b\x00")[0].body == b"a\x00b"


@pytest.mark.parametrize("data,message", [
    (b"NOPE\n", "unknown command"),
    (b"SEND\nx\n\n\x00", "without a colon"),
    (b"SEND\na:\\q\n\n\x00", "undefined escape"),
    (b"SEND\ncontent-length:12x\n\n", "invalid content-length"),
    (b"SEND\ncontent-length:2\n\nabc", "longer than its content-length"),
    (b"SEND\x00\n\n", "NUL byte in frame headers"),
    (b"SEND\na:b\x00", "without a blank line"),
    (b"SEND\ncontent-length:101\n\n", "exceeds the limit of 100 bytes"),
    (b"SEND\n\n" + b"x" * 101, "exceeds the limit of 100 bytes"),
    (b"SEND\n" + b"a:b\n" * 11 + b"\n\x00", "more than 10 headers"),
    (b"SEND\n" + b"h" * 300, "headers exceed the limit of 256 bytes"),
])
def test_errors_name_what_was_wrong(data, message):
    parser = Parser(FrameLimits(max_header_bytes=256, max_headers=10, max_body=100))
    with pytest.raises(FrameError, match=message):
        parser.feed(data)


def test_encode_escapes_except_connected():
    assert encode("MESSAGE", {"a:b": "c\nd\\"}) == b"MESSAGE\na\\cb:c\\nd\\\\\n\n\x00"
    assert encode("CONNECTED", {"version": "1.2"}) == b"CONNECTED\nversion:1.2\n\n\x00"
    assert encode("MESSAGE", {}, b"xy") == b"MESSAGE\ncontent-length:2\n\nxy\x00"
    assert isinstance(Parser().feed(b"\n")[:1], list) and Frame("SEND").body == b""
