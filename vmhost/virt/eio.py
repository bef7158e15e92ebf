"""The EIO resume policy: a VM that an I/O error paused is resumed, left paused
or killed, as its resumeBehavior says, once the storage domain of the failing
disk is VALID again (VDSM's auto_resume / leave_paused / kill).

A domain turning VALID submits one pass over the VMs for that domain to the
scheduler. Before VM recovery is done the VMs are not known yet, so no pass is
submitted then; recovery's end submits one for each domain already VALID. A
pass re-checks that its domain is still VALID before each VM it acts on.
The disks that failed are learnt from libvirt's IO_ERROR_REASON events
(vmhost.virt.events); resuming a VM forgets them (VmService.cont).
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

from vmhost.scheduler import DONE, Outcome, Scheduler
from vmhost.virt.registry import VmRegistry
from vmhost.virt.vm import PAUSED, Vm

log = logging.getLogger(__name__)


class VmControl(Protocol):
    def cont(self, vm_id: str) -> None: ...
    def destroy(self, vm_id: str) -> None: ...


class DomainStatus(Protocol):
    def repo_stats(self) -> dict: ...
    def domain_valid(self, sd_uuid: str) -> bool: ...


class EioResume:
    def __init__(self, registry: VmRegistry, vms: VmControl, storage: DomainStatus,
                 scheduler: Scheduler, ready: Callable[[], bool]):
        self._registry = registry
        self._vms = vms
        self._storage = storage
        self._scheduler = scheduler
        self._ready = ready      # VM recovery is done

    def on_domain_valid(self, sd_uuid: str) -> None:
        # Before recovery the VMs are not known yet; recovery_done submits it again.
        if self._ready():
            self._scheduler.submit(f"resume-eio/{sd_uuid}",
                                   f"resume VMs paused by I/O errors on domain {sd_uuid}",
                                   lambda: self._resume_item(sd_uuid))

    def recovery_done(self) -> None:
        """Domains that turned VALID while VMs were recovered: their pass is due now."""
        for sd_uuid in self._storage.repo_stats():
            if self._storage.domain_valid(sd_uuid):
                self.on_domain_valid(sd_uuid)

    def _resume_item(self, sd_uuid: str) -> Outcome:
        self.resume_paused(sd_uuid)
        return DONE

    def resume_paused(self, sd_uuid: str) -> list[str]:
        """A domain turned VALID: VMs paused by an I/O error on one of its
        disks are resumed, left paused or killed, as their resumeBehavior says.
        Returns the ids of the VMs acted on."""
        acted = []
        for vm in self._registry.all():
            if vm.status != PAUSED or vm.pause_code != "EIO":
                continue
            if sd_uuid not in eio_domains(vm):
                continue
            if not self._storage.domain_valid(sd_uuid):     # it failed again meanwhile
                break
            behavior = vm.definition.resume_behavior
            log.info("VM %s paused on I/O error; domain %s is VALID: %s", vm.id, sd_uuid,
                     behavior)
            if behavior == "auto_resume":
                self._vms.cont(vm.id)
            elif behavior == "kill":
                self._vms.destroy(vm.id)
            else:
                continue
            acted.append(vm.id)
        return acted


def eio_domains(vm: Vm) -> set[str]:
    """Domains of the disks that reported the I/O error (all of the VM's
    disks when unknown, e.g. for a VM recovered already paused)."""
    drives = vm.definition.drives
    if vm.eio_aliases:
        names = {f"vd{chr(ord('a') + int(a[len('virtio-disk'):]))}"
                 for a in vm.eio_aliases if a.startswith("virtio-disk") and
                 a[len("virtio-disk"):].isdigit()}
        drives = [d for d in drives if d.name in names] or drives
    return {d.domain for d in drives}
