"""`vmhost lab`: hosts on one machine, each in its own namespaces with its own
libvirtd, virtlogd, sanlock daemon and agent, driven through the real CLI."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import uuid

import libvirt
import pytest

from conftest import VM_PREFIX, wait_for
from labutil import (lab_cli, lab_dir, lab_up, shared_domain,  # noqa: F401 - lab_dir: fixture
                     wait_acquired)
from vmhost.client import Client, RpcError
from vmhost.lab import procs
from vmhost.lab.lab import Lab

# A VM with no disk: enough to have a QEMU process on a host.
DISKLESS_VM = """<domain type='kvm'><name>{name}</name><memory unit='MiB'>32</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>"""


def status(lab_dir: str) -> dict:
    return json.loads(lab_cli(lab_dir, "status", "--json"))


def ping(url: str) -> bool:
    with Client(url, timeout=10) as c:
        return c.call("Host.ping")


def commands(pids: list[int]) -> set[str]:
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                names.add(f.read().strip())
        except FileNotFoundError:
            pass
    return names


def test_lab_up_status_poweroff_boot_down(lab_dir, workdir):
    storage = os.path.join(workdir, "shared")
    up = json.loads(lab_cli(lab_dir, "up", "--hosts", "3", "--storage", storage, "--json"))
    assert up == status(lab_dir)
    assert up["storage"] == storage and os.path.isdir(storage)
    hosts = {h["name"]: h for h in up["hosts"]}
    assert [(h["name"], h["hostId"], h["up"]) for h in up["hosts"]] == [
        ("host1", 1, True), ("host2", 2, True), ("host3", 3, True)]
    assert len({h["url"] for h in up["hosts"]}) == 3
    # Idempotent: a second `up` starts nothing new.
    lab = Lab(lab_dir)
    before = {name: sorted(lab.pids(name)) for name in hosts}
    assert json.loads(lab_cli(lab_dir, "up", "--hosts", "3", "--json")) == up
    assert {name: sorted(lab.pids(name)) for name in hosts} == before

    # Each host: its agent answers, its libvirtd is its own (hostname, domains).
    conns = {name: libvirt.open(h["libvirtUri"]) for name, h in hosts.items()}
    try:
        for name, h in hosts.items():
            assert ping(h["url"]) is True
            assert conns[name].getHostname() == name
        defined = conns["host1"].defineXML(DISKLESS_VM.format(name=VM_PREFIX + "lab-defined"))
        assert defined.name() in [d.name() for d in conns["host1"].listAllDomains()]
        for other in ("host2", "host3"):
            assert conns[other].listAllDomains() == []
        # A running QEMU on host2, so the power cut has a VM to kill.
        conns["host2"].createXML(DISKLESS_VM.format(name=VM_PREFIX + "lab-running"), 0)
    finally:
        for conn in conns.values():
            conn.close()

    host2 = lab.pids("host2")
    assert {"libvirtd", "virtlogd", "sanlock", "qemu-system-x86"} <= commands(host2)
    assert len(commands(host2)) >= 5   # and the agent (python) and the host's init

    lab_cli(lab_dir, "poweroff", "host2")
    assert [pid for pid in host2 if procs.start_time(pid)] == []
    after = {h["name"]: h["up"] for h in status(lab_dir)["hosts"]}
    assert after == {"host1": True, "host2": False, "host3": True}
    assert ping(hosts["host1"]["url"]) and ping(hosts["host3"]["url"])

    lab_cli(lab_dir, "boot", "host2")
    assert ping(hosts["host2"]["url"]) is True
    conn = libvirt.open(hosts["host2"]["libvirtUri"])
    try:
        assert conn.getHostname() == "host2"
        assert conn.listAllDomains() == []      # a reboot: the transient VM is gone
    finally:
        conn.close()

    everything = [pid for name in hosts for pid in lab.pids(name)]
    assert len(everything) >= 15
    lab_cli(lab_dir, "down")
    assert [pid for pid in everything if procs.start_time(pid)] == []
    assert [h["up"] for h in status(lab_dir)["hosts"]] == [False, False, False]
    assert os.path.isdir(storage)


def test_two_hosts_share_a_posixfs_domain(lab_dir, workdir):
    storage = os.path.join(workdir, "shared")
    hosts = json.loads(lab_cli(lab_dir, "up", "--hosts", "2", "--storage", storage,
                               "--json"))["hosts"]
    h1, h2 = (Client(h["url"], timeout=30) for h in hosts)
    sd = str(uuid.uuid4())
    assert h1.call("StorageDomain.create", storagedomainID=sd, domainType=6, typeArgs=storage,
                   name="shared")["type"] == "posixfs"
    # host2 registers it from the storage alone; connecting twice changes nothing.
    info = h2.call("StorageDomain.connect", storagedomainID=sd, domainType="posixfs",
                   typeArgs=storage)
    assert (info["name"], info["type"]) == ("shared", "posixfs")
    assert h2.call("StorageDomain.connect", storagedomainID=sd, domainType=6,
                   typeArgs=storage)["uuid"] == sd
    for h in hosts:
        wait_acquired(h["url"], sd)
    # Each host's own sanlock daemon sees both host ids alive in the lockspace (from its
    # next renewal on: it reads the other delta leases then).
    def live_host_ids(name: str) -> set[int]:
        out = lab_cli(lab_dir, "exec", name, "sanlock", "client", "host_status")
        assert f"lockspace {sd}" in out, out
        return {int(line.split()[0]) for line in out.splitlines()
                if line[:1].isdigit() and "timestamp 0" not in line}
    for h in hosts:
        wait_for(lambda: live_host_ids(h["name"]) == {1, 2}, 30,
                 f"{h['name']}'s sanlock to see host ids 1 and 2 alive")
    # A wrong directory is refused and registers nothing.
    with pytest.raises(RpcError) as e:
        h2.call("StorageDomain.connect", storagedomainID=str(uuid.uuid4()), domainType=6,
                typeArgs=storage)
    assert e.value.code == 358

    # VM leases: both hosts create leases at once in the one xleases index, one of them
    # the same lease from both sides; each host then finds every lease at one offset.
    own = {url: [str(uuid.uuid4()) for _ in range(4)] for url in (h["url"] for h in hosts)}
    both = str(uuid.uuid4())

    def create_all(url: str) -> dict[str, int]:
        with Client(url, timeout=60) as c:
            return {vm: c.call("Lease.create", lease={"sd_id": sd, "lease_id": vm})["offset"]
                    for vm in own[url] + [both]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        made = list(pool.map(create_all, own))
    assert made[0][both] == made[1][both]
    offsets = {**made[0], **made[1]}
    assert len(set(offsets.values())) == len(offsets) == 9
    for c in (h1, h2):
        for vm, offset in offsets.items():
            info = c.call("Lease.info", lease={"sd_id": sd, "lease_id": vm})
            assert (info["offset"], info["path"]) == (offset, f"{storage}/{sd}/dom_md/xleases")
    h2.call("Lease.delete", lease={"sd_id": sd, "lease_id": both})
    with pytest.raises(RpcError) as e:
        h1.call("Lease.info", lease={"sd_id": sd, "lease_id": both})
    assert e.value.code == 936

    # host2 leaves (sanlock frees its host id) and comes back.
    h2.call("StorageDomain.disconnect", storagedomainID=sd)
    assert sd not in h2.call("Host.getStorageRepoStats")
    assert f"lockspace {sd}" not in lab_cli(lab_dir, "exec", "host2", "sanlock", "client",
                                            "host_status")
    h2.call("StorageDomain.connect", storagedomainID=sd, domainType=6, typeArgs=storage)
    wait_acquired(hosts[1]["url"], sd)

    # After a power cut and a boot, host1's agent joins its registered domain again.
    lab_cli(lab_dir, "poweroff", "host1")
    lab_cli(lab_dir, "boot", "host1")
    wait_acquired(hosts[0]["url"], sd)
    h1.close()
    h2.close()


def sanlock_resources(lab_dir: str, host: str) -> dict[str, int]:
    """Resources this host's sanlock daemon holds: "lockspace:name" -> holder pid."""
    out = lab_cli(lab_dir, "exec", host, "sanlock", "client", "status", "-o", "p")
    held, pid = {}, 0
    for line in out.splitlines():
        if line.startswith("p ") and line.split()[1].isdigit():
            pid = int(line.split()[1])
        elif line.startswith("r "):
            lockspace, name = line.split()[1].split(":")[:2]
            held[f"{lockspace}:{name}"] = pid
    return held


def test_a_vm_on_a_shared_domain_runs_holding_its_lease(lab_dir, workdir):
    storage = os.path.join(workdir, "shared")
    hosts = lab_up(lab_dir, storage, 2)
    sd = shared_domain(hosts, storage)
    h1, h2 = (Client(h["url"], timeout=60) for h in hosts)
    img, vol = str(uuid.uuid4()), str(uuid.uuid4())
    h1.call("Volume.create", storagedomainID=sd, imageID=img, volumeID=vol, size=16 << 20,
            volFormat="COW", preallocate="SPARSE", diskType="DATA", desc="",
            srcImgUUID="00000000-0000-0000-0000-000000000000",
            srcVolUUID="00000000-0000-0000-0000-000000000000")

    # A disk on a shared domain: the VM gets a lease keyed by its UUID, held by its QEMU.
    vm = str(uuid.uuid4())
    params = {"vmName": VM_PREFIX + vm[:8], "memSize": 32, "devices": [
        {"device": "disk", "domainID": sd, "imageID": img, "volumeID": vol}]}
    h1.call("VM.create", vmID=vm, vmParams=params)
    held = sanlock_resources(lab_dir, "host1")
    assert f"{sd}:{vm}" in held, held
    holder = lab_cli(lab_dir, "exec", "host1", "cat", f"/proc/{held[f'{sd}:{vm}']}/comm")
    assert holder.strip() == "qemu-system-x86"      # pids as host1's namespace sees them
    lease = h2.call("Lease.info", lease={"sd_id": sd, "lease_id": vm})
    # host2 cannot run it (on one machine QEMU's image locks may refuse it first).
    with pytest.raises(RpcError):
        h2.call("VM.create", vmID=vm, vmParams=params)
    assert h2.call("Host.getVMList") == []

    # A lease device without disks: only sanlock can refuse, and it says why.
    other = str(uuid.uuid4())
    h1.call("Lease.create", lease={"sd_id": sd, "lease_id": other})
    leased = {"vmName": VM_PREFIX + other[:8], "memSize": 32, "devices": [
        {"device": "lease", "type": "lease", "sd_id": sd, "lease_id": other}]}
    h1.call("VM.create", vmID=other, vmParams=leased)
    with pytest.raises(RpcError) as e:
        h2.call("VM.create", vmID=other, vmParams=leased)
    assert e.value.code == 651 and "held by another host" in e.value.message
    assert h2.call("Host.getVMList") == []
    # libvirt gives the lease up while a VM is paused: another host can then start the VM,
    # and the paused one cannot resume.
    h1.call("VM.pause", vmID=other)
    wait_for(lambda: f"{sd}:{other}" not in sanlock_resources(lab_dir, "host1"), 30,
             "host1 to release the paused VM's lease")
    h2.call("VM.create", vmID=other, vmParams=leased)
    assert f"{sd}:{other}" in sanlock_resources(lab_dir, "host2")
    with pytest.raises(RpcError) as e:
        h1.call("VM.cont", vmID=other)
    assert e.value.code == 651 and "stays paused" in e.value.message
    assert h1.call("VM.getStats", vmID=other)[0]["status"] == "Paused"
    h1.call("VM.destroy", vmID=other)
    assert lease["offset"] != h1.call("Lease.info", lease={"sd_id": sd, "lease_id": other})["offset"]
    h1.close()
    h2.close()


def test_one_writer_per_image(lab_dir, workdir):
    """While host1 runs a VM on an image, host2 changes nothing of that image; once the
    VM is gone, host2 may (holding the image's lease meanwhile)."""
    storage = os.path.join(workdir, "shared")
    hosts = lab_up(lab_dir, storage, 2)
    sd = shared_domain(hosts, storage)
    h1, h2 = (Client(h["url"], timeout=60) for h in hosts)
    img, base, top, spare = (str(uuid.uuid4()) for _ in range(4))
    blank = "00000000-0000-0000-0000-000000000000"

    def create(c: Client, vol: str, parent: str = blank) -> None:
        c.call("Volume.create", storagedomainID=sd, imageID=img, volumeID=vol, size=16 << 20,
               volFormat="COW", preallocate="SPARSE", diskType="DATA", desc="",
               srcImgUUID=img if parent != blank else blank, srcVolUUID=parent)
    create(h2, base)                       # no VM yet: any host, under the image lease
    create(h2, top, parent=base)
    vm = str(uuid.uuid4())
    h1.call("VM.create", vmID=vm, vmParams={"vmName": VM_PREFIX + vm[:8], "memSize": 32,
            "devices": [{"device": "disk", "domainID": sd, "imageID": img, "volumeID": top}]})
    assert f"{sd}:{img}" in sanlock_resources(lab_dir, "host1")     # held by the VM's QEMU
    before = sorted(os.listdir(os.path.join(storage, sd, "images", img)))
    for call in (lambda: create(h2, spare, parent=top),
                 lambda: h2.call("Volume.delete", storagedomainID=sd, imageID=img,
                                 volumeID=top),
                 lambda: h2.call("Image.reconcileVolumeChain", storagedomainID=sd,
                                 imageID=img, leafVolID=top)):
        with pytest.raises(RpcError) as e:
            call()
        assert e.value.code == 651 and "held by another host" in e.value.message
    assert sorted(os.listdir(os.path.join(storage, sd, "images", img))) == before
    # The VM's own host still writes its chain (a snapshot's new leaf).
    create(h1, spare, parent=top)
    h1.call("VM.destroy", vmID=vm)
    assert h2.call("Image.reconcileVolumeChain", storagedomainID=sd, imageID=img,
                   leafVolID=top) == [base, top]
    h2.call("Volume.delete", storagedomainID=sd, imageID=img, volumeID=spare)
    h1.close()
    h2.close()
