"""Snapshot and disk sync as job kinds (vmhost.jobs): their records, the
snapshot's write-ahead record, and recovery reading definitions written
before they were jobs (`pendingSync`, `storageSync`) and resuming their work
(fakes of test_vm_edges: a fake libvirt domain whose metadata is kept)."""
from __future__ import annotations

import json

import pytest

from test_merge import IMG, SD, U
from test_vm_edges import SnapDomain, svc  # noqa: F401  (the fixture)
from vmhost.jobs.report import state_counts
from vmhost.scheduler import DONE
from vmhost.virt import domread
from vmhost.virt.disksync import DiskSyncJob, DiskSyncState
from vmhost.virt.recovery import VmRecovery
from vmhost.virt.snapshot import SnapshotJob, SnapshotState
from vmhost.virt.vm import Vm
from vmhost.virt.vmdef import VmDefinition

HOST = "host-a"


class KeptDomain(SnapDomain):
    """Keeps the metadata it is given (and gives it back), and switches QEMU
    to `switch_to` on a snapshot call that succeeds."""

    def __init__(self, log, chain, uuid):
        super().__init__(log, chain)
        self.uuid = uuid
        self.element = ""
        self.at_snapshot = None      # the metadata libvirt had when the call came

    def UUIDString(self):
        return self.uuid

    def setMetadata(self, kind, element, key, uri, flags=0):
        super().setMetadata()
        self.element = element

    def metadata(self, kind, uri, flags=0):
        return self.element

    def snapshotCreateXML(self, xml, flags):
        self.at_snapshot = self.definition()
        self.chain.append(self.switch_to)

    def definition(self) -> dict:
        return json.loads(domread.metadata_payload(self.element))


class KeptConn:
    def __init__(self, dom):
        self.dom = dom

    def lookupByUUIDString(self, uuid):
        return self.dom

    def listAllDomains(self, flags=0):
        return [self.dom]


def old_definition(vm_id: str, chain: list[str], **fields) -> str:
    """A definition as the agent wrote it before snapshot and disk sync were jobs."""
    return json.dumps({
        "version": 1, "vmId": vm_id, "vmName": "t", "memSize": 64,
        "resumeBehavior": "auto_resume", "hostId": HOST, "jobs": {},
        "pendingSync": [], "storageSync": {},
        "drives": [{"name": "vda", "domainID": SD, "imageID": IMG, "format": "qcow2",
                    "volumeChain": [{"domainID": SD, "imageID": IMG, "volumeID": v,
                                     "path": f"/sd/{SD}/images/{IMG}/{v}"} for v in chain]}],
        **fields})


def recover(service, dom, payload: str) -> Vm:
    """Start-up recovery of one domain whose metadata is `payload`."""
    dom.element = f"<vm>{payload}</vm>"
    service.registry.remove(dom.uuid)      # the agent restarted: it knows no VM
    events: list = []
    recovery = VmRecovery(service.registry, lambda: KeptConn(dom), service.merger,
                          service.disksync, events.append, HOST)
    assert recovery.recover() == 1, events
    return service.registry.get(dom.uuid)


@pytest.fixture
def world(svc):  # noqa: F811
    service, vm, _, storage, scheduler, log, chain = svc
    dom = KeptDomain(log, chain, vm.id)
    service._conn = lambda: KeptConn(dom)
    return service, vm, dom, storage, scheduler, log, chain


def test_the_records_round_trip_and_name_their_kind():
    snap = SnapshotJob.new(["vda", "vdb"])
    rec = snap.to_record()
    assert rec == {"version": 1, "kind": "snapshot", "id": snap.id, "drives": ["vda", "vdb"],
                   "state": "SWITCHING"}
    assert SnapshotJob.from_record(rec) == snap and snap.job_state is SnapshotState.SWITCHING
    leaf, vm_id = U(), U()
    sync = DiskSyncJob.for_drive(vm_id, "vda", leaf)
    assert sync.id == DiskSyncJob.id_of(vm_id, "vda") != DiskSyncJob.id_of(vm_id, "vdb")
    assert DiskSyncJob.from_record(sync.to_record()) == sync
    assert sync.job_state is DiskSyncState.PENDING
    with pytest.raises(ValueError, match="not a disksync job record"):
        DiskSyncJob.from_record(rec)
    with pytest.raises(ValueError, match="drive names"):
        SnapshotJob.from_record({**rec, "drives": "vda"})
    with pytest.raises(Exception, match="leaf must be a UUID"):
        DiskSyncJob.from_record({**sync.to_record(), "leaf": "../x"})


def test_old_fields_are_read_as_legacy_and_the_new_format_is_written():
    leaf = U()
    d = VmDefinition.from_json(old_definition(U(), [leaf], pendingSync=["vda"],
                                              storageSync={"vda": leaf}))
    assert d.legacy == {"pendingSync": ["vda"], "storageSync": {"vda": leaf}}
    written = json.loads(d.to_json())
    assert "pendingSync" not in written and "storageSync" not in written
    assert written["agentJobs"] == {}
    assert VmDefinition.from_json(old_definition(U(), [leaf])).legacy == {}
    assert SnapshotJob.from_legacy({}) == [] and DiskSyncJob.from_legacy(U(), {}) == []


def test_a_snapshot_is_written_ahead_as_a_job_and_removed_once_read_back(world):
    service, vm, dom, storage, scheduler, log, chain = world
    new = U()
    dom.switch_to = new
    service.snapshot(vm.id, [{"domainID": SD, "imageID": IMG, "baseVolumeID": chain[-1],
                              "volumeID": new}])
    (rec,) = dom.at_snapshot["agentJobs"].values()       # persisted before the call
    assert rec["kind"] == "snapshot" and rec["drives"] == ["vda"]
    assert rec["state"] == "SWITCHING"
    assert dom.definition()["agentJobs"] == {} and vm.definition.agent_jobs == {}
    assert vm.definition.drives[0].volume_ids() == chain + [new]
    assert state_counts(vm.definition.jobs.values()) == {}    # never a vmJobs entry


@pytest.mark.parametrize("old", [True, False], ids=["pendingSync", "snapshot-record"])
def test_a_crash_mid_snapshot_is_resolved_from_the_live_xml(world, old):
    service, vm, dom, storage, scheduler, log, chain = world
    new = U()
    dom.chain.append(new)        # libvirt switched; the agent died before re-reading
    if old:
        payload = old_definition(vm.id, chain, pendingSync=["vda"])
    else:
        snap = SnapshotJob.new(["vda"])
        payload = old_definition(vm.id, chain, agentJobs={snap.id: snap.to_record()})
    recovered = recover(service, dom, payload)
    assert recovered.definition.drives[0].volume_ids() == chain + [new]
    assert recovered.definition.agent_jobs == {} and recovered.recovery_error == ""
    stored = dom.definition()                 # persisted in the new format
    assert stored["agentJobs"] == {} and "pendingSync" not in stored
    assert [v["volumeID"] for v in stored["drives"][0]["volumeChain"]] == chain + [new]


def test_an_old_storage_sync_is_resumed_as_a_disk_sync_job(world):
    service, vm, dom, storage, scheduler, log, chain = world
    recovered = recover(service, dom, old_definition(vm.id, chain,
                                                     storageSync={"vda": chain[0]}))
    assert service.disksync.pending(recovered) == ["vda"]
    (job,) = service.disksync.store.readable(recovered)
    assert (job.drive, job.leaf) == ("vda", chain[0])
    assert scheduler.items[f"disksync/{vm.id}/vda"]() is DONE
    assert log[-1] == ("sync", chain[0], chain)
    assert service.disksync.pending(recovered) == []
    stored = dom.definition()
    assert stored["agentJobs"] == {} and "storageSync" not in stored


def test_a_pending_disk_sync_record_survives_a_restart_and_keeps_its_first_leaf(world):
    service, vm, dom, storage, scheduler, log, chain = world
    storage.domain_valid = lambda sd: False
    for _ in range(2):       # a second request keeps the first one's record
        with pytest.raises(Exception, match="is pending"):
            service.synchronize_disks(vm.id)
    stored = dom.definition()["agentJobs"]
    assert list(stored) == [DiskSyncJob.id_of(vm.id, "vda")]
    assert stored[DiskSyncJob.id_of(vm.id, "vda")]["leaf"] == chain[-1]
    scheduler.items.clear()
    storage.domain_valid = lambda sd: True
    recovered = recover(service, dom, domread.metadata_payload(dom.element))
    assert scheduler.items[f"disksync/{vm.id}/vda"]() is DONE
    assert service.disksync.pending(recovered) == [] and log[-1] == ("sync", chain[-1], chain)


def test_an_unreadable_agent_job_record_is_reported_and_kept(world):
    service, vm, dom, storage, scheduler, log, chain = world
    bad = U()
    recovered = recover(service, dom, old_definition(
        vm.id, chain, agentJobs={bad: {"version": 1, "kind": "teleport", "id": bad}}))
    assert f"job {bad}: ValueError: unknown job kind 'teleport'" in recovered.recovery_error
    assert bad in recovered.definition.agent_jobs
    assert service.disksync.pending(recovered) == []


def test_a_snapshot_whose_drives_cannot_be_read_back_keeps_its_record(svc):  # noqa: F811
    service, vm, dom, storage, scheduler, log, chain = svc
    new = U()
    dom.switch_to = new             # QEMU switches, then the connection dies
    with pytest.raises(Exception, match="End of file"):
        service.snapshot(vm.id, [{"domainID": SD, "imageID": IMG, "baseVolumeID": chain[-1],
                                  "volumeID": new}])
    (job,) = service.snapshots.readable(vm)
    assert job.drives == ["vda"] and vm.stale_drives == {"vda"}
    dom.dead = False                # the scheduled re-read resolves it
    assert scheduler.items[f"resync/{vm.id}"]() is DONE
    assert service.snapshots.readable(vm) == [] and vm.definition.agent_jobs == {}
    assert vm.definition.drives[0].volume_ids() == chain + [new]
