"""Helpers for tests on `vmhost lab` (several hosts on this machine)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid

import libvirt
import pytest

from conftest import ROOT, VM_PREFIX
from vmhost.client import Client
from vmhost.ids import BLANK_UUID
from vmhost.lab.lab import Lab
from vmhost.testing import chains
from vmhost.testing.chains import read_metadata  # noqa: F401 - for the tests
from vmhost.testing.fleet import engine_start, shared_domain, wait_acquired  # noqa: F401 - idem

MiB = 1 << 20


def lab_cli(lab_dir: str, *args: str, timeout: float = 180) -> str:
    done = subprocess.run([sys.executable, "-m", "vmhost.cli.main", "lab", "--dir", lab_dir, *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, f"lab {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def lab_dir(workdir):
    path = os.path.join(workdir, "lab")
    yield path
    # Whatever happened, nothing of the lab may outlive the test.
    subprocess.run([sys.executable, "-m", "vmhost.cli.main", "lab", "--dir", path, "down"],
                   env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)


def lab_up(lab_dir: str, storage: str, hosts: int) -> list[dict]:
    return json.loads(lab_cli(lab_dir, "up", "--hosts", str(hosts), "--storage", storage,
                              "--json"))["hosts"]


def create_volume(c: Client, sd: str, img: str, parent: str | None = None) -> str:
    vol = str(uuid.uuid4())
    c.call("Volume.create", storagedomainID=sd, imageID=img, volumeID=vol, size=64 * MiB,
           volFormat="COW", preallocate="SPARSE", diskType="DATA", desc="failover",
           srcImgUUID=img if parent else BLANK_UUID, srcVolUUID=parent or BLANK_UUID)
    return vol


def vm_params(vm: str, sd: str, img: str, leaf: str) -> dict:
    """VM.create's vmParams of a one-disk test VM, as the engine knows it: on `leaf`."""
    return {"vmName": VM_PREFIX + vm[:8], "memSize": 64, "devices": [
        {"device": "disk", "domainID": sd, "imageID": img, "volumeID": leaf}]}


def chain_views(c: Client, conn: libvirt.virConnect, vm: str, img_dir: str) -> list[list[str]]:
    """host's getVMFullList, its live XML, qemu-img and the metadata, each base first."""
    return list(chains.four_views(c, conn.lookupByUUIDString(vm), vm, img_dir).values())


def file_digests(directory: str, suffix: str = "") -> dict[str, tuple[str, int]]:
    """name -> (sha256, mtime_ns) of the files in `directory` ending in `suffix`."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(suffix):
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[name] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def boot_with_failpoint(lab_dir: str, name: str, point: str) -> None:
    """Restart a lab host whose agent dies (SIGKILL) at failpoint `point`."""
    lab_cli(lab_dir, "poweroff", name)
    lab_cli(lab_dir, "boot", name, "--agent-env", f"VMHOST_FAILPOINT={point}")


def agent_pid(lab_dir: str, host: str) -> int:
    """The pid (outside) of a lab host's agent."""
    for pid in Lab(lab_dir).pids(host):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except FileNotFoundError:
            continue
        if b"serve" in argv and b"--host-id" in argv:
            return pid
    raise AssertionError(f"{host} runs no agent")


def stopped(pid: int) -> bool:
    """Whether the process is stopped (a `<point>:<n>:stop` failpoint froze it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False
