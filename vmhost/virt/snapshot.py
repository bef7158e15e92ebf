"""Live snapshot: switch drives to pre-created leaves in one libvirt
external disk-only snapshot (all drives or none).

A snapshot is a small job (vmhost.jobs) whose record, in the VM
definition's agent jobs, says which drives a libvirt call may be switching,
so their chains are re-read from the live XML (libvirt, not vmhost, knows
whether QEMU switched):

  state      written                         what ends it
  SWITCHING  before snapshotCreateXML        the drives re-read from the live
             (failpoint vm.snapshot.before,  XML and persisted (by the verb,
             then the call, then             by its `resync/<vm>` retry if
             vm.snapshot.after)              libvirt did not answer, or by
                                             recovery after a crash); the
                                             record is then removed

Definitions written before snapshots were jobs carry `pendingSync` (the
drive names) instead: `from_legacy` makes it a SWITCHING record.
"""
from __future__ import annotations

import dataclasses
import enum
import uuid
from xml.sax.saxutils import quoteattr

import libvirt

from vmhost.jobs.record import Record

SNAPSHOT_FLAGS = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)


class SnapshotState(enum.Enum):
    SWITCHING = "SWITCHING"


@dataclasses.dataclass
class SnapshotJob(Record):
    KIND = "snapshot"
    VERSION = 1
    STATES = SnapshotState

    id: str
    drives: list[str]          # libvirt targets whose leaves the call switches
    state: SnapshotState = SnapshotState.SWITCHING

    @classmethod
    def new(cls, drives: list[str]) -> "SnapshotJob":
        return cls(id=str(uuid.uuid4()), drives=list(drives))

    @classmethod
    def from_legacy(cls, legacy: dict) -> list["SnapshotJob"]:
        """The job an old definition's `pendingSync` stood for (none if empty)."""
        drives = legacy.get("pendingSync") or []
        return [cls.new(drives)] if drives else []

    def check(self) -> None:
        if not isinstance(self.drives, list) or not all(isinstance(d, str) and d
                                                        for d in self.drives):
            raise ValueError(f"snapshot job record drives must be drive names: {self.drives!r}")


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
