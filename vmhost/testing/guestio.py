"""Guest I/O without a guest OS: qemu-io run inside QEMU through the monitor.

Used by the demo and the tests to write and verify data in a running VM's
active layer exactly as a guest would.
"""
from __future__ import annotations

import libvirt
import libvirt_qemu


class GuestIoError(Exception):
    pass


def qemu_io(dom: libvirt.virDomain, drive: str, command: str) -> str:
    """Run one qemu-io command against a drive ("vda") of a running VM."""
    index = ord(drive[-1]) - ord("a")
    hmp = f'qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend "{command}"'
    out = libvirt_qemu.qemuMonitorCommand(dom, hmp, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if "fail" in out.lower() or "error" in out.lower():
        raise GuestIoError(f"{hmp}: {out.strip()}")
    return out


def write(dom: libvirt.virDomain, drive: str, pattern: int, offset: int, length: int) -> None:
    qemu_io(dom, drive, f"write -P {pattern:#x} {offset} {length}")


def verify(dom: libvirt.virDomain, drive: str, pattern: int, offset: int, length: int) -> None:
    qemu_io(dom, drive, f"read -P {pattern:#x} {offset} {length}")
