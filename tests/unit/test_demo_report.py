"""The demo's report (exit status from its checks) and the rule that the
helpers in vmhost.testing stay out of the agent's import path."""
from __future__ import annotations

import io
import subprocess
import sys

from vmhost.demo.report import Report
from vmhost.demo.stage import DemoVm
from vmhost.demo.views import table


def test_all_checks_passed_exits_0():
    out = io.StringIO()
    r = Report(out)
    r.say("a step")
    r.check(True, "a claim")
    assert r.summary() == 0
    text = out.getvalue()
    assert "] a step\n" in text and "ok    a claim" in text
    assert text.rstrip().splitlines()[-1].startswith("PASS: all 1 checks passed")


def test_a_failed_check_or_a_stopped_step_exits_1_naming_each():
    out = io.StringIO()
    r = Report(out)
    r.check(True, "fine")
    assert r.check(False, "chains agree", "qemu-img differs") is False
    r.error("step 3 (crash)", TimeoutError("no pending work"))
    assert r.summary(" (agent log: x)") == 1
    text = out.getvalue()
    assert "FAIL  chains agree (qemu-img differs)" in text
    assert "FAIL  step 3 (crash) stopped: TimeoutError: no pending work" in text
    last = text.rstrip().splitlines()[-1]
    assert last.startswith("FAIL: 2 of 3 checks failed")
    assert "chains agree" in last and "step 3 (crash): no pending work" in last
    assert last.endswith("(agent log: x)")


def test_views_side_by_side_base_first_with_labels():
    vm = DemoVm("id", "name", "img", ["a" * 36, "b" * 36], {"a" * 36: "base", "b" * 36: "snap1"})
    rows = table(vm, {"agent": ["a" * 36, "b" * 36], "libvirt": ["a" * 36]})
    assert rows[1].split() == ["0", "base", "base"]
    assert rows[2].split() == ["1", "snap1", "-"]


def test_the_agent_never_imports_the_test_helpers():
    code = ("import sys, vmhost.agent, vmhost.cli.main, vmhost.api.bridge; "
            "print(sorted(m for m in sys.modules if m.startswith(('vmhost.testing', 'vmhost.demo'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
