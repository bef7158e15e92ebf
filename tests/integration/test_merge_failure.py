"""A block job that fails inside QEMU: the storage domain lives on a small
filesystem that fills up while the commit writes into the base (ENOSPC).
The job must end FAILED with libvirt's reason, the leaf LEGAL and the chain
(and the guest data) intact; after space is freed a new merge succeeds."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from conftest import Env, Guest, _destroy_test_domains, start_agent, wait_for

MiB = 1 << 20


@pytest.fixture
def small_env(workdir, libvirtd):
    image = os.path.join(workdir, "fs.img")
    root = os.path.join(workdir, "storage")
    os.makedirs(root)
    subprocess.run(["truncate", "-s", "80M", image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    subprocess.run(["mount", "-o", "loop", image, root], check=True)
    os.chmod(root, 0o755)
    e = Env(agent=start_agent(os.path.join(workdir, "state")), sd=str(uuid.uuid4()),
            storage_root=root, conn=libvirtd)
    try:
        e.call("StorageDomain.create", storagedomainID=e.sd, domainType="localfs",
               typeArgs=root, name="small")
        yield e
    finally:
        e.agent.stop()
        _destroy_test_domains(libvirtd)
        subprocess.run(["umount", "-l", root], check=False)


def test_commit_failing_with_enospc_is_reported_failed(small_env, workdir):
    env = small_env
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    g = Guest(env, vm, workdir)
    g.write(0x11, 0, MiB)
    mid = env.snapshot(vm, img, base)
    for off in range(0, 24, 8):
        g.write(0x22, (8 + off) * MiB, 8 * MiB)             # 24 MiB the base must take
    leaf = env.snapshot(vm, img, mid)
    g.write(0x33, 40 * MiB, MiB)
    guest_flush = lambda: g.assert_intact(img)               # noqa: E731
    guest_flush()
    # Leave less room than the commit needs.
    filler = os.path.join(env.storage_root, "filler")
    free = os.statvfs(env.storage_root).f_bavail * os.statvfs(env.storage_root).f_frsize
    subprocess.run(["fallocate", "-l", str(free - 6 * MiB), filler], check=True)

    job = env.call("VM.merge", vmID=vm,
                   drive={"domainID": env.sd, "imageID": img, "volumeID": leaf},
                   baseVolUUID=base, topVolUUID=mid)
    failed = wait_for(lambda: (env.vm_jobs(vm).get(job) or {}).get("state") == "failed"
                      and env.vm_jobs(vm)[job], 60, "the job to fail")
    assert "FAILED" in failed["error"], failed
    assert env.assert_four_views(vm, img) == [base, mid, leaf]
    assert {env.metadata(img, v).legality.value for v in (base, mid, leaf)} == {"LEGAL"}
    assert env.call("VM.getStats", vmID=vm)[0]["status"] == "Up"
    g.assert_intact(img)

    os.unlink(filler)
    job2 = env.call("VM.merge", vmID=vm,
                    drive={"domainID": env.sd, "imageID": img, "volumeID": leaf},
                    baseVolUUID=base, topVolUUID=mid)
    assert job not in env.vm_jobs(vm)          # the new merge acknowledged the failed one
    env.wait_job_gone(vm, job2)
    assert env.assert_four_views(vm, img) == [base, leaf]
    g.assert_intact(img)
