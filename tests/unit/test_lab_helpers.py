"""`vmhost lab` helpers that need no namespaces: libvirt config of a host, pids."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from vmhost.lab import procs
from vmhost.lab.cli import _env_pairs
from vmhost.lab.lab import LIBVIRT_CONF, LabError, _libvirt_config


def settings(path: str) -> list[tuple[str, str]]:
    with open(path) as f:
        return [tuple(x.strip() for x in line.split("=", 1)) for line in f
                if re.match(r"\s*\w+\s*=", line)]


def test_a_hosts_libvirt_config_is_the_machines_with_sanlock_idempotently(tmp_path):
    etc = str(tmp_path / "etc-libvirt")
    _libvirt_config(etc)
    first = {name: open(os.path.join(etc, name)).read() for name in LIBVIRT_CONF}
    _libvirt_config(etc)
    assert {name: open(os.path.join(etc, name)).read() for name in LIBVIRT_CONF} == first
    qemu = settings(os.path.join(etc, "qemu.conf"))
    assert [v for k, v in qemu if k == "lock_manager"] == ['"sanlock"']
    assert [v for k, v in qemu if k == "cgroup_controllers"] == ["[ ]"]
    assert dict(settings(os.path.join(etc, "qemu-sanlock.conf"))) == {
        "auto_disk_leases": "0", "require_lease_for_disks": "0"}
    assert os.path.exists(os.path.join(etc, "libvirtd.conf"))
    assert not [n for n in os.listdir(os.path.join(etc, "qemu")) if n.endswith(".xml")]


def test_pids_are_known_with_their_start_time():
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = procs.start_time(child.pid)
        assert started is not None and procs.alive(child.pid, started)
        assert not procs.alive(child.pid, started + 1)      # a reused pid is another process
        assert child.pid in procs.children(os.getpid())
        assert child.pid in procs.pids_in_namespace(procs.pid_namespace(os.getpid()))
        assert not procs.kill(child.pid, started + 1, 9)    # never signalled by mistake
        assert procs.sigkill(child.pid, started)
        child.wait(10)
        assert procs.start_time(child.pid) is None
    finally:
        child.kill()
        child.wait()


def test_agent_env_pairs_are_parsed_and_checked():
    assert _env_pairs(["VMHOST_FAILPOINT=merge.pivot.after", "A=x=y"]) == {
        "VMHOST_FAILPOINT": "merge.pivot.after", "A": "x=y"}
    for bad in ("NOVALUE", "=x", "1A=x"):
        with pytest.raises(LabError, match="KEY=VALUE"):
            _env_pairs([bad])
