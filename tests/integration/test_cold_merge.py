"""Cold merge on the real stack: a real agent, libvirtd and QEMU for the VM
that wrote the data (and is then destroyed), real qemu-img for the merge.

- SDM.merge of an internal volume holding ~900 MiB of data in a 1 GiB
  image, followed in Host.getJobs (progress while it runs, done at the end),
  refused while the VM runs and with a stale base_generation, aborted once
  before the commit completed; then `vmhost-client snapshot
  remove` of the leaf (a cold leaf merge) with its progress bar. Every layer
  holds data, checked against a reference image.
- The crash matrix of the cold merge: the agent dies (SIGKILL) at each
  failpoint and the restarted agent finishes the job from its record on the
  domain (small images: the matrix stays fast)."""
from __future__ import annotations

import os
import time
import uuid

import pytest

from conftest import Guest, start_agent, wait_for
from scenario import record
from vmhost.cli import client as cli
from vmhost.client import RpcError, TransportError
from vmhost.failpoints import COLD_POINTS, ENV
from vmhost.storage import qemu_img

MiB = 1 << 20
GiB = 1 << 30
# Real data committed by the big merge. 1 GiB takes ~10 s to write here
# (volume and reference), the commit itself ~2 s.
BIG_DATA = 1 * GiB


def subchain(env, img, base, top, **kw) -> dict:
    return {"sd_id": env.sd, "img_id": img, "base_id": base, "top_id": top, **kw}


def gen(env, img, vol) -> int:
    return env.call("Volume.getInfo", storagedomainID=env.sd, imageID=img,
                    volumeID=vol)["generation"]


def snapshot(env, vm, img, base, size) -> str:
    new = env.create_volume(img, parent=base, size=size)
    env.call("VM.snapshot", vmID=vm, snapDrives=[
        {"domainID": env.sd, "imageID": img, "baseVolumeID": base, "volumeID": new}])
    return new


def offline_write(env, img, vol, reference, pattern, offset, length):
    """Into one volume of a chain no VM runs, and into the reference."""
    cmd = f"write -P {pattern:#x} {offset} {length}"
    qemu_img.io(os.path.join(env.image_dir(img), vol), cmd)
    qemu_img.io(reference, cmd)


def test_cold_merges_of_a_destroyed_vm_report_progress_and_keep_every_write(env, workdir,
                                                                           capsys):
    img = str(uuid.uuid4())
    base = env.create_volume(img, size=GiB)
    vm = env.create_vm([(img, base)])
    g = Guest(env, vm, workdir, size=GiB)
    g.write(0x11, 0, MiB)
    mid = snapshot(env, vm, img, base, GiB)
    g.write(0x22, 4 * MiB, MiB)
    g.write(0x2a, 0, 256 * 1024)
    leaf = snapshot(env, vm, img, mid, GiB)
    g.write(0x33, 8 * MiB, MiB)
    g.assert_intact(img)

    # Refused while the VM runs: its record would fight QEMU for the image.
    with pytest.raises(RpcError) as busy:
        env.call("SDM.merge", job_id=str(uuid.uuid4()), subchain_info=subchain(env, img, base, mid))
    assert busy.value.code == 203 and "running VM" in busy.value.message
    env.call("VM.destroy", vmID=vm)

    # The bulk of what the commit copies, written offline into mid.
    offline_write(env, img, mid, g.reference, 0x5c, 64 * MiB, BIG_DATA - 128 * MiB)
    gen0 = gen(env, img, base)
    with pytest.raises(RpcError, match=f"GEN {gen0}.*expects {gen0 + 1}") as refused:
        env.call("SDM.merge", job_id=str(uuid.uuid4()),
                 subchain_info=subchain(env, img, base, mid, base_generation=gen0 + 1))
    assert refused.value.code == 911       # VDSM's GenerationMismatch

    # Aborted before its commit completed: the chain stays as it was.
    aborted = str(uuid.uuid4())
    env.call("SDM.merge", job_id=aborted, subchain_info=subchain(env, img, base, mid))
    env.call("Host.abortJob", job_id=aborted)
    wait_for(lambda: env.call("Host.getJobs", job_ids=[aborted])[aborted]["status"] == "aborted",
             60, "the aborted job to end")
    assert gen(env, img, base) == gen0
    assert env.qemu_chain(img, leaf) == env.metadata_chain(img, leaf) == [base, mid, leaf]
    assert env.metadata(img, mid).legality.value == "LEGAL"
    env.call("Host.deleteJob", job_id=aborted)
    assert env.call("Host.getJobs") == {}

    job = str(uuid.uuid4())
    env.call("SDM.merge", job_id=job, subchain_info=subchain(env, img, base, mid,
                                                             base_generation=gen0))
    seen = []

    def ended():
        info = env.call("Host.getJobs", job_type="storage", job_ids=[job])[job]
        assert info["job_type"] == "storage" and info["id"] == job
        seen.append((info["status"], info["progress"]))
        return info["status"] in ("done", "failed", "aborted")
    wait_for(ended, 120, "the cold merge to end")
    assert seen[-1] == ("done", 100), seen
    running = [p for status, p in seen if status == "running"]
    assert any(0 < p < 100 for p in running), f"no progress seen while running: {seen}"
    assert running == sorted(running), "progress went backwards"
    assert gen(env, img, base) == gen0 + 1        # the outcome, readable from storage
    assert env.qemu_chain(img, leaf) == env.metadata_chain(img, leaf) == [base, leaf]
    assert env.metadata(img, mid).legality.value == "ILLEGAL"
    assert qemu_img.compare(g.reference, os.path.join(env.image_dir(img), leaf))
    assert os.listdir(os.path.join(env.storage_root, env.sd, "jobs")) == []

    # The leaf, removed by the CLI: a cold leaf merge with the progress bar.
    code = cli.main(["--url", env.agent.url, "snapshot", "remove", f"storagedomainID={env.sd}",
                     f"imageID={img}", f"volumeID={mid}"])
    out, err = capsys.readouterr()
    assert code == 1 and "ILLEGAL" in err          # a merged-away volume cannot be merged again
    code = cli.main(["--url", env.agent.url, "snapshot", "remove", f"vmID={vm}",
                     f"storagedomainID={env.sd}", f"imageID={img}", f"volumeID={leaf}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.split() == ["[", f'"{base}"', "]"]
    assert "%  " in err and err.endswith("\n")
    assert sorted(os.listdir(env.image_dir(img))) == sorted([base, base + ".meta", mid,
                                                              mid + ".meta"])
    assert qemu_img.compare(g.reference, os.path.join(env.image_dir(img), base))
    # The base runs a VM again.
    vm2 = env.create_vm([(img, base)])
    assert env.agent_chain(vm2, img) == [base]


def chain_with_data(env, workdir):
    """base <- top <- leaf, 16 MiB each, data in every layer (offline), and the reference."""
    img = str(uuid.uuid4())
    reference = os.path.join(workdir, f"ref-{img[:8]}.qcow2")
    qemu_img.create(reference, "qcow2", size=16 * MiB)
    chain = []
    for i in range(3):
        chain.append(env.create_volume(img, parent=chain[-1] if chain else None, size=16 * MiB))
        offline_write(env, img, chain[-1], reference, 0x10 + i, i * 2 * MiB, 4 * MiB)
        offline_write(env, img, chain[-1], reference, 0x40 + i, 0, 64 * 1024)
    return img, chain, reference


# Internal merge (top's child is rebased) and leaf merge (top is the leaf; no rebase).
CRASHES = [(p, k) for p in COLD_POINTS for k in ("internal", "leaf")
           if not (k == "leaf" and p.startswith("coldmerge.rebase."))]


@pytest.mark.parametrize("point,kind", CRASHES)
def test_crash_at_each_cold_merge_failpoint_converges(env, workdir, point, kind):
    img, chain, reference = chain_with_data(env, workdir)
    base, top = chain[:2] if kind == "internal" else chain[1:]
    leaf = chain[-1]
    rest = [v for v in chain if v != top]
    gen0 = gen(env, img, base)
    env.agent.kill9()
    env.agent = start_agent(env.agent.state_dir, env={ENV: point})
    proc = env.agent.proc
    job = str(uuid.uuid4())
    try:
        env.call("SDM.merge", job_id=job, subchain_info=subchain(env, img, base, top))
    except TransportError:
        pass                      # died answering: the record was written before
    wait_for(lambda: proc.poll() is not None, 60, f"the agent to die at {point}")
    # Nothing lost while the agent is dead: the chain reads like the reference.
    assert qemu_img.compare(reference, os.path.join(env.image_dir(img), leaf))
    started = time.monotonic()
    env.agent = start_agent(env.agent.state_dir)

    def done():
        return env.call("Host.getJobs", job_ids=[job]).get(job, {}).get("status") == "done"
    wait_for(done, 60, f"the job to be finished after a crash at {point}")
    seconds = round(time.monotonic() - started, 3)
    assert gen(env, img, base) == gen0 + 1
    assert env.qemu_chain(img, rest[-1]) == env.metadata_chain(img, rest[-1]) == rest
    md = env.metadata(img, top)
    assert md.legality.value == "ILLEGAL" and md.merged_into == base
    assert env.metadata(img, base).voltype.value == ("LEAF" if kind == "leaf" else "INTERNAL")
    assert qemu_img.compare(reference, os.path.join(env.image_dir(img), rest[-1]))
    assert os.listdir(os.path.join(env.storage_root, env.sd, "jobs")) == []
    env.call("Volume.delete", storagedomainID=env.sd, imageID=img, volumeID=top)
    record({"scenario": "cold-merge-crash", "point": point, "kind": kind, "outcome": "killed",
            "converged": True, "seconds": seconds, "final": "done", "merged": True,
            "data_ok": True, "leaks": 0})
