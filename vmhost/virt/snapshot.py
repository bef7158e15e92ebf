"""Live snapshot: switch drives to pre-created leaves in one libvirt
external disk-only snapshot (all drives or none)."""
from __future__ import annotations

import dataclasses
from xml.sax.saxutils import quoteattr

import libvirt

SNAPSHOT_FLAGS = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)


@dataclasses.dataclass(frozen=True)
class SnapshotTarget:
    drive: str        # "vda"
    path: str         # the new leaf, already created with the current leaf as parent
    format: str = "qcow2"


def snapshot_xml(targets: list[SnapshotTarget], other_drives: list[str]) -> str:
    disks = "".join(
        f"<disk name={quoteattr(t.drive)} snapshot='external' type='file'>"
        f"<driver type={quoteattr(t.format)}/><source file={quoteattr(t.path)}/></disk>"
        for t in targets)
    disks += "".join(f"<disk name={quoteattr(d)} snapshot='no'/>" for d in other_drives)
    return f"<domainsnapshot><disks>{disks}</disks></domainsnapshot>"
