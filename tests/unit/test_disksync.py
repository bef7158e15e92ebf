"""VM.synchronizeDisks' storage repair on the jobs runner: decided under the
VM lock, the storage call made without it, re-checked before the write-ahead
entry goes (fakes of test_vm_edges)."""
from __future__ import annotations

import pytest

from test_vm_edges import svc  # noqa: F401  (the fixture)
from vmhost import errors
from vmhost.scheduler import DONE
from vmhost.virt.disksync import DiskSyncJob


def due(service, vm) -> dict[str, str]:
    """The pending repairs: drive -> the leaf the storage chain is walked from."""
    return {job.drive: job.leaf for job in service.disksync.store.readable(vm)}


def test_a_failed_storage_repair_stays_pending_and_runs_again(svc):  # noqa: F811
    service, vm, dom, storage, scheduler, log, chain = svc
    real = storage.sync_volume_chain

    def broken(*args):
        raise OSError("EIO")
    storage.sync_volume_chain = broken
    with pytest.raises(errors.StorageDomainUnavailable,
                       match=f"storage repair of image {vm.definition.drives[0].image} "
                             "failed: EIO"):
        service.synchronize_disks(vm.id)
    assert due(service, vm) == {"vda": chain[-1]}     # written ahead, still due
    storage.sync_volume_chain = real
    assert scheduler.items[f"disksync/{vm.id}/vda"]() is DONE
    assert due(service, vm) == {}
    assert log[-1] == ("sync", chain[-1], chain)


def test_a_repair_whose_drive_changed_meanwhile_is_decided_again(svc):  # noqa: F811
    service, vm, dom, storage, scheduler, log, chain = svc
    real = storage.sync_volume_chain

    def racing(*args):
        # (as if a newer request came)
        service.disksync.store.put(vm, DiskSyncJob.for_drive(vm.id, "vda", chain[0]))
        storage.sync_volume_chain = real
        return real(*args)
    storage.sync_volume_chain = racing
    with pytest.raises(errors.StorageDomainUnavailable):
        service.synchronize_disks(vm.id)
    assert due(service, vm) == {"vda": chain[0]}      # not dropped: re-run
    assert scheduler.items[f"disksync/{vm.id}/vda"]() is DONE
    assert due(service, vm) == {} and log[-1] == ("sync", chain[0], chain)
