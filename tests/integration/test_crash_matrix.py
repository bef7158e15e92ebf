"""The crash matrix: for every named failpoint x {internal, active} merge, the
agent dies (SIGKILL) exactly there, is restarted, and must converge:
  (a) the four views of the chain agree (getVMFullList, live XML, qemu-img, metadata);
  (b) the guest data equals a reference image built offline;
  (c) no volume is lost or leaked: every volume file is in the chain or ILLEGAL,
      every volume has its metadata and nothing else is left in the image;
  (d) no job is stuck: it leaves vmJobs; a FAILED outcome in the history has a reason;
  (e) the VM still runs and a new merge on the same drive succeeds.
With VMHOST_FAULTS_REPORT=<file> each row is appended there (make faults)."""
from __future__ import annotations

import time

import pytest

from conftest import start_agent, wait_for
from scenario import build, check_converged, merge, record, restart_and_converge
from vmhost.client import TransportError
from vmhost.failpoints import ENV, MERGE_POINTS

KINDS = {"internal": (0, 2), "active": (1, 3)}   # (base index, top index) in a 4-volume chain


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("point", MERGE_POINTS)
def test_crash_at_point(env, workdir, point, kind):
    vm, img, chain, g = build(env, workdir)
    base, top = (chain[i] for i in KINDS[kind])
    # Arm the failpoint only now: set-up (volume creation) also writes metadata.
    env.agent.kill9()
    env.agent = start_agent(env.agent.state_dir, env={ENV: point})
    started = time.monotonic()
    job = merge(env, vm, img, chain, base, top)
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
    if outcome == "killed":
        seconds = restart_and_converge(env, vm, job)
    else:
        env.agent = start_agent(env.agent.state_dir)
    facts = check_converged(env, vm, img, chain, g, base, top, job)
    if facts["final"] == "gone" and not facts["merged"]:
        assert outcome == "killed"   # only a merge killed before it started may vanish
    record({"scenario": "crash-matrix", "point": point, "kind": kind, "outcome": outcome,
            "converged": True, "seconds": seconds, **facts})
