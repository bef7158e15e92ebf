"""Disk synchronization: make the VM definition and the storage metadata
agree with the chain QEMU runs, for every drive of a VM (VM.synchronizeDisks).

The VM's view is fixed at once from libvirt's live XML. The storage half
needs the domain to be VALID: each drive's repair is recorded in the VM
definition (persisted in the libvirt metadata, together with the leaf the
storage chain must be walked from) before it is tried, and a repair that
cannot run now is a scheduler item that runs when the domain turns VALID, or
after an agent restart (recovery re-submits the recorded repairs).
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

from vmhost import errors
from vmhost.jobs.runner import Outside, act_outside
from vmhost.scheduler import DONE, Blocked, Outcome, Requirement, Retry, Scheduler, Wait
from vmhost.virt import domxml
from vmhost.virt.vm import DOWN, Vm

log = logging.getLogger(__name__)


class SyncStorage(Protocol):
    def sync_volume_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                          actual: list[str]) -> str: ...
    def domain_valid(self, sd_uuid: str) -> bool: ...


class DiskSynchronizer:
    def __init__(self, storage: SyncStorage, scheduler: Scheduler,
                 vm_lookup: Callable[[str], Vm | None],
                 xml_of: Callable[[Vm], str], persist: Callable[[Vm], None],
                 busy: Callable[[Vm], set[str]] = lambda vm: set()):
        self._storage = storage
        self._scheduler = scheduler
        self._vm_lookup = vm_lookup
        self._xml_of = xml_of
        self._persist = persist
        self._busy = busy    # drives with a live job: only the job touches them

    def synchronize(self, vm: Vm) -> dict:
        """Sync every drive without a live job; returns {drive: {before, after,
        storage}} ({skipped: reason} for a drive a job owns). Raises naming the
        domain if its storage cannot be repaired now (the repair stays pending
        and runs when the domain is VALID)."""
        with vm.lock:
            if vm.status == DOWN:
                raise errors.GeneralError(f"VM {vm.id} is down")
            live = domxml.live_disks(self._xml_of(vm))
            busy = self._busy(vm)
            result, names = {}, []
            for drive in vm.definition.drives:
                result[drive.name] = {"domainID": drive.domain, "imageID": drive.image,
                                      "before": drive.volume_ids()}
                if drive.name in busy:
                    result[drive.name]["skipped"] = ("the drive has a live merge job; the job "
                                                     "syncs its chain when it ends")
                    continue
                names.append(drive.name)
                # Walk the storage chain from the leaf the storage last knew.
                vm.definition.storage_sync.setdefault(drive.name, drive.volume)
            vm.apply_live_chain(live, names)
            self._persist(vm)   # the VM view and the pending repairs, before storage
            for drive in vm.definition.drives:
                result[drive.name]["after"] = drive.volume_ids()
        unavailable = []
        for name in names:     # storage, outside the VM lock
            outcome = self._repair_drive(vm, name, result)
            if outcome is not DONE:
                unavailable.append((name, outcome))
                self._submit(vm.id, name)
        if unavailable:
            drive = vm.definition.drive(unavailable[0][0])
            raise errors.StorageDomainUnavailable(
                f"storage domain {drive.domain} is not available: the repair of drive(s) "
                f"{', '.join(n for n, _ in unavailable)} is pending and runs when it is VALID "
                f"({_reason(unavailable[0][1])}); the VM definition is already synchronized")
        return result

    def resume(self, vm: Vm) -> None:
        """After recovery: re-submit the repairs recorded in the VM definition."""
        for name in vm.definition.storage_sync:
            self._submit(vm.id, name)

    def pending(self, vm: Vm) -> list[str]:
        return sorted(vm.definition.storage_sync)

    def _submit(self, vm_id: str, drive: str) -> None:
        self._scheduler.submit(f"disksync/{vm_id}/{drive}",
                               f"storage metadata repair of drive {drive} of VM {vm_id}",
                               lambda: self._run(vm_id, drive), topics=(("vm", vm_id),))

    def _run(self, vm_id: str, drive: str) -> Outcome:
        vm = self._vm_lookup(vm_id)
        if vm is None or vm.status == DOWN or drive not in vm.definition.storage_sync:
            return DONE
        return self._repair_drive(vm, drive, None)

    def _repair_drive(self, vm: Vm, name: str, result: dict | None) -> Outcome:
        """Decide under the VM lock, write storage without it, re-check and
        persist under it again (vmhost.jobs.runner)."""
        with vm.lock:
            walk_from = vm.definition.storage_sync.get(name)
            if walk_from is None:
                return DONE
            drive = vm.definition.drive(name)
            if name in self._busy(vm):
                # A job started since: it owns the drive's storage now.
                del vm.definition.storage_sync[name]
                self._persist(vm)
                return DONE
            domain, image, actual = drive.domain, drive.image, drive.volume_ids()
        if not self._storage.domain_valid(domain):
            return Blocked(Requirement(f"storage domain {domain} is VALID",
                                       ("domain", domain),
                                       lambda: self._storage.domain_valid(domain)))
        work = Outside(io=lambda: self._storage.sync_volume_chain(domain, image, walk_from, actual),
                       then=lambda case: self._synced(vm, name, case, result),
                       expect=(walk_from, actual), what=f"storage repair of image {image}")
        return act_outside(work, lambda w, case: self._reenter(vm, name, w, case),
                           f"VM {vm.id} drive {name}")

    def _reenter(self, vm: Vm, name: str, work: Outside, case: str) -> Outcome:
        with vm.lock:
            if vm.status == DOWN:
                return DONE
            if (vm.definition.storage_sync.get(name),
                    vm.definition.drive(name).volume_ids()) != work.expect:
                return Wait(0.0)     # changed meanwhile: decide again
            return work.then(case)

    def _synced(self, vm: Vm, name: str, case: str, result: dict | None) -> Outcome:
        """The repair is done (VM lock held): the write-ahead entry goes."""
        del vm.definition.storage_sync[name]
        self._persist(vm)
        if result is not None:
            result[name]["storage"] = case
        log.info("VM %s drive %s: storage metadata in sync (%s)", vm.id, name, case)
        return DONE


def _reason(outcome: Outcome) -> str:
    if isinstance(outcome, Blocked):
        return outcome.requirement.description + " is not true"
    if isinstance(outcome, Retry):
        return outcome.reason
    return str(outcome)
