"""One VM as the agent runs it: its definition plus the runtime status.

Status is kept from libvirt's lifecycle events and refreshed by a poll on
start-up and after libvirtd reconnects; the definition is written back to the
domain metadata whenever it changes.
"""
from __future__ import annotations

import threading

import libvirt

from vmhost.refs import VolumeRef
from vmhost.virt import domxml
from vmhost.virt.vmdef import VmDefinition

UP, PAUSED, DOWN = "Up", "Paused", "Down"


def status_from_state(state: int, reason: int) -> tuple[str, str]:
    """(status, pauseCode) from virDomainGetState."""
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return UP, "NOERR"
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        eio = state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR
        return PAUSED, "EIO" if eio else "NOERR"
    return DOWN, "NOERR"


class Vm:
    def __init__(self, definition: VmDefinition, status: str = UP, pause_code: str = "NOERR"):
        self.definition = definition
        self.status = status
        self.pause_code = pause_code
        self.exit_message = ""
        # vmJobs is reported only once the jobs were checked against libvirt.
        self.jobs_known = False
        # Device aliases ("virtio-disk0") that reported an I/O error since the last resume.
        self.eio_aliases: set[str] = set()
        # Drives whose chain may differ from the live XML (a re-read failed).
        self.stale_drives: set[str] = set()
        # Set when recovery could not load part of what libvirt keeps for it.
        self.recovery_error = ""
        self.bad_jobs: dict[str, str] = {}   # job id -> why its record is unreadable
        # Serialises changes to this VM (definition, libvirt operations).
        self.lock = threading.RLock()

    @property
    def id(self) -> str:
        return self.definition.vm_id

    def domain(self, conn: libvirt.virConnect) -> libvirt.virDomain:
        return conn.lookupByUUIDString(self.id)

    def persist(self, conn: libvirt.virConnect) -> None:
        """Write the definition into the live domain's metadata (atomic in libvirt)."""
        self.domain(conn).setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            f"<vm>{domxml.escape_text(self.definition.to_json())}</vm>",
            domxml.METADATA_KEY, domxml.METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def apply_live_chain(self, live: dict[str, domxml.LiveDisk], names: list[str]) -> bool:
        """Make the named drives' chains what the live XML shows; True if any changed."""
        changed = False
        for name in names:
            disk = live.get(name)
            if disk is None or not disk.chain:
                continue
            drive = self.definition.drive(name)
            chain = [VolumeRef(drive.domain, drive.image, n.volume, n.path) for n in disk.chain]
            if chain != drive.chain or drive.format != disk.chain[-1].format:
                drive.chain = chain
                drive.format = disk.chain[-1].format
                changed = True
        return changed

    def uses_volume(self, domain: str, image: str, volume: str) -> bool:
        return any(d.domain == domain and d.image == image and volume in d.volume_ids()
                   for d in self.definition.drives)

    def stats(self) -> dict:
        d = self.definition
        stats = {"vmId": d.vm_id, "vmName": d.name, "status": self.status,
                 "pauseCode": self.pause_code, "memSize": d.mem_mib}
        if self.status == DOWN and self.exit_message:
            stats["exitMessage"] = self.exit_message
        if self.recovery_error:
            stats["recoveryError"] = self.recovery_error
        return stats

    def full_info(self) -> dict:
        d = self.definition
        devices = []
        for drive in d.drives:
            devices.append({
                "device": "disk", "type": "disk", "name": drive.name, "iface": "virtio",
                "domainID": drive.domain, "imageID": drive.image, "volumeID": drive.volume,
                "path": drive.path, "format": "cow" if drive.format == "qcow2" else "raw",
                "volumeChain": [v.to_api() for v in drive.chain],
            })
        return {"vmId": d.vm_id, "vmName": d.name, "memSize": d.mem_mib,
                "status": self.status, "resumeBehavior": d.resume_behavior,
                "devices": devices}
