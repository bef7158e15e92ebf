"""Shared by the crash matrix and the fault scenarios: a VM with a 4-volume
chain and guest data in every layer, and the convergence invariants."""
from __future__ import annotations

import json
import os
import time
import uuid

from conftest import Guest, start_agent, wait_for
from vmhost.client import TransportError
from vmhost.ids import is_uuid

MiB = 1 << 20


def build(env, workdir, fill_mib: int = 0):
    """base <- s1 <- s2 <- leaf, data in every layer; `fill_mib` more MiB in s2
    (inside both the internal (base..s2) and the active (s1..leaf) merges)."""
    img = str(uuid.uuid4())
    chain = [env.create_volume(img)]
    vm = env.create_vm([(img, chain[0])])
    g = Guest(env, vm, workdir)
    for layer in range(4):
        g.write(0x10 + layer, layer * 2 * MiB, MiB)
        g.write(0x40 + layer, 0, 128 * 1024)
        if layer == 2:
            for off in range(0, fill_mib, 8):
                g.write(0x5c, (16 + off) * MiB, min(8, fill_mib - off) * MiB)
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


def check_converged(env, vm, img, chain, g, base: str, top: str, job: str) -> dict:
    """Invariants (a)-(e) once the agent settled; returns facts for the report."""
    wait_for(lambda: job not in env.vm_jobs(vm), 60, f"job {job} to leave vmJobs")    # (d)
    final = next((e for e in env.call("Host.getJobHistory") if e["id"] == job), None)
    live = env.assert_four_views(vm, img)                              # (a)
    b, t = chain.index(base), chain.index(top)
    merged = live == chain[:b + 1] + chain[t + 1:]
    assert merged or live == chain, f"chain is neither merged nor untouched: {live}"
    g.assert_intact(img)                                               # (b)
    leaks = check_no_leak(env, img, live)
    assert leaks == []                                                 # (c)
    assert final is None or final["state"] != "FAILED" or final["error"]     # (d)
    assert env.call("VM.getStats", vmID=vm)[0]["status"] == "Up"      # (e)
    if len(live) > 1:
        job2 = env.call("VM.merge", vmID=vm, drive={"domainID": env.sd, "imageID": img,
                                                    "volumeID": live[-1]},
                        baseVolUUID=live[-2], topVolUUID=live[-1])
        env.wait_job_gone(vm, job2, 60)
        assert env.assert_four_views(vm, img) == live[:-1]
        g.assert_intact(img)
    return {"merged": merged, "final": final["state"].lower() if final else "gone",
            "leaks": len(leaks), "data_ok": True}


def merge(env, vm, img, chain, base, top, job=None, **kw) -> str:
    """Start a merge; an agent dying inside VM.merge is not an error here."""
    job = job or str(uuid.uuid4())
    try:
        env.call("VM.merge", vmID=vm, drive={"domainID": env.sd, "imageID": img,
                                             "volumeID": chain[-1]},
                 baseVolUUID=base, topVolUUID=top, jobUUID=job, **kw)
    except TransportError:
        pass
    return job


def restart_and_converge(env, vm, job, timeout: float = 60.0) -> float:
    """Start a clean agent; seconds until the job is resolved (gone or FAILED)."""
    env.agent = start_agent(env.agent.state_dir)
    started = time.monotonic()

    wait_for(lambda: job not in env.vm_jobs(vm), timeout, "convergence after restart")
    return round(time.monotonic() - started, 3)
