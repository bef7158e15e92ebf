"""Volume metadata: the storage view of a chain.

One small text file per volume, VDSM-style ``KEY=value`` lines sorted by key
and closed by ``EOF``, so a reader can tell a whole record from a cut one.
Writers replace it atomically (see vmhost.fsutil.atomic_write).

Free text (DESCRIPTION, DISKTYPE) comes from the API, so a value must never
be able to end its line or start another key: every value is written
percent-encoded (``%XX`` per UTF-8 byte) for ``%``, ``=`` and every character
some reader could take for a line break or a control (Unicode categories Cc,
Zl, Zp: ``\n``, ``\r``, ``\x0b``, ``\x0c``, ``\x1c``-``\x1e``, ``\x85``,
``\u2028``, ``\u2029``, NUL, ...). So a value round-trips exactly, a line
holds exactly one ``=`` and one key, and ``grep PUUID=`` style tools cannot be
fooled either. The reader splits on ``\n`` only (never str.splitlines, which
also splits on the characters above) and refuses duplicate keys.

Decoding is lenient for files written before the encoding existed: only runs
of upper-case ``%XX`` that form valid UTF-8 are decoded, anything else is
kept as written. (A legacy description holding such a run literally, e.g.
"%41", reads back decoded: "A".)
"""
from __future__ import annotations

import dataclasses
import enum
import re
import time
import unicodedata

from vmhost.errors import InvalidParameter
from vmhost.ids import BLANK_UUID, check_uuid

# Limits on what the caller sends, in characters (the API schema has the same
# ones). VDSM's DESCRIPTION_SIZE is 210. Encoded, a character takes at most
# 9 bytes ("%E2%80%A8"), so a whole record stays under 4 KiB.
MAX_DESCRIPTION = 210
MAX_DISKTYPE = 32


class VolFormat(str, enum.Enum):
    COW = "COW"
    RAW = "RAW"

    @property
    def qemu(self) -> str:
        return "qcow2" if self is VolFormat.COW else "raw"


class VolType(str, enum.Enum):
    LEAF = "LEAF"
    INTERNAL = "INTERNAL"
    SHARED = "SHARED"


class Legality(str, enum.Enum):
    LEGAL = "LEGAL"
    ILLEGAL = "ILLEGAL"


class Prealloc(str, enum.Enum):
    SPARSE = "SPARSE"
    PREALLOCATED = "PREALLOCATED"


class MetadataError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class VolumeMetadata:
    domain: str
    image: str
    volume: str
    parent: str
    format: VolFormat
    voltype: VolType
    legality: Legality
    capacity: int
    prealloc: Prealloc = Prealloc.SPARSE
    disktype: str = "DATA"
    description: str = ""
    generation: int = 0
    ctime: int = dataclasses.field(default_factory=lambda: int(time.time()))
    # The base a finished merge copied this volume into (see
    # vmhost.storage.image): written with ILLEGAL, cleared with LEGAL.
    merged_into: str = ""

    @property
    def is_base(self) -> bool:
        return self.parent == BLANK_UUID

    @property
    def merged_away(self) -> bool:
        """Merged into a base by a merge that finished: garbage of no chain."""
        return self.legality is Legality.ILLEGAL and bool(self.merged_into)

    def replace(self, **changes) -> "VolumeMetadata":
        return dataclasses.replace(self, **changes)

    def dump(self) -> bytes:
        fields = {
            "CAP": str(self.capacity),
            "CTIME": str(self.ctime),
            "DESCRIPTION": self.description[:MAX_DESCRIPTION],
            "DISKTYPE": self.disktype,
            "DOMAIN": self.domain,
            "FORMAT": self.format.value,
            "GEN": str(self.generation),
            "IMAGE": self.image,
            "LEGALITY": self.legality.value,
            "PUUID": self.parent,
            "TYPE": self.prealloc.value,
            "VOLTYPE": self.voltype.value,
            "VOLUME": self.volume,
        }
        if self.merged_into:     # only then: other volumes' files stay VDSM's keys
            fields["MERGED"] = self.merged_into
        text = "".join(f"{k}={encode_value(v)}\n" for k, v in sorted(fields.items()))
        return (text + "EOF\n").encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> "VolumeMetadata":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MetadataError(f"metadata is not UTF-8: {e}") from None
        # The writer's separator only (see the module docstring).
        lines = text.removesuffix("\n").split("\n")
        if lines[-1] != "EOF":
            raise MetadataError("metadata is truncated (no EOF marker)")
        kv = {}
        for line in lines[:-1]:
            key, sep, value = line.partition("=")
            if not sep:
                raise MetadataError(f"malformed metadata line {line!r:.80}")
            if key in kv:
                raise MetadataError(f"metadata has key {key!r:.40} twice")
            kv[key] = decode_value(value)
        try:
            return cls(
                domain=check_uuid(kv["DOMAIN"], "DOMAIN"),
                image=check_uuid(kv["IMAGE"], "IMAGE"),
                volume=check_uuid(kv["VOLUME"], "VOLUME"),
                parent=check_uuid(kv["PUUID"], "PUUID"),
                format=VolFormat(kv["FORMAT"]),
                voltype=VolType(kv["VOLTYPE"]),
                legality=Legality(kv["LEGALITY"]),
                capacity=int(kv["CAP"]),
                prealloc=Prealloc(kv.get("TYPE", "SPARSE")),
                disktype=kv.get("DISKTYPE", "DATA"),
                description=kv.get("DESCRIPTION", ""),
                generation=int(kv.get("GEN", "0")),
                ctime=int(kv.get("CTIME", "0")),
                merged_into=check_uuid(kv["MERGED"], "MERGED") if kv.get("MERGED") else "",
            )
        except KeyError as e:
            raise MetadataError(f"metadata lacks key {e.args[0]}") from None
        except Exception as e:  # bad enum or int value
            raise MetadataError(f"bad metadata value: {e}") from None


_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
_ENCODED_RUN = re.compile(r"(?:%[0-9A-F]{2})+")


def _needs_escape(ch: str) -> bool:
    return ch in "%=" or unicodedata.category(ch) in _ESCAPED_CATEGORIES


def encode_value(text: str) -> str:
    """One metadata value as written: no separator, control or '=' left."""
    return "".join("".join(f"%{b:02X}" for b in ch.encode("utf-8")) if _needs_escape(ch) else ch
                   for ch in text)


def decode_value(text: str) -> str:
    """Inverse of encode_value; text it did not write is kept as it is."""
    def decode(match: re.Match) -> str:
        try:
            return bytes.fromhex(match.group().replace("%", "")).decode("utf-8")
        except UnicodeDecodeError:
            return match.group()
    return _ENCODED_RUN.sub(decode, text)


def check_text(name: str, value: object, max_length: int, min_length: int = 0) -> str:
    """A free-text API value fit for metadata: a string of min..max characters
    (as sent, before encoding) that UTF-8 can carry. Raises InvalidParameter
    naming the field."""
    if not isinstance(value, str):
        raise InvalidParameter(f"{name} must be a string, got {type(value).__name__}")
    if not min_length <= len(value) <= max_length:
        raise InvalidParameter(f"{name} must be {min_length}..{max_length} characters long, "
                               f"got {len(value)}")
    for i, ch in enumerate(value):
        if unicodedata.category(ch) == "Cs":
            raise InvalidParameter(f"{name} is not valid Unicode text: a lone surrogate "
                                   f"U+{ord(ch):04X} at position {i}")
    return value


def parse_format(value: str | int) -> VolFormat:
    """Accept "COW"/"RAW" and VDSM's numeric codes."""
    # VDSM: COW_FORMAT = 4, RAW_FORMAT = 5.
    mapping = {4: VolFormat.COW, 5: VolFormat.RAW, "4": VolFormat.COW, "5": VolFormat.RAW}
    if value in mapping:
        return mapping[value]
    return VolFormat(value)


def parse_prealloc(value: str | int) -> Prealloc:
    # VDSM: PREALLOCATED_VOL = 1, SPARSE_VOL = 2.
    mapping = {1: Prealloc.PREALLOCATED, 2: Prealloc.SPARSE,
               "1": Prealloc.PREALLOCATED, "2": Prealloc.SPARSE}
    if value in mapping:
        return mapping[value]
    return Prealloc(value)
