"""A hung storage domain never blocks what does not need it (issue 11).

The frozen domain lives on a FUSE passthrough (freezefs.py) whose volume
metadata files the test freezes: a read of a .meta file then sleeps in the
kernel exactly like on a hard-mounted NFS, while QEMU's I/O to the volume
files flows on. The agent runs its storage operations on a bounded
per-domain executor with a deadline of HUNG_OP_TIMEOUT seconds.
"""
from __future__ import annotations

import time
import uuid

import freezefs
from conftest import HUNG_OP_TIMEOUT, HUNG_WORKERS, HungEnv, wait_for
from vmhost.client import RpcError
from vmhost.ids import BLANK_UUID

UNAVAILABLE = 379     # VDSM's StorageDomainAccessError
FAST = 2.0            # seconds: "answers at once" while a domain hangs


def timed_call(env, method: str, **params):
    start = time.monotonic()
    try:
        result = env.call(method, **params)
    except RpcError as e:
        result = e
    return result, time.monotonic() - start


def assert_fails_by_deadline(h: HungEnv, method: str, **params) -> RpcError:
    err, took = timed_call(h.frozen, method, **params)
    assert isinstance(err, RpcError), f"{method} should fail while the domain hangs: {err}"
    assert err.code == UNAVAILABLE and h.frozen.sd in err.message, err
    assert took < HUNG_OP_TIMEOUT + 1.5, f"{method} took {took:.1f}s"
    return err


def assert_fast(env, method: str, **params):
    result, took = timed_call(env, method, **params)
    assert not isinstance(result, RpcError), f"{method}: {result}"
    assert took < FAST, f"{method} took {took:.1f}s while a domain hangs"
    return result


def test_frozen_metadata_fails_its_calls_by_deadline_and_spares_everything_else(hung_env):
    h = hung_env
    img = str(uuid.uuid4())
    vol = h.frozen.create_volume(img)
    vm_frozen = h.frozen.create_vm([(img, vol)])
    other_img = str(uuid.uuid4())
    other_vol = h.normal.create_volume(other_img)
    vm_other = h.normal.create_vm([(other_img, other_vol)])
    assert h.valid(h.frozen) and h.valid(h.normal)

    with h.fs.frozen(*freezefs.METADATA):
        # The API call reading volume info hangs in the kernel, and fails by its deadline.
        err = assert_fails_by_deadline(h, "Volume.getInfo", storagedomainID=h.frozen.sd,
                                       imageID=img, volumeID=vol)
        assert "did not answer" in err.message
        meta = f"/{h.frozen.sd}/images/{img}/{vol}.meta"
        assert meta in [path for _, path in h.fs.blocked()], \
            "the read really hangs in the file system"
        # ...and the domain is INVALID at once, the other one untouched.
        stats = assert_fast(h.frozen, "Host.getStorageRepoStats")
        assert stats[h.frozen.sd]["valid"] is False
        assert "did not answer" in stats[h.frozen.sd]["reason"]
        assert stats[h.normal.sd]["valid"] is True
        # A second hung call parks the domain's last worker...
        new_img = str(uuid.uuid4())
        assert_fails_by_deadline(h, "Volume.create", storagedomainID=h.frozen.sd,
                                 imageID=new_img, volumeID=str(uuid.uuid4()), size=1 << 20,
                                 volFormat="COW", preallocate="SPARSE", diskType="DATA",
                                 desc="hung", srcImgUUID=BLANK_UUID,
                                 srcVolUUID=BLANK_UUID)
        assert len(h.fs.blocked()) >= HUNG_WORKERS
        # ...so a call needing the domain now fails at once instead of waiting.
        for method, params in (
                ("Volume.getInfo", dict(storagedomainID=h.frozen.sd, imageID=img,
                                        volumeID=vol)),
                ("StorageDomain.getInfo", dict(storagedomainID=h.frozen.sd)),
                ("StorageDomain.getVolumes", dict(storagedomainID=h.frozen.sd,
                                                  imageID=img)),
                ("Volume.delete", dict(storagedomainID=h.frozen.sd, imageID=img,
                                       volumeID=vol)),
                ("Image.reconcileVolumeChain", dict(storagedomainID=h.frozen.sd,
                                                    imageID=img, leafVolID=vol))):
            err, took = timed_call(h.frozen, method, **params)
            assert isinstance(err, RpcError) and err.code == UNAVAILABLE, (method, err)
            assert h.frozen.sd in err.message and took < FAST, (method, took, err)
        # Everything that does not need the hung domain answers at once.
        all_stats = assert_fast(h.frozen, "Host.getAllVmStats")
        assert {s["vmId"] for s in all_stats} >= {vm_frozen, vm_other}
        assert_fast(h.frozen, "Host.getVMList")
        assert assert_fast(h.frozen, "VM.getStats", vmID=vm_frozen)[0]["status"] == "Up"
        assert assert_fast(h.normal, "Volume.getInfo", storagedomainID=h.normal.sd,
                           imageID=other_img, volumeID=other_vol)["uuid"] == other_vol
        assert_fast(h.normal, "VM.pause", vmID=vm_other)
        assert h.normal.call("VM.getStats", vmID=vm_other)[0]["status"] == "Paused"
        assert_fast(h.normal, "VM.cont", vmID=vm_other)
        assert h.normal.call("VM.getStats", vmID=vm_other)[0]["status"] == "Up"
        assert_fast(h.normal, "VM.destroy", vmID=vm_other)
        # The probe of the domain's own metadata succeeds all along, yet the
        # domain stays INVALID while operations are parked in it.
        def last_probe() -> float:     # when the last probe ran (lastCheck is its age)
            age = float(h.frozen.call("Host.getStorageRepoStats")[h.frozen.sd]["lastCheck"])
            return time.monotonic() - age
        seen = last_probe()
        wait_for(lambda: last_probe() > seen + 0.2, 10, "a probe during the freeze")
        assert not h.valid(h.frozen)

    # Released: the parked operations return, a probe succeeds, VALID again.
    wait_for(lambda: h.valid(h.frozen), 30, "the frozen domain VALID after release")
    assert h.fs.blocked() == []
    info = h.frozen.call("Volume.getInfo", storagedomainID=h.frozen.sd, imageID=img,
                         volumeID=vol)
    assert info["uuid"] == vol and info["legality"] == "LEGAL"
    assert h.frozen.call("VM.getStats", vmID=vm_frozen)[0]["status"] == "Up"


def test_merge_cleanup_on_a_frozen_domain_waits_and_completes(hung_env, workdir):
    """The metadata freezes while a merge's cleanup writes it: the job's
    storage call fails by its deadline (never under the VM's lock), the VM
    answers at once throughout, and after release the merge completes and the
    four views agree."""
    from scenario import build, merge
    h = hung_env
    env = h.frozen
    vm, img, chain, g = build(env, workdir)
    job = merge(env, vm, img, chain, chain[0], chain[2], bandwidth=1)
    wait_for(lambda: int(env.vm_jobs(vm).get(job, {}).get("cur", "0")), 20, "progress")
    with h.fs.frozen(*freezefs.METADATA):
        # QEMU finishes the commit through its open files; the cleanup's
        # metadata write hangs and fails by the deadline.
        wait_for(lambda: any(f"{img}/" in path and path.endswith(".meta")
                             for _, path in h.fs.blocked()), 60,
                 "the cleanup's metadata access to hang")
        for _ in range(3):
            stats = assert_fast(env, "VM.getStats", vmID=vm)[0]
            assert stats["status"] == "Up" and job in stats["vmJobs"]
            assert_fast(env, "Host.getAllVmStats")
        wait_for(lambda: not h.valid(env), HUNG_OP_TIMEOUT + 5, "the domain INVALID")
        pending = [p for p in assert_fast(env, "Host.getPendingWork") if job in p["key"]]
        assert pending and (pending[0]["requires"] or env.sd in pending[0]["reason"])
    wait_for(lambda: h.valid(env), 30, "the domain VALID after release")
    assert env.job_outcome(vm, job, 60)["state"] == "DONE"
    assert env.assert_four_views(vm, img) == [chain[0], chain[3]]
    g.assert_intact(img)
