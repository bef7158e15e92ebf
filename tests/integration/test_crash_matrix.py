"""The crash matrix: for every named failpoint x {internal, active} merge, the
agent dies (SIGKILL) exactly there, is restarted, and must converge:
  (a) the four views of the chain agree (getVMFullList, live XML, qemu-img, metadata);
  (b) the guest data equals a reference image built offline;
  (c) no volume is lost or leaked: every volume file is in the chain or ILLEGAL,
      every volume has its metadata and nothing else is left in the image;
  (d) no job is stuck: vmJobs is {} or shows a FAILED job with a reason;
  (e) the VM still runs and a new merge on the same drive succeeds.
With VMHOST_FAULTS_REPORT=<file> each row is appended there (make faults)."""
from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from conftest import Guest, start_agent, wait_for
from vmhost.client import TransportError
from vmhost.failpoints import ENV, POINTS
from vmhost.ids import is_uuid

MiB = 1 << 20
KINDS = {"internal": (0, 2), "active": (1, 3)}   # (base index, top index) in a 4-volume chain


def build(env, workdir):
    img = str(uuid.uuid4())
    chain = [env.create_volume(img)]
    vm = env.create_vm([(img, chain[0])])
    g = Guest(env, vm, workdir)
    for layer in range(4):
        g.write(0x10 + layer, layer * 2 * MiB, MiB)
        g.write(0x40 + layer, 0, 128 * 1024)
        if layer < 3:
            chain.append(env.snapshot(vm, img, chain[-1]))
    return vm, img, chain, g


def check_no_leak(env, img, chain) -> list[str]:
    problems = []
    names = os.listdir(env.image_dir(img))
    vols = {n for n in names if is_uuid(n)}
    metas = {n[:-5] for n in names if n.endswith(".meta") and is_uuid(n[:-5])}
    problems += [f"stray file {n}" for n in names if n not in vols and n[:-5] not in metas]
    problems += [f"volume {v} without metadata" for v in vols - metas]
    problems += [f"metadata without volume {v}" for v in metas - vols]
    problems += [f"chain volume {v} missing" for v in chain if v not in vols]
    for v in vols & metas:
        legality = env.metadata(img, v).legality.value
        if v in chain and legality != "LEGAL":
            problems.append(f"chain volume {v} is {legality}")
        if v not in chain and legality != "ILLEGAL":
            problems.append(f"volume {v} left the chain but is {legality}")
    return problems


def record(row: dict) -> None:
    path = os.environ.get("VMHOST_FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("point", POINTS)
def test_crash_at_point(env, workdir, point, kind):
    vm, img, chain, g = build(env, workdir)
    b, t = KINDS[kind]
    base, top = chain[b], chain[t]
    # Arm the failpoint only now: set-up (volume creation) also writes metadata.
    env.agent.kill9()
    env.agent = start_agent(env.agent.state_dir, env={ENV: point})
    job = str(uuid.uuid4())
    started = time.monotonic()
    try:
        env.call("VM.merge", vmID=vm, drive={"domainID": env.sd, "imageID": img,
                                             "volumeID": chain[-1]},
                 baseVolUUID=base, topVolUUID=top, jobUUID=job)
    except TransportError:
        pass                                    # died inside VM.merge
    proc = env.agent.proc

    def settled():
        try:
            if job not in env.vm_jobs(vm) and not env.call("Host.getPendingWork"):
                return "not reached"
        except TransportError:
            pass
        return "killed" if proc.poll() is not None else None
    outcome = wait_for(settled, 60, f"the agent to die at {point} or the job to end")
    seconds = round(time.monotonic() - started, 3)
    env.agent.kill9()                           # disarm: the rest runs on a clean agent
    env.agent = start_agent(env.agent.state_dir)
    if outcome == "killed":
        recovered = time.monotonic()

        def converged():
            info = env.vm_jobs(vm).get(job)
            return info is None or (info["state"] == "failed" and info.get("error"))
        wait_for(converged, 60, "convergence after restart")
        seconds = round(time.monotonic() - recovered, 3)
    final = env.vm_jobs(vm).get(job)

    # (a) four views, (b) data, (c) leaks, (d) job state.
    live = env.assert_four_views(vm, img)
    merged = live == chain[:b + 1] + chain[t + 1:]
    assert merged or live == chain, f"chain is neither merged nor untouched: {live}"
    g.assert_intact(img)
    leaks = check_no_leak(env, img, live)
    assert leaks == []
    assert final is None or final["state"] == "failed" and final["error"]
    if final is None:
        assert merged or outcome == "killed"   # a vanished job that did not merge was killed early
    # (e) the VM runs and a new merge on the drive succeeds.
    assert env.call("VM.getStats", vmID=vm)[0]["status"] == "Up"
    if final is not None:
        env.call("VM.dismissJob", vmID=vm, jobUUID=job)
    job2 = env.call("VM.merge", vmID=vm, drive={"domainID": env.sd, "imageID": img,
                                                "volumeID": live[-1]},
                    baseVolUUID=live[-2], topVolUUID=live[-1])
    env.wait_job_gone(vm, job2, 60)
    assert env.assert_four_views(vm, img) == live[:-1]
    g.assert_intact(img)
    record({"point": point, "kind": kind, "outcome": outcome, "converged": True,
            "seconds": seconds, "merged": merged, "data_ok": True, "leaks": len(leaks),
            "final": final["state"] if final else "gone"})
