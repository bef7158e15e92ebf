"""Disk synchronization: make the VM definition and the storage metadata
agree with the chain QEMU runs, for every drive of a VM (VM.synchronizeDisks).

The VM's view is fixed at once from libvirt's live XML. The storage half
needs the domain to be VALID: each drive's repair is a small job
(vmhost.jobs) whose record, in the VM definition's agent jobs, is persisted
in the libvirt metadata together with the new VM view and the leaf the
storage chain must be walked from, before it is tried; a repair that cannot
run now is a scheduler item that runs when the domain turns VALID, or after
an agent restart (recovery re-submits the recorded repairs):

  state    written                          what ends it
  PENDING  with the VM view, before the     the storage chain synced (the
           storage write (one record per    record is removed), or a live
           drive: a second request keeps    merge job started on the drive
           the first one's leaf)            (it owns the drive's storage)

Our domains are transient: the record dies with QEMU. So each repair also
writes an intent to the agent's state dir (storage/repairs.py, kind "sync")
before the record, and removes it after the record: a VM that goes down (or
is gone at an agent restart) before its repair ran leaves the intent, and the
repair runs offline when the domain is VALID (the metadata synced to the
qcow2 chain of the VM's last leaf), so no pending repair is dropped.

The record's id is derived from the VM and the drive, so a drive has at
most one. Definitions written before disk sync was a job carry
`storageSync` (drive -> leaf) instead: `from_legacy` makes each entry a
PENDING record.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import uuid
from typing import Callable, Protocol

from vmhost import errors
from vmhost.jobs.record import Record
from vmhost.jobs.runner import Outside, act_outside
from vmhost.jobs.store import VmJobStore
from vmhost.scheduler import DONE, Blocked, Outcome, Requirement, Retry, Scheduler, Wait
from vmhost.storage.repairs import ImageRepair, NoRepairs, Repairs
from vmhost.virt import domxml
from vmhost.virt.vm import DOWN, Vm

log = logging.getLogger(__name__)

# Names the ids of disk sync jobs (uuid5 of "<vm>/<drive>").
_ID_SPACE = uuid.UUID("6f1d3b0e-5a52-4c1e-9d0f-0d5c2a7e4b11")


class DiskSyncState(enum.Enum):
    PENDING = "PENDING"


@dataclasses.dataclass
class DiskSyncJob(Record):
    KIND = "disksync"
    VERSION = 1
    STATES = DiskSyncState
    UUID_FIELDS = ("id", "leaf")

    id: str
    drive: str      # libvirt target ("vda")
    leaf: str       # the leaf the storage chain is walked from
    state: DiskSyncState = DiskSyncState.PENDING

    @staticmethod
    def id_of(vm_id: str, drive: str) -> str:
        return str(uuid.uuid5(_ID_SPACE, f"{vm_id}/{drive}"))

    @classmethod
    def for_drive(cls, vm_id: str, drive: str, leaf: str) -> "DiskSyncJob":
        return cls(id=cls.id_of(vm_id, drive), drive=drive, leaf=leaf)

    @classmethod
    def from_legacy(cls, vm_id: str, legacy: dict) -> list["DiskSyncJob"]:
        """The jobs an old definition's `storageSync` stood for."""
        return [cls.for_drive(vm_id, drive, leaf)
                for drive, leaf in sorted((legacy.get("storageSync") or {}).items())]

    def check(self) -> None:
        if not isinstance(self.drive, str) or not self.drive:
            raise ValueError(f"disk sync job record drive must be a drive name: {self.drive!r}")


class SyncStorage(Protocol):
    def sync_volume_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                          actual: list[str]) -> str: ...
    def domain_valid(self, sd_uuid: str) -> bool: ...


class DiskSynchronizer:
    def __init__(self, storage: SyncStorage, scheduler: Scheduler,
                 vm_lookup: Callable[[str], Vm | None],
                 xml_of: Callable[[Vm], str], persist: Callable[[Vm], None],
                 busy: Callable[[Vm], set[str]] = lambda vm: set(),
                 repairs: Repairs | None = None):
        self._storage = storage
        # Where a repair goes if the VM does first: the records above live in
        # the (transient) domain and die with it, the intents in the state dir.
        self._repairs: Repairs = repairs or NoRepairs()
        self._scheduler = scheduler
        self._vm_lookup = vm_lookup
        self._xml_of = xml_of
        self.store: VmJobStore[DiskSyncJob] = VmJobStore(DiskSyncJob, persist,
                                                          field="agent_jobs")
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
                if self._job(vm, drive.name) is None:
                    self.store.put(vm, DiskSyncJob.for_drive(vm.id, drive.name, drive.volume))
            vm.apply_live_chain(live, names)
            for name in names:
                self._repairs.intend(self._intent(vm, name))
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
        """After recovery: re-submit the repairs recorded in the VM definition
        (with their intents, if an older agent wrote the records without)."""
        with vm.lock:
            jobs = self.store.readable(vm)
            for job in jobs:
                if not self._repairs.has(job.id):
                    self._repairs.intend(self._intent(vm, job.drive))
        for job in jobs:
            self._submit(vm.id, job.drive)

    def pending(self, vm: Vm) -> list[str]:
        return sorted(job.drive for job in self.store.readable(vm))

    def _job(self, vm: Vm, drive: str) -> DiskSyncJob | None:
        return self.store.get(vm, DiskSyncJob.id_of(vm.id, drive))

    def _submit(self, vm_id: str, drive: str) -> None:
        self._scheduler.submit(f"disksync/{vm_id}/{drive}",
                               f"storage metadata repair of drive {drive} of VM {vm_id}",
                               lambda: self._run(vm_id, drive), topics=(("vm", vm_id),))

    def _intent(self, vm: Vm, name: str) -> ImageRepair:
        """What the drive's repair is if the VM goes away first (VM lock held)."""
        job, drive = self._job(vm, name), vm.definition.drive(name)
        assert job is not None
        return ImageRepair.chain_sync(job.id, vm.id, drive.domain, drive.image,
                                      walk_from=job.leaf, chain=drive.volume_ids())

    def _run(self, vm_id: str, drive: str) -> Outcome:
        vm = self._vm_lookup(vm_id)
        if vm is None or vm.status == DOWN:
            # The record goes with the domain; the intent carries the repair on.
            self._repairs.start(DiskSyncJob.id_of(vm_id, drive),
                                "the VM went down before its storage repair")
            return DONE
        if self._job(vm, drive) is None:
            return DONE
        return self._repair_drive(vm, drive, None)

    def _repair_drive(self, vm: Vm, name: str, result: dict | None) -> Outcome:
        """Decide under the VM lock, write storage without it, re-check and
        persist under it again (vmhost.jobs.runner)."""
        with vm.lock:
            job = self._job(vm, name)
            if job is None:
                return DONE
            walk_from, drive = job.leaf, vm.definition.drive(name)
            if name in self._busy(vm):
                # A job started since: it owns the drive's storage now.
                self.store.remove(vm, job.id)
                self._repairs.cancel(job.id)
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
                # Storage is in sync; the record went with the domain.
                self._repairs.cancel(DiskSyncJob.id_of(vm.id, name))
                return DONE
            job = self._job(vm, name)
            if (job and job.leaf, vm.definition.drive(name).volume_ids()) != work.expect:
                return Wait(0.0)     # changed meanwhile: decide again
            return work.then(case)

    def _synced(self, vm: Vm, name: str, case: str, result: dict | None) -> Outcome:
        """The repair is done (VM lock held): the write-ahead record goes, then
        the intent (a restart between the two finds the VM without the record:
        the intent is dropped)."""
        job_id = DiskSyncJob.id_of(vm.id, name)
        self.store.remove(vm, job_id)
        self._repairs.cancel(job_id)
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
