"""The EIO resume policy (vmhost.virt.eio) and the libvirt event handlers that
feed it (vmhost.virt.events), with the registry real and the rest faked: which
VMs a domain turning VALID acts on, when its pass is submitted, and how the
events set a VM's status. tests/integration/test_eio_resume.py runs the whole
story on real QEMU with a failing disk."""
from __future__ import annotations

import uuid

import libvirt
import pytest

from vmhost.virt.eio import EioResume, eio_domains
from vmhost.virt.events import VmEvents
from vmhost.virt.registry import VmRegistry
from vmhost.virt.vm import DOWN, PAUSED, UP, Vm
from vmhost.virt.vmdef import Drive, VmDefinition

SD1, SD2 = str(uuid.uuid4()), str(uuid.uuid4())


def make_vm(behavior: str = "auto_resume", domains=(SD1, SD2), status=PAUSED,
            pause_code="EIO") -> Vm:
    drives = [Drive(name=f"vd{chr(ord('a') + i)}", domain=sd, image=str(uuid.uuid4()), chain=[])
              for i, sd in enumerate(domains)]
    return Vm(VmDefinition(vm_id=str(uuid.uuid4()), name="t", mem_mib=64, drives=drives,
                           resume_behavior=behavior), status, pause_code)


class Control:
    """The VM service's cont/destroy, recorded."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def cont(self, vm_id):
        self.calls.append(("cont", vm_id))

    def destroy(self, vm_id):
        self.calls.append(("destroy", vm_id))


class Storage:
    def __init__(self, valid: dict[str, bool]):
        self.valid = valid

    def repo_stats(self):
        return {sd: {} for sd in self.valid}

    def domain_valid(self, sd):
        return self.valid[sd]


class Scheduler:
    def __init__(self):
        self.items: dict = {}

    def submit(self, key, description, fn, topics=(), delay=0.0):
        self.items[key] = fn


@pytest.fixture
def rig():
    registry, control = VmRegistry(), Control()
    storage, scheduler = Storage({SD1: True, SD2: False}), Scheduler()
    ready = [False]
    eio = EioResume(registry, control, storage, scheduler, ready=lambda: ready[0])
    return registry, control, storage, scheduler, ready, eio


def test_eio_domains_are_those_of_the_failing_disks_or_all_when_unknown():
    vm = make_vm()
    assert eio_domains(vm) == {SD1, SD2}            # recovered paused: not known
    vm.eio_aliases.add("virtio-disk1")
    assert eio_domains(vm) == {SD2}
    vm.eio_aliases = {"virtio-disk7", "ide0-0-0"}   # no such drive: all of them again
    assert eio_domains(vm) == {SD1, SD2}


def test_each_vm_paused_on_eio_follows_its_resume_behavior(rig):
    registry, control, storage, scheduler, ready, eio = rig
    vms = {b: make_vm(b) for b in ("auto_resume", "leave_paused", "kill")}
    other_disk = make_vm(domains=(SD2,))
    user_paused = make_vm(pause_code="NOERR")
    running = make_vm(status=UP, pause_code="NOERR")
    registry.add([*vms.values(), other_disk, user_paused, running])
    assert sorted(eio.resume_paused(SD1)) == sorted([vms["auto_resume"].id, vms["kill"].id])
    assert sorted(control.calls) == sorted([("cont", vms["auto_resume"].id),
                                            ("destroy", vms["kill"].id)])


def test_a_pass_stops_when_its_domain_fails_again(rig):
    registry, control, storage, scheduler, ready, eio = rig
    registry.add([make_vm()])
    storage.valid[SD1] = False
    assert eio.resume_paused(SD1) == [] and control.calls == []


def test_a_pass_is_submitted_only_once_recovery_is_done(rig):
    registry, control, storage, scheduler, ready, eio = rig
    vm = make_vm(domains=(SD1,))
    registry.add([vm])
    eio.on_domain_valid(SD1)
    assert scheduler.items == {}                    # the VMs are not known yet
    ready[0] = True
    eio.recovery_done()                             # SD1 is VALID, SD2 is not
    assert list(scheduler.items) == [f"resume-eio/{SD1}"]
    scheduler.items[f"resume-eio/{SD1}"]()
    assert control.calls == [("cont", vm.id)]


def test_lifecycle_and_io_error_events_set_the_status_and_are_published():
    registry, published = VmRegistry(), []
    events = VmEvents(registry, published.append)
    vm = make_vm(status=UP, pause_code="NOERR")
    registry.add([vm])
    events.on_io_error(vm.id, "virtio-disk0", "eio")
    events.on_lifecycle(vm.id, libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                        libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR)
    assert (vm.status, vm.pause_code, vm.eio_aliases) == (PAUSED, "EIO", {"virtio-disk0"})
    events.on_lifecycle(vm.id, libvirt.VIR_DOMAIN_EVENT_RESUMED, 0)
    assert (vm.status, vm.pause_code) == (UP, "NOERR")
    events.on_lifecycle(vm.id, libvirt.VIR_DOMAIN_EVENT_STOPPED,
                        libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED)
    assert (vm.status, vm.exit_message) == (DOWN, "crashed")
    assert [e["status"] for e in published] == [PAUSED, UP, DOWN]
    events.on_lifecycle(str(uuid.uuid4()), libvirt.VIR_DOMAIN_EVENT_STOPPED, 0)  # not ours
    assert len(published) == 3
