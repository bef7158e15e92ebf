"""The agent dies while a merge runs; the merge finishes while it is down (its
libvirt event is lost); on restart the job completes from its persisted
record, with the storage up or (a real file-system outage) down."""
from __future__ import annotations

import os
import time
import uuid

import libvirt
import pytest

from conftest import chain_with_data, start_agent, storage_hidden, wait_for
from inotify import AccessCounter
from vmhost.storage import qemu_img
from vmhost.storage.metadata import Legality
from vmhost.testing import guestio
from vmhost.virt import domxml

MiB = 1 << 20


def chain_vm(env, workdir, data_mib: int = 16):
    return chain_with_data(env, workdir, data_mib)


def start_merge(env, vm, img, chain, base, top, **kw):
    return env.call("VM.merge", vmID=vm,
                    drive={"domainID": env.sd, "imageID": img, "volumeID": chain[-1]},
                    baseVolUUID=base, topVolUUID=top, **kw)


def libvirt_job_gone(env, vm) -> bool:
    return env.dom(vm).blockJobInfo("vda", 0) == {}


def libvirt_ready(env, vm) -> bool:
    mirror = domxml.live_disks(env.dom(vm).XMLDesc(0))["vda"].mirror
    return mirror is not None and mirror.ready


def pivot_behind_our_back(env, vm) -> libvirt.virDomain:
    """The whole chain of vda committed into its base and pivoted, by libvirt
    alone: the agent's definition and the storage metadata know nothing."""
    dom = env.dom(vm)
    dom.blockCommit("vda", None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
                    | libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE)
    wait_for(lambda: libvirt_ready(env, vm), 30, "ready")
    dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    return dom


def restart(env):
    env.agent = start_agent(env.agent.state_dir)
    return env.agent


def test_internal_merge_finishes_while_agent_is_down(env, workdir):
    vm, img, (base, mid, leaf), g = chain_vm(env, workdir)
    job = start_merge(env, vm, img, [base, mid, leaf], base, mid, bandwidth=4)
    env.agent.kill9()
    wait_for(lambda: libvirt_job_gone(env, vm), 60, "QEMU to finish the commit")
    assert env.live_chain(vm) == [base, leaf]       # QEMU merged; nobody heard the event
    restart(env)
    env.wait_job_gone(vm, job, 30)
    assert env.assert_four_views(vm, img) == [base, leaf]
    assert env.metadata(img, mid).legality.value == "ILLEGAL"
    g.assert_intact(img)


def test_active_merge_ready_while_agent_is_down_pivots_on_restart(env, workdir):
    vm, img, (base, mid, leaf), g = chain_vm(env, workdir, data_mib=24)
    job = start_merge(env, vm, img, [base, mid, leaf], base, leaf, bandwidth=2)
    env.agent.kill9()
    wait_for(lambda: libvirt_ready(env, vm), 60, "the active commit to be ready")
    assert env.live_chain(vm) == [base, mid, leaf]    # waiting for a pivot nobody does
    restart(env)
    env.wait_job_gone(vm, job, 30)
    assert env.assert_four_views(vm, img) == [base]
    assert env.metadata(img, base).voltype.value == "LEAF"
    assert {env.metadata(img, v).legality.value for v in (mid, leaf)} == {"ILLEGAL"}
    g.assert_intact(img)


@pytest.mark.parametrize("kind", ["internal", "active"])
def test_restart_with_storage_down_defers_repair_until_domain_valid(env, workdir, kind):
    vm, img, (base, mid, leaf), g = chain_vm(env, workdir)
    base_, top = (base, mid) if kind == "internal" else (mid, leaf)
    job = start_merge(env, vm, img, [base, mid, leaf], base_, top)
    env.agent.kill9()
    wait_for(lambda: (libvirt_job_gone if kind == "internal" else libvirt_ready)(env, vm), 60,
             "QEMU to finish its part")
    with storage_hidden(env.storage_root):
        started = time.monotonic()
        agent = restart(env)                                   # ready without storage
        ready_in = time.monotonic() - started
        pending = wait_for(lambda: [p for p in agent.client.call("Host.getPendingWork")
                                    if job in p["key"] and p["requires"]], 10, "pending work")
        assert env.sd in pending[0]["requires"] and "VALID" in pending[0]["requires"]
        info = env.vm_jobs(vm)[job]
        assert info["state"] == ("cleanup" if kind == "internal" else "ready")
        if kind == "internal":                                 # the VM view is synced at once
            assert env.agent_chain(vm, img) == [base, leaf]
        else:                                                  # no pivot without the marker
            assert env.live_chain(vm) == [base, mid, leaf]
        hidden_until = time.monotonic()
    assert ready_in < 15
    env.wait_job_gone(vm, job, 30)
    # Within one monitor interval (0.5 s) of the domain turning VALID, plus the work.
    assert time.monotonic() - hidden_until < 0.5 + 5
    expected = [base, leaf] if kind == "internal" else [base, mid]
    assert env.assert_four_views(vm, img) == expected
    assert env.call("Host.getPendingWork") == []
    g.assert_intact(img)


def test_recovery_without_jobs_makes_no_storage_access(env, workdir):
    vms = []
    for _ in range(3):
        img = str(uuid.uuid4())
        vm = env.create_vm([(img, env.create_volume(img))])
        env.snapshot(vm, img, env.agent_chain(vm, img)[-1])
        vms.append((vm, img))
    env.agent.kill9()
    image_dirs = [env.image_dir(img) for _, img in vms]
    counter = AccessCounter(image_dirs + [os.path.join(env.storage_root, env.sd, "images")])
    try:
        agent = restart(env)
        listed = agent.client.call("Host.getVMFullList")
        events = counter.drain()
    finally:
        counter.close()
    assert {v["vmId"] for v in listed} == {vm for vm, _ in vms}
    assert events == [], f"recovery touched the storage: {events[:5]}"


def test_synchronize_disks_after_chain_changed_behind_the_agent(env, workdir):
    vm, img, (base, mid, leaf), g = chain_vm(env, workdir, data_mib=8)
    dom = env.dom(vm)
    # An internal commit done with virsh: the agent's definition and the
    # storage metadata still show mid.
    top_path, base_path = (os.path.join(env.image_dir(img), v) for v in (mid, base))
    dom.blockCommit("vda", base_path, top_path, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE)
    wait_for(lambda: libvirt_job_gone(env, vm), 30, "virsh's commit")
    assert env.agent_chain(vm, img) == [base, mid, leaf]
    result = env.call("VM.synchronizeDisks", vmID=vm)
    assert result["vda"]["before"] == [base, mid, leaf]
    assert result["vda"]["after"] == [base, leaf]
    assert env.assert_four_views(vm, img) == [base, leaf]
    metas = {v: env.metadata(img, v) for v in (base, mid, leaf)}
    again = env.call("VM.synchronizeDisks", vmID=vm)
    assert again["vda"]["before"] == again["vda"]["after"] == [base, leaf]
    assert again["vda"]["storage"] == "in-sync"
    assert {v: env.metadata(img, v) for v in (base, mid, leaf)} == metas
    g.assert_intact(img)


def test_synchronize_disks_pending_while_domain_down(env, workdir):
    vm, img, (base, mid, leaf), g = chain_vm(env, workdir, data_mib=8)
    pivot_behind_our_back(env, vm)
    assert env.live_chain(vm) == [base]
    with storage_hidden(env.storage_root):
        wait_for(lambda: env.call("Host.getStorageRepoStats")[env.sd]["valid"] is False, 10,
                 "the domain to be INVALID")
        with pytest.raises(Exception) as e:
            env.call("VM.synchronizeDisks", vmID=vm)
        assert e.value.code == 379 and env.sd in e.value.message
        assert env.agent_chain(vm, img) == [base]            # the VM view is synced anyway
        assert any(f"disksync/{vm}/vda" == p["key"] for p in env.call("Host.getPendingWork"))
    wait_for(lambda: not env.call("Host.getPendingWork"), 15, "the repair to run")
    assert env.assert_four_views(vm, img) == [base]
    assert env.metadata(img, leaf).legality.value == "ILLEGAL"   # case 1: the old leaf
    g.assert_intact(img)


@pytest.mark.parametrize("gone", ["destroyed", "gone at restart"])
def test_a_pending_storage_repair_outlives_its_vm(env, workdir, gone):
    """VM.synchronizeDisks while the domain is unreachable leaves the storage
    half pending; the VM then goes (VM.destroy, or QEMU gone while the agent
    was down): the repair is not dropped, it runs offline once the domain is
    back, and the metadata says what QEMU ran."""
    vm, img, (base, mid, leaf), g = chain_vm(env, workdir, data_mib=8)
    dom = pivot_behind_our_back(env, vm)
    assert env.live_chain(vm) == [base]
    guestio.qemu_io(dom, "vda", "flush")
    base_path = os.path.join(env.image_dir(img), base)
    with storage_hidden(env.storage_root):
        wait_for(lambda: env.call("Host.getStorageRepoStats")[env.sd]["valid"] is False, 10,
                 "the domain to be INVALID")
        with pytest.raises(Exception) as e:
            env.call("VM.synchronizeDisks", vmID=vm)
        assert e.value.code == 379
        if gone == "destroyed":
            env.call("VM.destroy", vmID=vm)
        else:
            env.agent.kill9()
            dom.destroy()
            restart(env)
            wait_for(lambda: env.call("Host.getVMList") == [], 30, "recovery without the VM")
        # The VM's item hands its repair on (at the VM's stop event, or at
        # start-up): the image repair waits for the domain instead.
        def kinds():
            return sorted(p["key"].split("/")[0] for p in env.call("Host.getPendingWork")
                          if p["key"].startswith(("repair/", "disksync/")))
        wait_for(lambda: kinds() == ["repair"], 10, "the repair to be handed on")
    wait_for(lambda: not env.call("Host.getPendingWork"), 30, "the offline repair to run")
    # As the running VM's own repair would have left it (case 1: the old leaf
    # is the pivot's marker), so no VM starts on the volume the guest left.
    assert env.metadata(img, leaf).legality.value == "ILLEGAL"
    assert env.metadata(img, base).legality.value == "LEGAL"
    assert env.metadata(img, mid).legality.value == "ILLEGAL"
    assert qemu_img.compare(g.reference, base_path), "a guest write is missing from the base"


def test_job_record_from_another_host_is_resolved(env, workdir):
    """A VM arrives with a VDSM-format (v1) job record whose merge already
    happened elsewhere: synchronizeDisks brings every view into agreement."""
    vm, img, (base, mid, leaf), g = chain_vm(env, workdir, data_mib=8)
    env.agent.kill9()
    dom = env.dom(vm)
    top_path, base_path = (os.path.join(env.image_dir(img), v) for v in (mid, base))
    dom.blockCommit("vda", base_path, top_path, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE)
    wait_for(lambda: libvirt_job_gone(env, vm), 30, "the commit")
    import json
    md = json.loads(domxml.read_metadata(dom.XMLDesc(0)))
    job = str(uuid.uuid4())
    md["jobs"] = {job: {"id": job, "drive": "vda", "disk": {"domainID": env.sd, "imageID": img,
                  "volumeID": leaf, "poolID": str(uuid.uuid4())}, "base": base, "top": mid,
                  "bandwidth": 0, "state": "COMMIT", "extend": None, "pivot": None}}
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    f"<vm>{domxml.escape_text(json.dumps(md))}</vm>", domxml.METADATA_KEY,
                    domxml.METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    restart(env)
    env.call("VM.synchronizeDisks", vmID=vm)
    env.wait_job_gone(vm, job, 30)
    assert env.assert_four_views(vm, img) == [base, leaf]
    assert env.metadata(img, mid).legality.value == "ILLEGAL"
    assert [h["state"] for h in env.call("Host.getJobHistory") if h["id"] == job] == ["DONE"]
    g.assert_intact(img)


def test_reconcile_volume_chain_drops_illegal_leaf_after_pivot(env, workdir):
    vm, img, (base, mid, leaf), g = chain_vm(env, workdir, data_mib=8)
    g.write(0x44, 8 * MiB, MiB)                   # the leaf overwrites some of mid's data
    dom = env.dom(vm)
    # The agent marked the volumes above the base ILLEGAL (storage case 1) and
    # QEMU pivoted to the base; then the VM died before anyone synced anything.
    for vol in (mid, leaf):
        data = env.metadata(img, vol).replace(legality=Legality.ILLEGAL).dump()
        with open(os.path.join(env.image_dir(img), vol + ".meta"), "wb") as f:
            f.write(data)
    dom.blockCommit("vda", None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
                    | libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE)
    wait_for(lambda: libvirt_ready(env, vm), 30, "ready")
    dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    g.assert_intact(img)
    dom.destroy()
    wait_for(lambda: env.call("VM.getStats", vmID=vm)[0]["status"] == "Down", 10, "Down")
    env.call("VM.destroy", vmID=vm)
    with pytest.raises(Exception) as e:            # the ILLEGAL leaf cannot be started
        env.create_vm([(img, leaf)])
    assert e.value.code == 227
    chain = env.call("Image.reconcileVolumeChain", storagedomainID=env.sd, imageID=img,
                     leafVolID=leaf)
    assert chain == [base]
    assert env.call("Image.reconcileVolumeChain", storagedomainID=env.sd, imageID=img,
                    leafVolID=leaf) == [base]     # idempotent
    # The engine deletes the dropped volumes and starts the VM on the base.
    for vol in (leaf, mid):
        env.call("Volume.delete", storagedomainID=env.sd, imageID=img, volumeID=vol)
    assert env.metadata(img, base).voltype.value == "LEAF"
    g.vm = env.create_vm([(img, base)])
    g.assert_intact(img)
