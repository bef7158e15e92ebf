"""VM.synchronizeDisks' storage repair on the jobs runner: decided under the
VM lock, the storage call made without it, re-checked before the write-ahead
entry goes (fakes of test_vm_edges)."""
from __future__ import annotations

import json

import pytest

from test_vm_edges import make_svc, svc  # noqa: F401  (the fixture)
from vmhost import errors
from vmhost.scheduler import DONE
from vmhost.storage.repairs import SYNC, ImageRepair, ImageRepairs
from vmhost.virt.disksync import DiskSyncJob
from vmhost.virt.vm import DOWN


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


def pending_with_repairs(tmp_path):
    """make_svc's tuple, after a VM.synchronizeDisks whose domain was not
    VALID, with image repairs in `tmp_path`."""
    world = make_svc(lambda storage, scheduler: ImageRepairs(str(tmp_path), storage, scheduler))
    service, vm, dom, storage = world[:4]
    storage.domain_valid = lambda sd: False
    with pytest.raises(errors.StorageDomainUnavailable):
        service.synchronize_disks(vm.id)
    storage.domain_valid = lambda sd: True
    return world


def intents(tmp_path) -> list[str]:
    return sorted(p.stem for p in (tmp_path / "repairs").glob("*.json"))


def test_a_pending_repair_is_written_ahead_to_the_state_dir_and_dropped_once_done(tmp_path):
    service, vm, dom, storage, scheduler, log, chain = pending_with_repairs(tmp_path)
    job_id = DiskSyncJob.id_of(vm.id, "vda")
    assert intents(tmp_path) == [job_id]
    assert due(service, vm) == {"vda": chain[-1]}
    assert scheduler.items[f"disksync/{vm.id}/vda"]() is DONE
    assert due(service, vm) == {} and intents(tmp_path) == []
    assert log[-1] == ("sync", chain[-1], chain)


def test_a_vm_that_goes_down_before_its_repair_leaves_it_to_run_offline(tmp_path):
    service, vm, dom, storage, scheduler, log, chain = pending_with_repairs(tmp_path)
    job_id = DiskSyncJob.id_of(vm.id, "vda")
    vm.status = DOWN
    service.registry.remove(vm.id)                 # destroyed and forgotten
    assert scheduler.items[f"disksync/{vm.id}/vda"]() is DONE
    # The VM's item handed the repair on: it runs offline, from the leaf the
    # storage knew to the qcow2 chain of the VM's last leaf.
    assert scheduler.items[f"repair/{job_id}"]() is DONE
    assert log[-1] == ("offline sync", chain[-1], chain[-1])
    assert intents(tmp_path) == []


def test_an_intent_survives_an_agent_restart_with_the_vm_gone(tmp_path):
    service, vm, dom, storage, scheduler, log, chain = pending_with_repairs(tmp_path)
    job_id = DiskSyncJob.id_of(vm.id, "vda")
    pending = ImageRepair.from_dict(json.loads((tmp_path / "repairs" / f"{job_id}.json")
                                               .read_text()))
    assert pending.kind == SYNC and pending.walk_from == chain[-1] and pending.leaf == chain[-1]
    # Recovery found the VM running with its record: the record owns the repair.
    restarted = ImageRepairs(str(tmp_path), storage, scheduler)
    restarted.resume(owned={job_id}, running_vms={vm.id})
    assert restarted.has(job_id) and f"repair/{job_id}" not in scheduler.items
    # Found gone: the repair runs.
    restarted.resume(owned=set(), running_vms=set())
    assert scheduler.items[f"repair/{job_id}"]() is DONE
    assert log[-1][0] == "offline sync" and intents(tmp_path) == []
