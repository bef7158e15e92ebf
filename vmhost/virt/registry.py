"""The VMs this agent runs, by id: the one piece of state that the VM service,
recovery, the libvirt event handlers and the EIO resume policy share.

A reader may look one VM up without the lock (a dict read is atomic; event
handlers run on libvirt's event thread and must not wait); adding, removing and
listing take it.
"""
from __future__ import annotations

import threading
from typing import Iterable

from vmhost import errors
from vmhost.ids import check_uuid
from vmhost.virt.vm import Vm


class VmRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vms: dict[str, Vm] = {}

    def get(self, vm_id: str) -> Vm | None:
        return self._vms.get(vm_id)

    def find(self, vm_id: str) -> Vm:
        """The VM of an API call: a bad id or an unknown VM is the caller's error."""
        check_uuid(vm_id, "vmID")
        try:
            return self._vms[vm_id]
        except KeyError:
            raise errors.NoSuchVM(vm_id) from None

    def all(self) -> list[Vm]:
        with self._lock:
            return list(self._vms.values())

    def reserve(self, vm: Vm) -> None:
        """Register a VM about to be created; a VM already known by its id is refused
        (a concurrent create of the same VM fails fast)."""
        with self._lock:
            if vm.id in self._vms:
                raise errors.VMExists(vm.id)
            self._vms[vm.id] = vm

    def add(self, vms: Iterable[Vm]) -> None:
        with self._lock:
            self._vms.update({vm.id: vm for vm in vms})

    def remove(self, vm_id: str) -> None:
        with self._lock:
            self._vms.pop(vm_id, None)
