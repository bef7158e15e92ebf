"""Volume metadata: the storage view of a chain.

One small text file per volume, VDSM-style ``KEY=value`` lines sorted by key
and closed by ``EOF``, so a reader can tell a whole record from a cut one.
Writers replace it atomically (see vmhost.fsutil.atomic_write).
"""
from __future__ import annotations

import dataclasses
import enum
import time

from vmhost.ids import BLANK_UUID, check_uuid

MAX_DESCRIPTION = 210


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
            "DESCRIPTION": _one_line(self.description)[:MAX_DESCRIPTION],
            "DISKTYPE": _one_line(self.disktype),
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
        text = "".join(f"{k}={v}\n" for k, v in sorted(fields.items())) + "EOF\n"
        return text.encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> "VolumeMetadata":
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise MetadataError(f"metadata is not UTF-8: {e}") from None
        if not lines or lines[-1] != "EOF":
            raise MetadataError("metadata is truncated (no EOF marker)")
        kv = {}
        for line in lines[:-1]:
            key, sep, value = line.partition("=")
            if not sep:
                raise MetadataError(f"malformed metadata line {line!r:.80}")
            kv[key] = value
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


def _one_line(text: str) -> str:
    return text.replace("\n", " ").replace("\r", " ")


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
