"""VM service edges against a fake libvirt (the merge fakes of test_merge):
a snapshot whose libvirt call fails after QEMU switched (finding 9), and
VM.synchronizeDisks on a drive a live job owns (finding 3)."""
from __future__ import annotations

import libvirt
import pytest

from test_merge import IMG, SD, FakeDomain, FakeScheduler, U
from vmhost import errors
from vmhost.refs import PreparedImage, PreparedLeaf, VolumeRef
from vmhost.virt.service import VmService
from vmhost.virt.vm import Vm
from vmhost.virt.vmdef import Drive, VmDefinition


class SnapDomain(FakeDomain):
    """snapshotCreateXML switches QEMU to the new leaf, then the connection dies."""

    def __init__(self, log, chain):
        super().__init__(log, chain)
        self.dead = False
        self.switch_to = None

    def XMLDesc(self, flags=0):
        if self.dead:
            raise libvirt.libvirtError("End of file while reading data: Input/output error")
        return super().XMLDesc(flags)

    def setMetadata(self, *args):
        if self.dead:
            raise libvirt.libvirtError("client socket is closed")

    def snapshotCreateXML(self, xml, flags):
        self.chain.append(self.switch_to)
        self.dead = True
        raise libvirt.libvirtError("End of file while reading data")


class Conn:
    def __init__(self, dom):
        self.dom = dom

    def lookupByUUIDString(self, uuid):
        return self.dom


class Storage:
    def __init__(self, log):
        self.log = log

    def prepare_image(self, sd, img, leaf, allow_illegal=False):
        chain = self.chain + ([leaf] if leaf not in self.chain else [])
        return PreparedImage(chain=[VolumeRef(sd, img, v, f"/sd/{SD}/images/{IMG}/{v}")
                                    for v in chain], format="qcow2")

    def prepare_leaf(self, sd, img, leaf):
        parent = self.chain[-1] if leaf not in self.chain else self.chain[self.chain.index(leaf) - 1]
        return PreparedLeaf(VolumeRef(sd, img, leaf, f"/sd/{SD}/images/{IMG}/{leaf}"), "qcow2",
                            parent)

    def volume_info(self, sd, img, vol):
        return {"voltype": "LEAF", "capacity": str(1 << 20)}

    def domain_valid(self, sd):
        return True

    def sync_volume_chain(self, sd, img, leaf, actual):
        self.log.append(("sync", leaf, list(actual)))
        return "in-sync"

    def repair_chain_sync(self, sd, img, walk_from, leaf):
        self.log.append(("offline sync", walk_from, leaf))
        return self.chain


@pytest.fixture
def svc():
    return make_svc()


def make_svc(repairs=None):
    """(service, vm, dom, storage, scheduler, log, chain); `repairs` takes
    the storage and scheduler: (storage, scheduler) -> Repairs."""
    log: list = []
    chain = [U(), U()]
    dom = SnapDomain(log, chain)
    storage = Storage(log)
    storage.chain = list(chain)
    scheduler = FakeScheduler()
    service = VmService(lambda: Conn(dom), storage, "qemu", scheduler,
                        repairs=repairs and repairs(storage, scheduler))
    vm = Vm(VmDefinition(vm_id=U(), name="t", mem_mib=64, drives=[Drive(
        name="vda", domain=SD, image=IMG,
        chain=[VolumeRef(SD, IMG, v, dom._path(v)) for v in chain])]))
    vm.jobs_known = True
    service.registry.add([vm])
    return service, vm, dom, storage, scheduler, log, chain


def test_finding9_failed_snapshot_with_a_dead_connection_refuses_deletes(svc):
    service, vm, dom, storage, scheduler, log, chain = svc
    new = U()
    dom.switch_to = new
    with pytest.raises(errors.SnapshotFailed):
        service.snapshot(vm.id, [{"domainID": SD, "imageID": IMG, "baseVolumeID": chain[-1],
                                  "volumeID": new}])
    # The definition is stale (QEMU writes `new`): no volume of the image may
    # be deleted until the chain is known again.
    assert vm.stale_drives == {"vda"}
    with pytest.raises(errors.VolumeIsBusy, match="not known to be current"):
        service.volume_in_use(SD, IMG, new)
    with pytest.raises(errors.SnapshotFailed, match="not known to be current"):
        service.snapshot(vm.id, [{"domainID": SD, "imageID": IMG, "baseVolumeID": chain[-1],
                                  "volumeID": U()}])
    # libvirt answers again: the scheduled re-read fixes the definition.
    dom.dead = False
    assert scheduler.items[f"resync/{vm.id}"]() is not None
    assert vm.stale_drives == set()
    assert vm.definition.drives[0].volume_ids() == chain + [new]
    assert service.volume_in_use(SD, IMG, new) is True


def test_finding3_synchronize_disks_skips_a_drive_with_a_live_job(svc):
    service, vm, dom, storage, scheduler, log, chain = svc
    job = service.merge(vm.id, {"domainID": SD, "imageID": IMG, "volumeID": chain[-1]},
                        base=chain[0], top=chain[1])
    result = service.synchronize_disks(vm.id)
    assert "live merge job" in result["vda"]["skipped"]
    assert not [e for e in log if e[0] == "sync"]      # only the job touches its storage
    assert service.disksync.pending(vm) == []
    assert job in vm.definition.jobs
