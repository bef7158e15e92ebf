"""Failpoints: a process dies, or freezes, exactly at the named point."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from vmhost import failpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POINT = "merge.pivot.after"
SCRIPT = ("from vmhost import failpoints\n"
          f"for _ in range(3): failpoints.hit({POINT!r})\n"
          "print('went on')\n")


def _run(spec: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT, failpoints.ENV: spec})


def test_a_failpoint_kills_the_process_there():
    proc = _run(POINT + ":2")
    assert proc.wait(30) == -signal.SIGKILL
    assert proc.stdout.read() == ""


def test_a_stop_failpoint_freezes_the_process_there_once():
    proc = _run(POINT + ":2:stop")
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(30) == 0
        assert proc.stdout.read() == "went on\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("spec", ["merge.nowhere", POINT + ":1:pause"])
def test_a_bad_spec_is_refused_naming_what_is_wrong(spec):
    with pytest.raises(ValueError, match="unknown"):
        failpoints._parse(spec)
