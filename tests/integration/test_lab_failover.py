"""A host dies; the engine's path restarts its VM on another host of the lab.

host1 runs a VM whose disk is a two-layer chain on a shared (posixfs) domain, with
guest data in each layer. host1 loses power. host2's VM.create cannot start the VM
while the dead host's lease lives (sanlock's host_dead_seconds, 68 s for lab hosts:
it answers 651 meanwhile), then does; host2 sees the chain and the data, and merges
it. host1, booted again, knows no such VM. (The failover during a merge builds on
this.)"""
from __future__ import annotations

import os
import time
import uuid

import libvirt
import pytest

from conftest import VM_PREFIX, wait_for
from labutil import (lab_cli, lab_dir, lab_up, retry,  # noqa: F401 - lab_dir: fixture
                     shared_domain)
from vmhost.client import Client, RpcError
from vmhost.ids import BLANK_UUID
from vmhost.storage import qemu_img
from vmhost.storage.metadata import VolumeMetadata
from vmhost.testing import guestio
from vmhost.virt import domxml

MiB = 1 << 20


def create_volume(c: Client, sd: str, img: str, parent: str | None = None) -> str:
    vol = str(uuid.uuid4())
    c.call("Volume.create", storagedomainID=sd, imageID=img, volumeID=vol, size=64 * MiB,
           volFormat="COW", preallocate="SPARSE", diskType="DATA", desc="failover",
           srcImgUUID=img if parent else BLANK_UUID, srcVolUUID=parent or BLANK_UUID)
    return vol


def chain_views(c: Client, conn: libvirt.virConnect, vm: str, img_dir: str) -> list[list[str]]:
    """host's getVMFullList, its live XML, qemu-img and the metadata, each base first."""
    info = c.call("Host.getVMFullList", vmList=[vm])[0]
    agent = [v["volumeID"] for v in info["devices"][0]["volumeChain"]]
    live = [n.volume for n in domxml.live_disks(
        conn.lookupByUUIDString(vm).XMLDesc(0))["vda"].chain]
    qemu = [os.path.basename(i["filename"]) for i in reversed(
        qemu_img.info(os.path.join(img_dir, agent[-1]), backing_chain=True))]
    meta, vol = [], agent[-1]
    while vol != BLANK_UUID:
        meta.append(vol)
        with open(os.path.join(img_dir, vol + ".meta"), "rb") as f:
            vol = VolumeMetadata.parse(f.read()).parent
    return [agent, live, qemu, meta[::-1]]


def test_vm_restarts_on_another_host_once_the_dead_hosts_lease_expires(lab_dir, workdir):
    storage = os.path.join(workdir, "shared")
    hosts = lab_up(lab_dir, storage, 2)
    sd = shared_domain(hosts, storage)
    h1, h2 = (Client(h["url"], timeout=60) for h in hosts)
    conn1, conn2 = (libvirt.open(h["libvirtUri"]) for h in hosts)
    img, vm = str(uuid.uuid4()), str(uuid.uuid4())
    img_dir = os.path.join(storage, sd, "images", img)
    try:
        base = create_volume(h1, sd, img)
        params = {"vmName": VM_PREFIX + vm[:8], "memSize": 64, "devices": [
            {"device": "disk", "domainID": sd, "imageID": img, "volumeID": base}]}
        h1.call("VM.create", vmID=vm, vmParams=params)
        guestio.write(conn1.lookupByUUIDString(vm), "vda", 0x11, 0, MiB)
        top = create_volume(h1, sd, img, parent=base)
        h1.call("VM.snapshot", vmID=vm, snapDrives=[
            {"domainID": sd, "imageID": img, "baseVolumeID": base, "volumeID": top}])
        guestio.write(conn1.lookupByUUIDString(vm), "vda", 0x22, MiB, MiB)
        guestio.qemu_io(conn1.lookupByUUIDString(vm), "vda", "flush")

        lab_cli(lab_dir, "poweroff", "host1")
        cut = time.monotonic()
        params["devices"][0]["volumeID"] = top       # the chain the engine knew
        # Until the dead host's lease expires, host2 cannot start the VM: 651 at once.
        with Client(hosts[1]["url"], timeout=180) as patient:
            def started() -> bool:
                try:
                    patient.call("VM.create", vmID=vm, vmParams=params)
                    return True
                except RpcError as err:
                    assert err.code == 651 and "held by another host" in err.message, err
                    assert h2.call("Host.getVMList") == []      # a refusal changes nothing
                    return False
            retry(started, 150, "host2 to get the VM's lease")
        waited = time.monotonic() - cut
        assert 60 <= waited <= 100, f"restarted after {waited:.0f}s"

        dom = conn2.lookupByUUIDString(vm)
        guestio.verify(dom, "vda", 0x11, 0, MiB)
        guestio.verify(dom, "vda", 0x22, MiB, MiB)
        assert chain_views(h2, conn2, vm, img_dir) == [[base, top]] * 4

        # host2 owns the image now: a live merge there rewrites the shared metadata.
        job = h2.call("VM.merge", vmID=vm, drive={"domainID": sd, "imageID": img,
                                                  "volumeID": top},
                      baseVolUUID=base, topVolUUID=top)
        wait_for(lambda: job not in h2.call("VM.getStats", vmID=vm)[0]["vmJobs"], 60,
                 "the merge on host2 to finish")
        assert chain_views(h2, conn2, vm, img_dir) == [[base]] * 4
        guestio.verify(dom, "vda", 0x22, MiB, MiB)

        lab_cli(lab_dir, "boot", "host1")
        assert Client(hosts[0]["url"], timeout=30).call("Host.getVMList") == []
    finally:
        for c in (h1, h2):
            c.close()
        for conn in (conn1, conn2):
            conn.close()
