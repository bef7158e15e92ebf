"""Plain value types that cross the storage/virt boundary."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VolumeRef:
    """One volume of a drive's chain, as the VM and the engine see it."""
    domain: str
    image: str
    volume: str
    path: str

    def to_api(self) -> dict:
        return {"domainID": self.domain, "imageID": self.image,
                "volumeID": self.volume, "path": self.path}

    @classmethod
    def from_api(cls, d: dict) -> "VolumeRef":
        return cls(d["domainID"], d["imageID"], d["volumeID"], d["path"])


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """A chain ready for a VM: volumes base first, and the leaf's qemu format."""
    chain: list[VolumeRef]
    format: str


@dataclasses.dataclass(frozen=True)
class PreparedLeaf:
    """A new leaf for a running VM's drive (a live snapshot): the volume, its
    qemu format, and the volume its qcow2 header names as backing file."""
    ref: VolumeRef
    format: str
    backing: str | None
