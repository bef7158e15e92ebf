"""Live merge on real VMs: a 4-volume chain with guest data in every layer,
writes during the merge, and after each merge the data equals a reference
image built offline and the four views of the chain agree."""
from __future__ import annotations

import subprocess
import uuid

import pytest

from conftest import Guest, chain_with_data, wait_for
from vmhost.client import RpcError

MiB = 1 << 20


def four_layer_vm(env, workdir, drives: int = 1):
    """VM whose drive(s) have base <- s1 <- s2 <- leaf, each layer written to."""
    images = [str(uuid.uuid4()) for _ in range(drives)]
    bases = [env.create_volume(img) for img in images]
    vm = env.create_vm(list(zip(images, bases)))
    chains = {img: [base] for img, base in zip(images, bases)}
    guests = {img: Guest(env, vm, workdir, drive=f"vd{'abcd'[i]}") for i, img in enumerate(images)}
    for layer in range(4):
        for img in images:
            g = guests[img]
            g.write(0x10 + layer, layer * 4 * MiB, 2 * MiB)         # new data in this layer
            g.write(0x40 + layer, 0, 256 * 1024)                    # overwrite base's data
        if layer < 3:
            for img in images:
                chains[img].append(env.snapshot(vm, img, chains[img][-1]))
    return vm, images, chains, guests


def merge(env, vm, img, chain, base, top, **kw):
    return env.call("VM.merge", vmID=vm,
                    drive={"domainID": env.sd, "imageID": img, "volumeID": chain[-1]},
                    baseVolUUID=base, topVolUUID=top, **kw)


def check_after(env, vm, img, guest, expected_chain, merged):
    assert env.assert_four_views(vm, img, guest.drive) == expected_chain
    guest.assert_intact(img)
    infos = {v: env.call("Volume.getInfo", storagedomainID=env.sd, imageID=img, volumeID=v)
             for v in expected_chain + merged}
    assert [infos[v]["legality"] for v in expected_chain] == ["LEGAL"] * len(expected_chain)
    assert infos[expected_chain[-1]]["voltype"] == "LEAF"
    assert all(infos[v]["voltype"] == "INTERNAL" for v in expected_chain[:-1])
    # Merged-away volumes are ILLEGAL and Volume.delete removes them (top down:
    # a merged volume may still be named as parent by another merged one).
    for v in reversed(merged):
        assert infos[v]["legality"] == "ILLEGAL", v
        env.call("Volume.delete", storagedomainID=env.sd, imageID=img, volumeID=v)
    assert sorted(env.call("StorageDomain.getVolumes", storagedomainID=env.sd, imageID=img)) \
        == sorted(expected_chain)
    assert env.assert_four_views(vm, img, guest.drive) == expected_chain


@pytest.mark.parametrize("kind", ["internal-middle", "internal-to-base", "active", "all-into-base"])
def test_merge_kinds(env, workdir, kind):
    vm, (img,), chains, guests = four_layer_vm(env, workdir)
    b, s1, s2, leaf = chains[img]
    base, top = {"internal-middle": (s1, s2), "internal-to-base": (b, s2),
                 "active": (s2, leaf), "all-into-base": (b, leaf)}[kind]
    job = merge(env, vm, img, chains[img], base, top)
    assert job in env.vm_jobs(vm)                        # visible at once
    guests[img].write(0x77, 20 * MiB, MiB)                # the guest writes during the merge
    env.wait_job_gone(vm, job)
    chain = chains[img]
    expected = chain[:chain.index(base) + 1] + chain[chain.index(top) + 1:]
    merged = chain[chain.index(base) + 1: chain.index(top) + 1]
    check_after(env, vm, img, guests[img], expected, merged)
    outcome = [h for h in env.call("Host.getJobHistory") if h["id"] == job]
    assert outcome and outcome[-1]["state"] == "DONE"
    guests[img].write(0x78, 30 * MiB, MiB)                # still writable afterwards
    guests[img].assert_intact(img)


def test_two_merges_on_two_drives_and_two_vms(env, workdir):
    vm1, imgs, chains, guests = four_layer_vm(env, workdir, drives=2)
    vm2, (img3,), chains2, guests2 = four_layer_vm(env, workdir)
    a, b = imgs
    jobs = [
        (vm1, a, merge(env, vm1, a, chains[a], chains[a][0], chains[a][2])),   # internal
        (vm1, b, merge(env, vm1, b, chains[b], chains[b][2], chains[b][3])),   # active
        (vm2, img3, merge(env, vm2, img3, chains2[img3], chains2[img3][1], chains2[img3][3])),
    ]
    assert set(env.vm_jobs(vm1)) == {jobs[0][2], jobs[1][2]}
    for vm, img, job in jobs:
        env.wait_job_gone(vm, job)
    c = chains[a]
    assert env.assert_four_views(vm1, a, "vda") == [c[0], c[3]]
    c = chains[b]
    assert env.assert_four_views(vm1, b, "vdb") == c[:3]
    c = chains2[img3]
    assert env.assert_four_views(vm2, img3) == c[:2]
    for img, guest in {**guests, **guests2}.items():
        guest.assert_intact(img)


def test_bandwidth_limited_merge_progress_then_abort(env, workdir):
    vm, img, (base, mid, leaf), g = chain_with_data(env, workdir, 24)   # 24 MiB at 1 MiB/s
    job = merge(env, vm, img, [base, mid, leaf], base, mid, bandwidth=1)
    info = env.vm_jobs(vm)[job]
    assert (info["jobType"], info["blockJobType"], info["bandwidth"]) == ("block", "commit", 1)
    first = wait_for(lambda: int(env.vm_jobs(vm)[job]["cur"]) or None, 20, "progress")
    wait_for(lambda: int(env.vm_jobs(vm)[job]["cur"]) > first, 20, "cur to rise")
    assert int(env.vm_jobs(vm)[job]["end"]) > int(env.vm_jobs(vm)[job]["cur"])
    result = env.call("VM.abortMerge", vmID=vm, jobUUID=job)
    assert result == {"jobUUID": job, "state": "aborted"}
    assert job not in env.vm_jobs(vm)
    assert env.assert_four_views(vm, img) == [base, mid, leaf]
    assert {env.metadata(img, v).legality.value for v in (base, mid, leaf)} == {"LEGAL"}
    g.assert_intact(img)
    # The drive is usable for a new merge, which completes.
    job2 = merge(env, vm, img, [base, mid, leaf], base, mid)
    env.wait_job_gone(vm, job2)
    assert env.assert_four_views(vm, img) == [base, leaf]
    g.assert_intact(img)


def test_external_cancel_is_reported_and_chain_intact(env, workdir):
    vm, img, (base, mid, leaf), g = chain_with_data(env, workdir, 16)
    # Internal: QEMU's commit job honours the rate limit in small steps (an
    # active commit copies its first 16 MiB buffer at once and may be ready).
    job = merge(env, vm, img, [base, mid, leaf], base, mid, bandwidth=1)
    wait_for(lambda: int(env.vm_jobs(vm)[job]["cur"]), 20, "progress")
    p = subprocess.run(["virsh", "-c", "qemu:///system", "blockjob", env.dom(vm).name(), "vda",
                        "--abort"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    failed = env.job_outcome(vm, job, 30)
    assert failed["state"] == "FAILED" and "cancelled" in failed["error"]
    assert env.assert_four_views(vm, img) == [base, mid, leaf]
    assert env.metadata(img, leaf).legality.value == "LEGAL"
    g.assert_intact(img)
    # Gone from vmJobs once cleaned up (the engine waits for that); dismissing
    # it is a no-op; a new merge works.
    env.call("VM.dismissJob", vmID=vm, jobUUID=job)
    assert env.vm_jobs(vm) == {}
    job2 = merge(env, vm, img, [base, mid, leaf], mid, leaf)
    env.wait_job_gone(vm, job2)
    assert env.assert_four_views(vm, img) == [base, mid]
    g.assert_intact(img)


def test_merge_grows_a_smaller_base(env, workdir):
    img = str(uuid.uuid4())
    base = env.create_volume(img, size=32 * MiB)
    vm = env.create_vm([(img, base)])
    mid = env.create_volume(img, parent=base, size=64 * MiB)   # disk grew in this snapshot
    env.call("VM.snapshot", vmID=vm, snapDrives=[
        {"domainID": env.sd, "imageID": img, "baseVolumeID": base, "volumeID": mid}])
    leaf = env.snapshot(vm, img, mid)
    job = merge(env, vm, img, [base, mid, leaf], base, mid)
    env.wait_job_gone(vm, job)
    assert env.assert_four_views(vm, img) == [base, leaf]
    assert env.metadata(img, base).capacity == 64 * MiB


def test_merge_validation_errors_leave_no_trace(env, workdir):
    vm, (img,), chains, _ = four_layer_vm(env, workdir)
    b, s1, s2, leaf = chains[img]
    cases = [
        (dict(base=s2, top=s1), 52),                               # base above top
        (dict(base=b, top=str(uuid.uuid4())), 13),                 # top not in chain
    ]
    for args, code in cases:
        with pytest.raises(RpcError) as e:
            merge(env, vm, img, chains[img], **args)
        assert e.value.code == code
    with pytest.raises(RpcError) as e:                             # stale leaf in the drive
        env.call("VM.merge", vmID=vm, drive={"domainID": env.sd, "imageID": img, "volumeID": s2},
                 baseVolUUID=b, topVolUUID=s1)
    assert e.value.code == 13
    assert env.vm_jobs(vm) == {}
    job = merge(env, vm, img, chains[img], b, s1, bandwidth=1)
    with pytest.raises(RpcError) as e:                             # one job per drive
        merge(env, vm, img, chains[img], s2, leaf)
    assert e.value.code == 52 and job in e.value.message
    with pytest.raises(RpcError) as e:                             # no snapshot mid-merge
        env.snapshot(vm, img, leaf)
    assert e.value.code == 48
    env.call("VM.abortMerge", vmID=vm, jobUUID=job)
    assert env.assert_four_views(vm, img) == chains[img]
