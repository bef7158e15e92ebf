"""Host facts: which accelerator we use, and the capabilities we report."""
from __future__ import annotations

import os
import socket

import libvirt

from vmhost import __version__


def detect_virt_type(conn: libvirt.virConnect) -> str:
    """'kvm' when /dev/kvm is usable by libvirt's QEMU, else 'qemu' (TCG)."""
    if not os.path.exists("/dev/kvm"):
        return "qemu"
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
    except libvirt.libvirtError:
        return "qemu"
    return "kvm"


class HostService:
    def __init__(self, conn_provider, virt_type: str, pending_work=lambda: []):
        self._conn = conn_provider
        self.virt_type = virt_type
        self._pending_work = pending_work

    def ping(self) -> bool:
        return True

    def pending_work(self) -> list[dict]:
        return self._pending_work()

    def capabilities(self) -> dict:
        conn = self._conn()
        return {
            "version": __version__,
            "software_version": __version__,
            "kvm": self.virt_type == "kvm",
            "kvmEnabled": str(self.virt_type == "kvm").lower(),
            "virtType": self.virt_type,
            "liveMerge": "true",
            "liveSnapshot": "true",
            "hostname": socket.gethostname(),
            "libvirtVersion": _version(conn.getLibVersion()),
            "qemuVersion": _version(conn.getVersion()),
        }


def _version(n: int) -> str:
    return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"
