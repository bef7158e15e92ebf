"""A block job that fails inside QEMU: the storage domain lives on a small
filesystem that fills up while the commit writes into the base (ENOSPC).
The job must end FAILED with libvirt's reason, the leaf LEGAL and the chain
(and the guest data) intact; after space is freed a new merge succeeds."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import chain_with_data, small_domain, wait_for

MiB = 1 << 20


@pytest.fixture
def small_env(workdir, libvirtd):
    with small_domain(workdir, "80M", libvirtd) as env:
        yield env


def test_commit_failing_with_enospc_is_reported_failed(small_env, workdir):
    env = small_env
    vm, img, (base, mid, leaf), g = chain_with_data(env, workdir, 24)  # 24 MiB the base must take
    guest_flush = lambda: g.assert_intact(img)               # noqa: E731
    guest_flush()
    # Leave less room than the commit needs.
    filler = os.path.join(env.storage_root, "filler")
    free = os.statvfs(env.storage_root).f_bavail * os.statvfs(env.storage_root).f_frsize
    subprocess.run(["fallocate", "-l", str(free - 6 * MiB), filler], check=True)

    job = env.call("VM.merge", vmID=vm,
                   drive={"domainID": env.sd, "imageID": img, "volumeID": leaf},
                   baseVolUUID=base, topVolUUID=mid)
    failed = env.job_outcome(vm, job, 60)
    assert failed["state"] == "FAILED" and "FAILED" in failed["error"], failed
    assert env.assert_four_views(vm, img) == [base, mid, leaf]
    assert {env.metadata(img, v).legality.value for v in (base, mid, leaf)} == {"LEGAL"}
    assert env.call("VM.getStats", vmID=vm)[0]["status"] == "Up"
    g.assert_intact(img)

    os.unlink(filler)
    job2 = env.call("VM.merge", vmID=vm,
                    drive={"domainID": env.sd, "imageID": img, "volumeID": leaf},
                    baseVolUUID=base, topVolUUID=mid)
    assert job not in env.vm_jobs(vm)
    env.wait_job_gone(vm, job2)
    assert env.assert_four_views(vm, img) == [base, leaf]
    g.assert_intact(img)
