"""`vmhost demo --fleet` end to end, as `make demo-fleet` runs it: a failed run
exits 1 and still takes the lab down; a full run (host1 powered off mid-merge,
the VM restarted on host2 once host1's lease expired) prints the story's key
lines, exits 0 and leaves nothing behind. About 100 s, most of it the wait for
the lease (sanlock's host_dead_seconds): run by `make faults`."""
from __future__ import annotations

import os

import pytest

from test_demo import run_demo
from vmhost.failpoints import ENV

pytestmark = pytest.mark.faults

KEY_LINES = [
    "ok    host2 cannot start the VM while host1 runs it: VM.create refused (651",
    "vmhost lab poweroff host1 at ",
    "ok    host1 is gone: its agent does not answer",
    "VM.create refused (651): the VM lease is held by host id 1 (sanlock: fail",
    "VM.create accepted on the leaf ",
    "ok    VM.getStats on host2: no block job",
    "VM.synchronizeDisks: base <- snap1 <- snap2  ->  ",
    "Host.getVMFullList on host2: ",
    "ok    all four views show ",
    "ok    guest reads 1 MiB of 0x44 at 64 MiB (written into snap2)",
    "ok    no volume of the chain is ILLEGAL",
    "host_dead_seconds = 8 x io_timeout + 60 = 8 x 1 + 60 = 68s",
    "ok    the failover waited for the lease: ",
    "vmhost lab down: every host stopped",
    "PASS: all ",
]


def run_fleet_demo(state_dir: str, env: dict | None = None):
    return run_demo(state_dir, env, flags=("--fleet",), timeout=400)


def processes_under(path: str) -> list[str]:
    """Command lines that name `path`: the lab's hosts (their init's spec file is under it)
    and their QEMUs (their disks are)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def test_demo_fleet_fails_cleanly_then_tells_the_failover(workdir):
    state_dir = os.path.join(workdir, "fleet")
    # host1's agent dies for good as the merge starts (a failpoint in the lab's environment).
    proc, _ = run_fleet_demo(state_dir, {ENV: "merge.blockcommit.before"})
    assert proc.returncode == 1
    assert "FAIL  step 3 (power cut) stopped" in proc.stdout
    assert "vmhost lab down: every host stopped" in proc.stdout
    assert "\nFAIL: 1 of " in proc.stdout and "agent log" in proc.stdout
    assert processes_under(state_dir) == []
    assert os.path.isdir(os.path.join(state_dir, "lab", "hosts", "host1", "log"))  # kept

    proc, took = run_fleet_demo(state_dir)
    assert proc.returncode == 0, f"exit {proc.returncode}"
    for line in KEY_LINES:
        assert line in proc.stdout, f"{line!r} not printed"
    assert proc.stdout.count("ok    guest reads") == 4
    assert "FAIL" not in proc.stdout
    assert took < 180, f"took {took:.0f}s"
    assert processes_under(state_dir) == []
    assert not os.path.exists(state_dir)
