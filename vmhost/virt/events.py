"""libvirt's domain events -> the status of the VMs of the registry.

The handlers run on libvirt's event thread: they make no libvirt call and
never wait on a VM's lock. Not to be confused with vmhost.events (the
notification bus they publish on).
"""
from __future__ import annotations

import logging
from typing import Callable

import libvirt

from vmhost.virt.registry import VmRegistry
from vmhost.virt.vm import DOWN, PAUSED, UP

log = logging.getLogger(__name__)

_STOP_REASONS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "QEMU failed",
}


class VmEvents:
    def __init__(self, registry: VmRegistry, publish: Callable[[dict], None]):
        self._registry = registry
        self._publish = publish

    def on_io_error(self, vm_uuid: str, dev_alias: str, reason: str) -> None:
        """libvirt IO_ERROR_REASON: remember which disk failed (the EIO resume
        policy resumes the VM when that disk's domain is VALID again)."""
        vm = self._registry.get(vm_uuid)
        if vm is not None:
            vm.eio_aliases.add(dev_alias)
            log.warning("VM %s: I/O error on %s (%s)", vm_uuid, dev_alias, reason)

    def on_lifecycle(self, vm_uuid: str, event: int, detail: int) -> None:
        """libvirt lifecycle event."""
        vm = self._registry.get(vm_uuid)
        if vm is None:
            return
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            vm.status = DOWN
            vm.exit_message = _STOP_REASONS.get(detail, "stopped")
        elif event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
            vm.status = PAUSED
            if detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
                vm.pause_code = "EIO"
        elif event in (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_STARTED):
            vm.status, vm.pause_code = UP, "NOERR"
        else:
            return
        self._publish({"event": "vm", "vmId": vm.id, "status": vm.status,
                       "pauseCode": vm.pause_code})
