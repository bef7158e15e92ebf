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

from conftest import wait_for
from labutil import (MiB, chain_views, create_volume, engine_start, lab_cli,  # noqa: F401
                     lab_dir, lab_up, shared_domain, vm_params)             # lab_dir: fixture
from vmhost.client import Client
from vmhost.testing import guestio


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
        params = vm_params(vm, sd, img, base)
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
        assert engine_start(hosts[1]["url"], vm, params, sd, img).path == "create"
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
