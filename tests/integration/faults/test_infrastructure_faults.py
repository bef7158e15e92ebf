"""libvirtd restarted mid-merge, storage unreachable during cleanup, and the
VM's QEMU killed mid-merge (then started again, as an engine would)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import libvirt
import pytest

from conftest import ROOT, storage_hidden, wait_for
from scenario import build, check_converged, check_no_leak, merge, record
from vmhost.testing import guestio

MiB = 1 << 20
pytestmark = pytest.mark.faults   # run by `make faults`, not `make test`


def libvirtd_pid() -> int:
    # This machine's libvirtd, by its pid file: `pgrep` would also find the
    # libvirtd of a `vmhost lab` host (another mount namespace).
    with open("/run/libvirtd.pid") as f:
        return int(f.read().strip())


def restart_libvirtd() -> None:
    pid = libvirtd_pid()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode,
             30, "libvirtd to exit")
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "start-libvirt.sh")], check=True)


@pytest.mark.parametrize("kind", ["internal", "active"])
def test_libvirtd_restart_mid_merge(env, workdir, kind):
    vm, img, chain, g = build(env, workdir, fill_mib=16)
    base, top = (chain[0], chain[2]) if kind == "internal" else (chain[1], chain[3])
    started = time.monotonic()
    job = merge(env, vm, img, chain, base, top, bandwidth=4)
    wait_for(lambda: int(env.vm_jobs(vm).get(job, {}).get("cur", "1")), 20, "progress")
    restart_libvirtd()
    env.conn = libvirt.open("qemu:///system")
    env.wait_job_gone(vm, job, 90)
    facts = check_converged(env, vm, img, chain, g, base, top, job)
    assert facts["merged"]
    record({"scenario": "libvirtd-restart", "point": "mid-merge", "kind": kind,
            "outcome": "restarted", "converged": True,
            "seconds": round(time.monotonic() - started, 3), **facts})


@pytest.mark.parametrize("kind", ["internal", "active"])
def test_storage_outage_during_cleanup(env, workdir, kind):
    vm, img, chain, g = build(env, workdir, fill_mib=16)
    base, top = (chain[0], chain[2]) if kind == "internal" else (chain[1], chain[3])
    job = merge(env, vm, img, chain, base, top, bandwidth=4)
    # QEMU keeps copying through its open files; everything the agent does on
    # storage from now on (mark ILLEGAL, cleanup) must wait for the domain.
    with storage_hidden(env.storage_root):
        wait_for(lambda: env.call("Host.getStorageRepoStats")[env.sd]["valid"] is False, 10,
                 "the domain to be INVALID")
        blocked = wait_for(lambda: [p for p in env.call("Host.getPendingWork")
                                    if job in p["key"] and p["requires"]], 60,
                           "the job to wait for the domain")
        assert env.sd in blocked[0]["requires"]
        assert env.vm_jobs(vm)[job]["state"] in ("cleanup", "ready")
        if kind == "active":
            assert env.live_chain(vm) == chain           # no pivot without the marker
        back = time.monotonic()
    env.wait_job_gone(vm, job, 30)
    seconds = round(time.monotonic() - back, 3)
    facts = check_converged(env, vm, img, chain, g, base, top, job)
    assert facts["merged"]
    record({"scenario": "storage-outage", "point": "cleanup", "kind": kind,
            "outcome": "blocked then resumed", "converged": True, "seconds": seconds, **facts})


def test_qemu_crash_mid_merge_then_restart_as_engine(env, workdir):
    vm, img, chain, g = build(env, workdir, fill_mib=16)
    guestio.qemu_io(env.dom(vm), "vda", "flush")      # what the guest wrote is durable
    base, top = chain[0], chain[2]
    job = merge(env, vm, img, chain, base, top, bandwidth=2)
    wait_for(lambda: int(env.vm_jobs(vm).get(job, {}).get("cur", "1")), 20, "progress")
    with open(f"/run/libvirt/qemu/{env.dom(vm).name()}.pid") as f:
        os.kill(int(f.read()), signal.SIGKILL)
    wait_for(lambda: env.call("VM.getStats", vmID=vm)[0]["status"] == "Down", 20, "Down")
    # The engine: destroy, reconcile the image offline, start the VM again.
    env.call("VM.destroy", vmID=vm)
    started = time.monotonic()
    live = env.call("Image.reconcileVolumeChain", storagedomainID=env.sd, imageID=img,
                    leafVolID=chain[-1])
    assert live == chain                                 # the commit did not finish
    assert check_no_leak(env, img, live) == []
    vm2 = env.create_vm([(img, live[-1])])
    g.vm = vm2
    result = env.call("VM.synchronizeDisks", vmID=vm2)
    assert result["vda"]["before"] == result["vda"]["after"] == live
    facts = check_converged(env, vm2, img, chain, g, base, top, job)
    record({"scenario": "qemu-crash", "point": "mid-merge", "kind": "internal",
            "outcome": "VM restarted", "converged": True,
            "seconds": round(time.monotonic() - started, 3), **facts})
