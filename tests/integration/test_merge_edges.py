"""Live merge at its edges, on real libvirt/QEMU (issue 10):

- finding 4: QEMU dies anywhere in the pivot window of an active merge with a
  bandwidth limit, after the guest wrote several MiB the mirror had not copied
  yet; the engine's path (reconcile, start the VM again, synchronizeDisks)
  keeps every write the guest saw completed;
- finding 2: the VM is destroyed while the job's cleanup waits for its domain;
  once the domain is VALID the metadata is repaired, and no volume holding
  live data is left ILLEGAL; the repair survives an agent restart;
- the edge failpoints (a failed pivot, the VM going down, a snapshot) converge.
"""
from __future__ import annotations

import os
import signal
import uuid

import pytest

from conftest import start_agent, storage_hidden, wait_for
from scenario import build, check_no_leak, merge, record
from vmhost.failpoints import ENV
from vmhost.testing import guestio
from vmhost.virt import domxml

MiB = 1 << 20


def report(scenario: str, point: str, kind: str, outcome: str, chain: list[str], merged: bool,
           final: str = "gone") -> None:
    """A row for `make faults` (reports/faults.md); reached only once every check passed."""
    record({"scenario": scenario, "point": point, "kind": kind, "outcome": outcome,
            "converged": True, "seconds": 0, "final": final, "merged": merged,
            "data_ok": True, "leaks": 0, "chain": len(chain)})


def kill_qemu(env, vm) -> None:
    with open(f"/run/libvirt/qemu/{env.dom(vm).name()}.pid") as f:
        os.kill(int(f.read()), signal.SIGKILL)


def mirror_ready(env, vm) -> bool:
    mirror = domxml.live_disks(env.dom(vm).XMLDesc(0))["vda"].mirror
    return mirror is not None and mirror.ready


def paused(env, vm) -> bool:
    import libvirt
    return env.dom(vm).state()[0] == libvirt.VIR_DOMAIN_PAUSED


def engine_restarts_vm(env, vm, img, leaf, g) -> str:
    """What the engine does after a VM died mid-merge: reconcile the image
    from the leaf it knew, start the VM on the leaf that comes back, see no
    job, synchronize the disks. Returns the new VM's id."""
    chain = env.call("Image.reconcileVolumeChain", storagedomainID=env.sd, imageID=img,
                     leafVolID=leaf)
    vm2 = env.create_vm([(img, chain[-1])])
    g.vm = vm2
    assert env.vm_jobs(vm2) == {}
    result = env.call("VM.synchronizeDisks", vmID=vm2)
    assert result["vda"]["after"] == chain
    assert env.assert_four_views(vm2, img) == chain
    assert check_no_leak(env, img, chain) == []
    return vm2


# (failpoint, the guest can write while the agent is dead there)
PIVOT_WINDOW = [
    ("merge.save.PIVOT.before", True),     # READY: mirror ready, top LEGAL, VM runs
    ("merge.pivot.paused", False),         # paused for the pivot, no pivot yet
    ("merge.pivot.after", False),          # pivoted, paused, marker not written
    ("merge.cleanup.storage_sync.after", False),   # marker written, still paused
    ("merge.cleanup.resumed", True),       # marker written, VM runs on the base
]


@pytest.mark.parametrize("point,guest_runs", PIVOT_WINDOW,
                         ids=[p for p, _ in PIVOT_WINDOW])
def test_finding4_qemu_dies_in_the_pivot_window_no_acknowledged_write_lost(
        env, workdir, point, guest_runs):
    vm, img, chain, g = build(env, workdir)
    base, top = chain[2], chain[3]
    env.agent.kill9()
    env.agent = start_agent(env.agent.state_dir, env={ENV: point})
    proc = env.agent.proc
    merge(env, vm, img, chain, base, top, bandwidth=1)
    wait_for(lambda: proc.poll() is not None, 60, f"the agent to die at {point}")
    marker = env.metadata(img, top).legality.value
    if guest_runs:
        assert not paused(env, vm)
        if point == "merge.save.PIVOT.before":
            # The pivot marker is never written while the guest can write to the top.
            assert marker == "LEGAL" and mirror_ready(env, vm)
        # Several MiB the 1 MiB/s mirror has not copied to the base yet,
        # acknowledged: written and flushed (the drive has a write cache).
        for i in range(6):
            g.write(0x70 + i, (24 + i) * MiB, MiB)
        guestio.qemu_io(env.dom(vm), "vda", "flush")
    else:
        assert paused(env, vm)               # the guest cannot write now
    kill_qemu(env, vm)
    env.agent = start_agent(env.agent.state_dir)   # a clean agent: the VM is gone
    vm2 = engine_restarts_vm(env, vm, img, top, g)
    g.assert_intact(img)                     # every acknowledged write reads back
    # The image repair of the dead job ran too (or was handed to the new VM).
    wait_for(lambda: not [p for p in env.call("Host.getPendingWork")
                          if p["key"].startswith("repair/")], 30, "the image repair to end")
    live = env.assert_four_views(vm2, img)
    if len(live) > 1:                        # and a new merge works
        job2 = merge(env, vm2, img, live, live[-2], live[-1])
        assert env.job_outcome(vm2, job2)["state"] == "DONE"
        g.assert_intact(img)
    report("pivot-window", point, "active", "agent and QEMU killed, engine path", live,
           merged=top not in live)


@pytest.mark.parametrize("kind", ["internal", "active"])
def test_finding2_vm_destroyed_while_cleanup_waits_for_its_domain(env, workdir, kind):
    vm, img, chain, g = build(env, workdir)
    base, top = (chain[0], chain[2]) if kind == "internal" else (chain[2], chain[3])
    guestio.qemu_io(env.dom(vm), "vda", "flush")
    job = merge(env, vm, img, chain, base, top, bandwidth=1)   # a few seconds of copying
    with storage_hidden(env.storage_root):
        wait_for(lambda: env.call("Host.getStorageRepoStats")[env.sd]["valid"] is False, 10,
                 "the domain to be INVALID")
        wait_for(lambda: [p for p in env.call("Host.getPendingWork")
                          if job in p["key"] and p["requires"]], 60,
                 "the job to wait for the domain")
        state = env.vm_jobs(vm)[job]["state"]
        assert state == ("cleanup" if kind == "internal" else "ready")
        live_at_destroy = env.live_chain(vm)
        env.call("VM.destroy", vmID=vm)
        outcome = next(e for e in env.call("Host.getJobHistory") if e["id"] == job)
        assert outcome["state"] == "FAILED" and "repair" in outcome["error"]
        pending = [p for p in env.call("Host.getPendingWork") if p["key"] == f"repair/{job}"]
        assert pending and env.sd in pending[0]["requires"]
        # The repair is persisted: it survives an agent restart.
        env.agent.kill9()
        env.agent = start_agent(env.agent.state_dir)
        wait_for(lambda: [p for p in env.call("Host.getPendingWork")
                          if p["key"] == f"repair/{job}"], 30, "the repair to be pending again")
    wait_for(lambda: not [p for p in env.call("Host.getPendingWork")
                          if p["key"] == f"repair/{job}"], 60, "the repair to run")
    # Metadata repaired: the chain QEMU last ran, every volume in it LEGAL.
    assert env.metadata_chain(img, live_at_destroy[-1]) == live_at_destroy
    assert check_no_leak(env, img, live_at_destroy) == []
    g.vm = env.create_vm([(img, live_at_destroy[-1])])
    assert env.assert_four_views(g.vm, img) == live_at_destroy
    g.assert_intact(img)
    report("vm-gone", "VM.destroy while cleanup waits for the domain", kind,
           "repair ran after restart", live_at_destroy, merged=top not in live_at_destroy,
           final="failed")


def test_no_pause_for_a_pivot_whose_marker_cannot_be_written(env, workdir):
    vm, img, chain, g = build(env, workdir)
    job = merge(env, vm, img, chain, chain[2], chain[3], bandwidth=1)
    with storage_hidden(env.storage_root):
        wait_for(lambda: env.call("Host.getStorageRepoStats")[env.sd]["valid"] is False, 10,
                 "the domain to be INVALID")
        wait_for(lambda: env.vm_jobs(vm)[job]["state"] == "ready", 30, "READY")
        assert not paused(env, vm)             # no pause while the marker cannot be written
    wait_for(lambda: job not in env.vm_jobs(vm), 60, "the merge to end")
    assert not paused(env, vm)
    assert env.assert_four_views(vm, img) == chain[:3]
    g.assert_intact(img)


@pytest.mark.parametrize("kind", ["internal", "active"])
@pytest.mark.parametrize("point", ["merge.down.repair_queued", "repair.queued",
                                   "repair.done.before_forget"])
def test_crash_while_handing_a_dead_vms_job_to_a_repair(env, workdir, point, kind):
    vm, img, chain, g = build(env, workdir)
    guestio.qemu_io(env.dom(vm), "vda", "flush")
    base, top = (chain[0], chain[2]) if kind == "internal" else (chain[1], chain[3])
    env.agent.kill9()
    env.agent = start_agent(env.agent.state_dir, env={ENV: point})
    proc = env.agent.proc
    job = merge(env, vm, img, chain, base, top, bandwidth=1)
    wait_for(lambda: int(env.vm_jobs(vm).get(job, {}).get("cur", "1")), 20, "progress")
    kill_qemu(env, vm)
    wait_for(lambda: proc.poll() is not None, 60, f"the agent to die at {point}")
    env.agent = start_agent(env.agent.state_dir)
    wait_for(lambda: not [p for p in env.call("Host.getPendingWork")
                          if p["key"].startswith("repair/")], 60, "the repair to run")
    assert not os.listdir(os.path.join(env.agent.state_dir, "repairs"))
    vm2 = engine_restarts_vm(env, vm, img, chain[-1], g)
    g.assert_intact(img)
    assert env.vm_jobs(vm2) == {}
    report("vm-gone", point, kind, "killed", env.agent_chain(vm2, img), merged=False,
           final="failed")


@pytest.mark.parametrize("point", ["vm.snapshot.before", "vm.snapshot.after"])
def test_crash_in_snapshot_converges(env, workdir, point):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    env.agent.kill9()
    env.agent = start_agent(env.agent.state_dir, env={ENV: point})
    proc = env.agent.proc
    new = env.create_volume(img, parent=base)
    try:
        env.call("VM.snapshot", vmID=vm, snapDrives=[
            {"domainID": env.sd, "imageID": img, "baseVolumeID": base, "volumeID": new}])
    except Exception:
        pass
    wait_for(lambda: proc.poll() is not None, 30, f"the agent to die at {point}")
    env.agent = start_agent(env.agent.state_dir)
    live = env.assert_four_views(vm, img)
    assert live == ([base, new] if point == "vm.snapshot.after" else [base])
    if live == [base]:
        # The engine removes the volume of a snapshot that failed.
        env.call("Volume.delete", storagedomainID=env.sd, imageID=img, volumeID=new)
    leaf = env.snapshot(vm, img, live[-1])      # and the next snapshot works
    assert env.assert_four_views(vm, img) == live + [leaf]
    report("snapshot-crash", point, "-", "killed", live + [leaf], merged=False)


def test_crash_inside_a_failed_pivot_converges(env, workdir):
    """finding 3: a pivot refused by libvirt (injected), the agent killed after
    it resumed the VM and before it persisted READY; recovery pauses again,
    pivots, and the marker was never wrong on the way."""
    vm, img, chain, g = build(env, workdir)
    env.agent.kill9()
    env.agent = start_agent(env.agent.state_dir, env={ENV: "merge.pivot_failed.resumed",
                                                      "VMHOST_INJECT_ERROR": "merge.pivot"})
    proc = env.agent.proc
    job = merge(env, vm, img, chain, chain[2], chain[3])
    wait_for(lambda: proc.poll() is not None, 60, "the agent to die in the failed pivot")
    assert not paused(env, vm)                           # resumed before the crash
    assert env.metadata(img, chain[3]).legality.value == "LEGAL"   # never marked
    g.write(0x7e, 30 * MiB, 2 * MiB)                     # the guest runs on the top
    guestio.qemu_io(env.dom(vm), "vda", "flush")
    env.agent = start_agent(env.agent.state_dir)
    assert env.job_outcome(vm, job)["state"] == "DONE"
    assert env.assert_four_views(vm, img) == chain[:3]
    assert not paused(env, vm)
    g.assert_intact(img)
    report("failed-pivot", "merge.pivot_failed.resumed", "active", "killed", chain[:3],
           merged=True, final="done")
