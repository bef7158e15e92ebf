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

from conftest import ROOT, wait_for
from vmhost.client import Client, RpcError
from vmhost.ids import BLANK_UUID
from vmhost.lab.lab import Lab
from vmhost.storage import qemu_img
from vmhost.storage.metadata import VolumeMetadata
from vmhost.virt import domxml

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


def wait_acquired(url: str, sd: str, timeout: float = 60) -> None:
    with Client(url, timeout=10) as c:
        wait_for(lambda: c.call("Host.getStorageRepoStats", domains=[sd])[sd]["acquired"],
                 timeout, f"{url} to acquire its host id in {sd}")


def lab_up(lab_dir: str, storage: str, hosts: int) -> list[dict]:
    return json.loads(lab_cli(lab_dir, "up", "--hosts", str(hosts), "--storage", storage,
                              "--json"))["hosts"]


def shared_domain(hosts: list[dict], storage: str) -> str:
    """A posixfs domain created by the first host, connected by the others, joined by all."""
    sd = str(uuid.uuid4())
    with Client(hosts[0]["url"], timeout=30) as c:
        c.call("StorageDomain.create", storagedomainID=sd, domainType=6, typeArgs=storage,
               name="shared")
    for h in hosts[1:]:
        with Client(h["url"], timeout=30) as c:
            c.call("StorageDomain.connect", storagedomainID=sd, domainType=6, typeArgs=storage)
    for h in hosts:
        wait_acquired(h["url"], sd)
    return sd


def retry(attempt, timeout: float, what: str, interval: float = 1.0):
    """Call attempt() until it returns a truthy value, `interval` apart, as an engine
    retries a verb (each attempt may be costly: a VM.create starts a QEMU)."""
    return wait_for(attempt, timeout, what, interval=interval)


def create_volume(c: Client, sd: str, img: str, parent: str | None = None) -> str:
    vol = str(uuid.uuid4())
    c.call("Volume.create", storagedomainID=sd, imageID=img, volumeID=vol, size=64 * MiB,
           volFormat="COW", preallocate="SPARSE", diskType="DATA", desc="failover",
           srcImgUUID=img if parent else BLANK_UUID, srcVolUUID=parent or BLANK_UUID)
    return vol


def read_metadata(img_dir: str, vol: str) -> VolumeMetadata:
    with open(os.path.join(img_dir, vol + ".meta"), "rb") as f:
        return VolumeMetadata.parse(f.read())


def chain_views(c: Client, conn: libvirt.virConnect, vm: str, img_dir: str) -> list[list[str]]:
    """host's getVMFullList, its live XML, qemu-img and the metadata, each base first."""
    info = c.call("Host.getVMFullList", vmList=[vm])[0]
    agent = [v["volumeID"] for v in info["devices"][0]["volumeChain"]]
    live = [n.volume for n in domxml.live_disks(
        conn.lookupByUUIDString(vm).XMLDesc(0))["vda"].chain]
    qemu = [os.path.basename(i["filename"]) for i in reversed(
        qemu_img.info(os.path.join(img_dir, agent[-1]), backing_chain=True))]
    meta, vol = [], agent[-1]
    while vol != BLANK_UUID:
        meta.append(vol)
        vol = read_metadata(img_dir, vol).parent
    return [agent, live, qemu, meta[::-1]]


def file_digests(directory: str, suffix: str = "") -> dict[str, tuple[str, int]]:
    """name -> (sha256, mtime_ns) of the files in `directory` ending in `suffix`."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(suffix):
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[name] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def engine_start(url: str, vm: str, params: dict, sd: str, img: str,
                 timeout: float = 150) -> str:
    """The engine's path to start a VM whose host died, on the host at `url`:
    VM.create, retried while another host holds the VM lease (651, a refusal
    that must change nothing); if the leaf is ILLEGAL (227), the offline
    Image.reconcileVolumeChain and a create on the leaf it returns.
    params["devices"][0]["volumeID"] is the leaf the engine knew; it is updated.
    Returns "create" or "reconcile+create"."""
    path = "create"
    with Client(url, timeout=180) as c:
        def started() -> bool:
            nonlocal path
            disk = params["devices"][0]
            try:
                c.call("VM.create", vmID=vm, vmParams=params)
                return True
            except RpcError as err:
                if err.code == 227:
                    try:
                        chain = c.call("Image.reconcileVolumeChain", storagedomainID=sd,
                                       imageID=img, leafVolID=disk["volumeID"])
                    except RpcError as rerr:
                        assert rerr.code == 651, rerr     # the image's lease lives on
                        return False
                    disk["volumeID"], path = chain[-1], "reconcile+create"
                    return False
                assert err.code == 651 and "held by another host" in err.message, err
                assert c.call("Host.getVMList") == []      # a refusal changes nothing
                return False
        retry(started, timeout, f"{url} to start VM {vm}")
    return path


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
