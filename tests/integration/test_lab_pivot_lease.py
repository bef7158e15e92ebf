"""A VM paused for its pivot keeps its image to its host.

libvirt's sanlock driver gives a VM's leases up while the VM is paused, and an
active merge pauses the VM for the pivot until the pivot marker is written.
The agent holds the image's lease itself in that window (vmhost.virt.merge,
_step_pivot), so another host can neither change the image's metadata nor
start the VM meanwhile.

host1's agent is frozen (failpoint `merge.pivot.after:1:stop`) right after the
pivot, before the marker: the VM is paused, QEMU holds no lease, the agent holds
the image's. host2's Image.reconcileVolumeChain and VM.create are refused (651)
and nothing on disk changes. The agent goes on: the merge completes on host1,
the views agree, the guest data reads back. Last, what keeps a crashed agent from
blocking the image for ever: sanlock releases the lease of a process that died
(checked with a process of host1 holding a lease, then killed).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import libvirt
import pytest

from conftest import ROOT, wait_for
from labutil import (MiB, agent_pid, boot_with_failpoint, chain_views,  # noqa: F401
                     create_volume, file_digests, lab_dir, lab_up,  # lab_dir: fixture
                     shared_domain, stopped, vm_params)
from vmhost.client import Client, RpcError
from vmhost.lab.lab import Lab
from vmhost.testing import guestio

POINT = "merge.pivot.after"


def _refused(c: Client, verb: str, **params) -> RpcError:
    with pytest.raises(RpcError) as err:
        c.call(verb, **params)
    assert err.value.code == 651 and "held by another host" in err.value.message, err.value
    return err.value


def test_a_vm_paused_for_its_pivot_keeps_its_image_to_its_host(lab_dir, workdir):
    storage = os.path.join(workdir, "shared")
    hosts = lab_up(lab_dir, storage, 2)
    boot_with_failpoint(lab_dir, "host1", f"{POINT}:1:stop")
    sd = shared_domain(hosts, storage)
    h1, h2 = (Client(h["url"], timeout=60) for h in hosts)
    conn1 = libvirt.open(hosts[0]["libvirtUri"])
    img, vm = str(uuid.uuid4()), str(uuid.uuid4())
    img_dir = os.path.join(storage, sd, "images", img)
    agent = agent_pid(lab_dir, "host1")
    try:
        base = create_volume(h1, sd, img)
        params = vm_params(vm, sd, img, base)
        h1.call("VM.create", vmID=vm, vmParams=params)
        dom1 = conn1.lookupByUUIDString(vm)
        guestio.write(dom1, "vda", 0x11, 0, MiB)
        leaf = create_volume(h1, sd, img, parent=base)
        h1.call("VM.snapshot", vmID=vm, snapDrives=[
            {"domainID": sd, "imageID": img, "baseVolumeID": base, "volumeID": leaf}])
        guestio.write(dom1, "vda", 0x22, 8 * MiB, MiB)
        guestio.qemu_io(dom1, "vda", "flush")

        job = h1.call("VM.merge", vmID=vm, drive={"domainID": sd, "imageID": img,
                                                  "volumeID": leaf},
                      baseVolUUID=base, topVolUUID=leaf, jobUUID=str(uuid.uuid4()))
        wait_for(lambda: stopped(agent), 60, f"host1's agent to stop at {POINT}")
        assert dom1.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        # Pivoted, the marker not written: the leaf is still LEGAL, so only the
        # lease keeps host2 from taking the image.
        before = file_digests(img_dir)
        params["devices"][0]["volumeID"] = leaf          # the chain the engine knew
        with Client(hosts[1]["url"], timeout=60) as c2:
            _refused(c2, "Image.reconcileVolumeChain", storagedomainID=sd, imageID=img,
                     leafVolID=leaf)
            _refused(c2, "VM.create", vmID=vm, vmParams=params)
            assert c2.call("Host.getVMList") == []
        assert file_digests(img_dir) == before

        os.kill(agent, signal.SIGCONT)
        wait_for(lambda: job not in h1.call("VM.getStats", vmID=vm)[0]["vmJobs"], 60,
                 "the merge on host1 to finish")
        assert dom1.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert chain_views(h1, conn1, vm, img_dir) == [[base]] * 4
        guestio.verify(dom1, "vda", 0x11, 0, MiB)
        guestio.verify(dom1, "vda", 0x22, 8 * MiB, MiB)
        # QEMU holds the image's lease again: host2 is still refused.
        with Client(hosts[1]["url"], timeout=60) as c2:
            _refused(c2, "Image.reconcileVolumeChain", storagedomainID=sd, imageID=img,
                     leafVolID=base)

        _dead_process_lease_is_released(lab_dir, hosts, sd)
    finally:
        if stopped(agent):
            os.kill(agent, signal.SIGCONT)
        for c in (h1, h2):
            c.close()
        conn1.close()


HOLDER = """
import signal, sys
from vmhost.storage import sanlock_adapter as s
s.acquire(*sys.argv[1:4], int(sys.argv[4]))
print("held", flush=True)
signal.pause()          # holds the lease until the test kills it
"""
OWNERS = """
import json, sys
from vmhost.storage import sanlock_adapter as s
print(json.dumps(s.lease_owners(*sys.argv[1:4], int(sys.argv[4]))))
"""


def _on_host(lab_dir: str, host: str, script: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*Lab(lab_dir).enter_argv(host), sys.executable, "-c", script,
                             *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT}, **kw)


def _dead_process_lease_is_released(lab_dir: str, hosts: list[dict], sd: str) -> None:
    """A process of host1 holds a lease and dies (SIGKILL): host1's sanlock daemon
    releases the lease at once, long before a dead host's lease would expire."""
    lease = str(uuid.uuid4())
    with Client(hosts[1]["url"], timeout=60) as c2:
        info = c2.call("Lease.create", lease={"sd_id": sd, "lease_id": lease})
    where = (sd, lease, info["path"], str(info["offset"]))
    holder = _on_host(lab_dir, "host1", HOLDER, *where)
    try:
        assert holder.stdout.readline() == "held\n"
        assert _owners(lab_dir, where) == [hosts[0]["hostId"]]
        # nsenter forked the holder inside host1's pid namespace: kill that process.
        pids = [pid for pid in Lab(lab_dir).pids("host1") if lease in _cmdline(pid)]
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    wait_for(lambda: not _owners(lab_dir, where), 30,
             "host1's sanlock to release the lease of the dead process")
    assert time.monotonic() - killed < 10     # not a lease expiry (a minute and more)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _owners(lab_dir: str, where: tuple[str, ...]) -> list[int]:
    """Host ids holding the lease, as host2's sanlock reads it from the storage."""
    proc = _on_host(lab_dir, "host2", OWNERS, *where)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out)
