"""Hostile free text in volume metadata (desc, diskType): every value either
round-trips exactly or is refused with an error naming the field; none can
set another key or make the image unreadable."""
from __future__ import annotations

import os
import uuid

import pytest

from vmhost import errors
from vmhost.ids import BLANK_UUID
from vmhost.storage.metadata import (MAX_DESCRIPTION, Legality, MetadataError, VolFormat,
                                     VolType, VolumeMetadata, decode_value, encode_value)

MiB = 1 << 20
U = lambda: str(uuid.uuid4())  # noqa: E731

# Everything str.splitlines() splits on, plus '=', NUL, the escape character
# itself and payloads that try to set keys the reader trusts.
SEPARATORS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
              "\u2028", "\u2029"]
HOSTILE = [
    *(f"a{sep}CAP=1" for sep in SEPARATORS),
    *(f"x{sep}LEGALITY=ILLEGAL{sep}PUUID={BLANK_UUID}{sep}EOF{sep}" for sep in SEPARATORS),
    "=", "==", "CAP=1", "DESCRIPTION=", "\x00", "a\x00b", "\t", "\x7f", "\x1b[31m", "\x9f",
    "%", "%0A", "%25", "%E2%80%A8", "%zz", "100%", "EOF", "\ufeff", "\u202e", "\U0001f600",
    "e\u0301", "\uffff", " leading and trailing ", "\u2028" * MAX_DESCRIPTION,
    "\U0001f600" * MAX_DESCRIPTION, "%" * MAX_DESCRIPTION,
]


def md_with(description: str = "", disktype: str = "DATA") -> VolumeMetadata:
    return VolumeMetadata(domain=U(), image=U(), volume=U(), parent=BLANK_UUID,
                          format=VolFormat.COW, voltype=VolType.LEAF, legality=Legality.LEGAL,
                          capacity=MiB, disktype=disktype, description=description)


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: ascii(t)[:40])
def test_value_round_trips_and_stays_on_its_line(text):
    md = md_with(description=text, disktype=text[:32] or "DATA")
    data = md.dump()
    lines = data.split(b"\n")
    # Exactly the 13 keys and EOF, each line one key and one '='.
    assert lines[-2:] == [b"EOF", b""]
    assert len(lines) == 15
    assert all(line.count(b"=") == 1 for line in lines[:-2])
    # No character any reader might split on survives encoding.
    assert data.decode().splitlines() == data.decode().split("\n")[:-1]
    assert b"\x00" not in data
    assert VolumeMetadata.parse(data) == md


def test_encoding_escapes_only_what_it_must():
    assert encode_value("plain text: e\u0301 \U0001f600 / .-_") == "plain text: e\u0301 \U0001f600 / .-_"
    assert encode_value("a=b%c\nd\u2028") == "a%3Db%25c%0Ad%E2%80%A8"
    assert decode_value("a%3Db%25c%0Ad%E2%80%A8") == "a=b%c\nd\u2028"


def test_legacy_values_read_as_written():
    # Files from before the encoding: a raw \u2028 or \x0b (which the old
    # reader split on), a lone or lower-case '%', an invalid UTF-8 run.
    for raw in ["a\u2028CAP=1", "v\x0bw", "100%", "%zz", "%e2%80%a8", "%E2%41"]:
        assert decode_value(raw) == raw
    legacy = md_with().dump().replace(b"DESCRIPTION=", "DESCRIPTION=a\u2028CAP=1".encode())
    md = VolumeMetadata.parse(legacy)
    assert md.description == "a\u2028CAP=1" and md.capacity == MiB


def test_reader_refuses_duplicate_keys_and_splits_on_newline_only():
    data = md_with(description="x").dump()
    with pytest.raises(MetadataError, match="CAP"):
        VolumeMetadata.parse(data.replace(b"EOF\n", b"CAP=1\nEOF\n"))
    # A separator other than \n inside a line is part of that line's value.
    data = data.replace(b"DISKTYPE=DATA", "DISKTYPE=DATA\x1cVOLTYPE=INTERNAL".encode())
    md = VolumeMetadata.parse(data)
    assert md.disktype == "DATA\x1cVOLTYPE=INTERNAL" and md.voltype is VolType.LEAF
    assert VolumeMetadata.parse(data.rstrip(b"\n")) == md   # EOF without its newline


# --- through the storage service (real file domain, real qemu-img) -------------

from test_storage import storage  # noqa: E402,F401  (the same fixture: a real file domain)


def test_hostile_desc_and_disktype_round_trip_and_keep_the_image_readable(storage):
    img, base = U(), U()
    storage.create_volume(storage.sd, img, base, 16 * MiB, "COW")
    parent = base
    for i, text in enumerate(HOSTILE):
        vol = U()
        disktype = text[:32] if text else "DATA"
        info = storage.create_volume(storage.sd, img, vol, 16 * MiB, "COW", disk_type=disktype,
                                     desc=text, src_img_uuid=img, src_vol_uuid=parent)
        assert (info["description"], info["disktype"]) == (text, disktype)
        back = storage.volume_info(storage.sd, img, vol)
        assert (back["description"], back["disktype"]) == (text, disktype), ascii(text)
        assert (back["capacity"], back["legality"], back["parent"], back["voltype"]) == \
            (str(16 * MiB), "LEGAL", parent, "LEAF")
        parent = vol
    chain = storage.volume_chain(storage.sd, img, parent)
    assert [md.volume for md in chain][0] == base and len(chain) == len(HOSTILE) + 1
    assert [md.description for md in chain[1:]] == HOSTILE
    assert all(md.voltype is VolType.INTERNAL for md in chain[:-1])


@pytest.mark.parametrize("field,kwargs,words", [
    ("desc", {"desc": "x" * (MAX_DESCRIPTION + 1)}, ["desc", "0..210", "211"]),
    ("desc", {"desc": "a\ud800b"}, ["desc", "surrogate", "U+D800"]),
    ("desc", {"desc": 7}, ["desc", "string"]),
    ("diskType", {"disk_type": ""}, ["diskType", "1..32"]),
    ("diskType", {"disk_type": "D" * 33}, ["diskType", "1..32", "33"]),
    ("diskType", {"disk_type": "\udfff"}, ["diskType", "surrogate"]),
    ("diskType", {"disk_type": None}, ["diskType", "string"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unstorable_text_is_refused_naming_the_field(storage, field, kwargs, words):
    img = U()
    with pytest.raises(errors.InvalidParameter) as e:
        storage.create_volume(storage.sd, img, U(), MiB, "COW", **kwargs)
    for word in words:
        assert word in str(e.value), str(e.value)
    assert not os.path.exists(os.path.join(storage.domain(storage.sd).manifest.path,
                                           storage.sd, "images", img))
