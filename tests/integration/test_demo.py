"""`vmhost demo` end to end, as `make demo` runs it: exit 0, the story's key
lines printed, under two minutes, nothing left behind; a failed run exits 1
and cleans up too, and runs after it in the same state dir pass (idempotent)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

from conftest import ROOT
from vmhost.failpoints import ENV

KEY_LINES = [
    "ok    merge done in",                                        # internal and active merge
    "agent killed with SIGKILL at",
    "ok    agent restarted and answers after",
    "ok    vmJobs still shows the merge",
    "ok    Host.getPendingWork: the merge's next step waits for: storage domain",
    "ok    merge completed",
    "ok    VM.synchronizeDisks: base <- snap2 <- snap5 <- snap6  ->  base <- snap2 <- snap6",
    "5. a cold merge of a stopped VM",
    "ok    all four views show base <- snap2 <- snap6",
    "ok    guest reads 32 MiB of 0x55 at 64 MiB (written into snap4)",
    "PASS: all ",
]


def run_demo(state_dir: str, env: dict | None = None, flags: tuple[str, ...] = (),
             timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    """`vmhost demo [flags]` as `make demo` runs it; its output and how long it took."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vmhost.cli.main", "demo", *flags,
                           "--state-dir", state_dir], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    print(proc.stdout, proc.stderr)
    return proc, time.monotonic() - started


def assert_nothing_left(libvirtd, state_dir: str) -> None:
    """No VM of this state dir, no hiding mount over its storage."""
    prefix = f"vmhost-demo-{hashlib.sha1(state_dir.encode()).hexdigest()[:6]}-"
    assert [d.name() for d in libvirtd.listAllDomains(0) if d.name().startswith(prefix)] == []
    with open("/proc/self/mounts") as f:
        assert state_dir not in f.read()


def test_demo_fails_cleanly_then_tells_the_story_twice(workdir, libvirtd):
    state_dir = os.path.join(workdir, "demo")
    # The agent dies for good in the first merge (a failpoint in its environment).
    proc, _ = run_demo(state_dir, {ENV: "merge.blockcommit.before"})
    assert proc.returncode == 1
    assert "FAIL  step 2 (merges) stopped" in proc.stdout
    assert "\nFAIL: 1 of " in proc.stdout and "agent log" in proc.stdout
    assert_nothing_left(libvirtd, state_dir)
    assert os.path.exists(os.path.join(state_dir, "agent.log"))   # kept to look into

    for run in (1, 2):
        proc, took = run_demo(state_dir)
        assert proc.returncode == 0, f"run {run}: exit {proc.returncode}"
        for line in KEY_LINES:
            assert line in proc.stdout, f"run {run}: {line!r} not printed"
        assert proc.stdout.count("ok    guest reads") == 7
        assert ("cold merge: not available in this build" in proc.stdout
                or "ok    cold merge done" in proc.stdout)
        assert "FAIL" not in proc.stdout
        assert took < 120, f"run {run} took {took:.0f}s"
        assert_nothing_left(libvirtd, state_dir)
        assert not os.path.exists(state_dir)
