"""The seed's scenario: a host dies during a live merge; the engine restarts the VM
on another host of the lab and VM.synchronizeDisks makes the views agree.

host1 runs a VM whose disk is base <- mid <- leaf on a shared (posixfs) domain,
with guest data in every layer. A merge starts (internal: base..mid; active:
mid..leaf; with a bandwidth limit, so the commit takes seconds); host1's agent
dies at a failpoint of it (its QEMU runs on), then host1 loses power. The
engine's path on host2 (labutil.engine_start): VM.create with the leaf it knew,
retried while host1's lease lives (651); if the leaf is ILLEGAL (227, the pivot
marker), Image.reconcileVolumeChain and a create on the leaf it returns; no
block job in vmJobs; VM.synchronizeDisks; Host.getVMFullList.

Then: the four views of the chain agree, every acknowledged guest write reads
back, no volume of the chain is ILLEGAL, a new merge on host2 succeeds. While
host1's QEMU still ran, host2's VM.create and Image.reconcileVolumeChain were
refused and no metadata changed; host1, booted again, has no such VM and
writes nothing to the image.

A VM paused for a pivot: libvirt's sanlock driver releases QEMU's leases on
pause, and host1's agent holds the image's lease itself until the pivot marker
is written (test_lab_pivot_lease.py); an agent that dies loses it (sanlock
releases a dead process's leases). So at those points host2 is not asked while
host1's QEMU lives, and it starts the VM right after the power cut, without
waiting for lease expiry. Remaining gap (not asserted here): while host1's
agent is dead and its QEMU paused, host2's Image.reconcileVolumeChain is
accepted (before the marker it changes nothing), and its VM.create is stopped
only by QEMU's own image locking (error 100, not 651).
"""
from __future__ import annotations

import os
import time
import uuid

import libvirt
import pytest

from conftest import wait_for
from labutil import (MiB, boot_with_failpoint, chain_views, create_volume,  # noqa: F401
                     engine_start, file_digests, lab_cli, lab_dir, lab_up,  # lab_dir: fixture
                     read_metadata, shared_domain, vm_params, wait_acquired)
from scenario import record
from vmhost.client import Client, RpcError, TransportError
from vmhost.testing import guestio
from vmhost.testing.fleet import answers

BANDWIDTH = 1          # MiB/s: the commit of 4 MiB takes seconds
# (point, kind): make test runs the first internal and the first active case
# (both wait for real lease expiry); make faults runs them all.
CASES = [
    ("merge.cleanup.vm_synced", "internal"),     # internal merge done, metadata not synced
    ("merge.save.PIVOT.before", "active"),       # READY
    ("merge.save.STARTING.after", "internal"),   # before blockCommit
    ("merge.save.STARTING.after", "active"),
    ("merge.save.COMMIT.after", "internal"),     # mid-commit
    ("merge.save.COMMIT.after", "active"),
    ("merge.pivot.after", "active"),             # pivoted, not cleaned up
    ("merge.cleanup.storage_sync.after", "internal"),    # mid-cleanup
    ("merge.cleanup.storage_sync.after", "active"),
]
PARAMS = [pytest.param(p, k, id=f"{k}-{p}", marks=() if i < 2 else pytest.mark.faults)
          for i, (p, k) in enumerate(CASES)]


def _write(dom, writes: list, pattern: int, offset: int, length: int) -> None:
    guestio.write(dom, "vda", pattern, offset, length)
    writes.append((pattern, offset, length))


def _refused_while_qemu_lives(url: str, vm: str, params: dict, sd: str, img: str,
                              img_dir: str) -> None:
    """host1's agent is dead, its QEMU runs (holding the lease): host2 changes nothing."""
    before = file_digests(img_dir, ".meta")
    with Client(url, timeout=60) as c:
        with pytest.raises(RpcError) as create:
            c.call("VM.create", vmID=vm, vmParams=params)
        assert create.value.code == 651, create.value
        with pytest.raises(RpcError) as reconcile:
            c.call("Image.reconcileVolumeChain", storagedomainID=sd, imageID=img,
                   leafVolID=params["devices"][0]["volumeID"])
        assert reconcile.value.code in (651, 203), reconcile.value
        assert c.call("Host.getVMList") == []
    assert file_digests(img_dir, ".meta") == before


@pytest.mark.parametrize("point,kind", PARAMS)
def test_host_dies_during_merge_engine_restarts_vm_elsewhere(lab_dir, workdir, point, kind):
    storage = os.path.join(workdir, "shared")
    hosts = lab_up(lab_dir, storage, 2)
    boot_with_failpoint(lab_dir, "host1", point)   # before joining: no lease to expire
    sd = shared_domain(hosts, storage)
    h1, h2 = (Client(h["url"], timeout=60) for h in hosts)
    conn1, conn2 = (libvirt.open(h["libvirtUri"]) for h in hosts)
    img, vm = str(uuid.uuid4()), str(uuid.uuid4())
    img_dir = os.path.join(storage, sd, "images", img)
    writes: list[tuple[int, int, int]] = []
    try:
        base = create_volume(h1, sd, img)
        params = vm_params(vm, sd, img, base)
        h1.call("VM.create", vmID=vm, vmParams=params)
        dom1 = conn1.lookupByUUIDString(vm)
        _write(dom1, writes, 0x11, 0, MiB)
        chain = [base]
        for pattern, offset in ((0x22, 8 * MiB), (0x33, 24 * MiB)):
            chain.append(create_volume(h1, sd, img, parent=chain[-1]))
            h1.call("VM.snapshot", vmID=vm, snapDrives=[
                {"domainID": sd, "imageID": img, "baseVolumeID": chain[-2],
                 "volumeID": chain[-1]}])
            _write(dom1, writes, pattern, offset, 4 * MiB)
        guestio.qemu_io(dom1, "vda", "flush")
        base, mid, leaf = chain
        merge_base, top = (base, mid) if kind == "internal" else (mid, leaf)

        try:
            h1.call("VM.merge", vmID=vm, drive={"domainID": sd, "imageID": img,
                                                "volumeID": leaf},
                    baseVolUUID=merge_base, topVolUUID=top, bandwidth=BANDWIDTH,
                    jobUUID=str(uuid.uuid4()))
        except TransportError:
            pass                       # the agent died inside VM.merge
        wait_for(lambda: not answers(hosts[0]["url"]), 60, f"host1's agent to die at {point}")
        running = dom1.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert running or kind == "active", "only a pivot pauses the VM"
        if running:
            # Acknowledged during the merge, with no agent on host1.
            _write(dom1, writes, 0x44, 40 * MiB, MiB)
            guestio.qemu_io(dom1, "vda", "flush")
            params["devices"][0]["volumeID"] = leaf
            _refused_while_qemu_lives(hosts[1]["url"], vm, params, sd, img, img_dir)

        lab_cli(lab_dir, "poweroff", "host1")
        cut = time.monotonic()
        params["devices"][0]["volumeID"] = leaf       # the chain the engine knew
        path = engine_start(hosts[1]["url"], vm, params, sd, img).path
        waited = time.monotonic() - cut
        if running:
            assert 60 <= waited <= 100, f"restarted after {waited:.0f}s"
        assert not h2.call("VM.getStats", vmID=vm)[0]["vmJobs"]
        h2.call("VM.synchronizeDisks", vmID=vm)
        dom2 = conn2.lookupByUUIDString(vm)

        views = chain_views(h2, conn2, vm, img_dir)
        live = views[0]
        assert views == [live] * 4, views
        merged = [base, leaf] if kind == "internal" else [base, mid]
        assert live in (chain, merged), f"neither untouched nor merged: {live}"
        for pattern, offset, length in writes:
            guestio.verify(dom2, "vda", pattern, offset, length)
        assert [read_metadata(img_dir, v).legality.value for v in live] == ["LEGAL"] * len(live)

        # host2 owns the image now: a new merge there.
        job = h2.call("VM.merge", vmID=vm, drive={"domainID": sd, "imageID": img,
                                                  "volumeID": live[-1]},
                      baseVolUUID=live[-2], topVolUUID=live[-1])
        wait_for(lambda: job not in h2.call("VM.getStats", vmID=vm)[0]["vmJobs"], 60,
                 "the merge on host2 to finish")
        assert chain_views(h2, conn2, vm, img_dir) == [live[:-1]] * 4
        for pattern, offset, length in writes:
            guestio.verify(dom2, "vda", pattern, offset, length)
        guestio.qemu_io(dom2, "vda", "flush")

        # host1 boots again: no such VM, and its pending repair of the image
        # (the merge's intent) is refused while host2 runs the VM.
        files = file_digests(img_dir)
        lab_cli(lab_dir, "boot", "host1")
        with Client(hosts[0]["url"], timeout=30) as c1:
            assert c1.call("Host.getVMList") == []
            wait_acquired(hosts[0]["url"], sd, 120)
            # The merge's intent survived the power cut: host1 tries the image
            # repair once it has joined the domain, and host2's lease refuses it.
            wait_for(lambda: any(img in w["description"] and "held by another host"
                                 in (w["reason"] or "") for w in c1.call("Host.getPendingWork")),
                     90, "host1's repair of the image to be refused by host2's lease")
            assert c1.call("Host.getVMList") == []
        assert file_digests(img_dir) == files
        record({"scenario": "fleet-failover", "point": point, "kind": kind, "outcome": path,
                "converged": True, "seconds": round(waited, 1), "final": "gone",
                "merged": live == merged, "data_ok": True, "leaks": 0})
    finally:
        for c in (h1, h2):
            c.close()
        for conn in (conn1, conn2):
            conn.close()
