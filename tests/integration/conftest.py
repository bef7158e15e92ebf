"""Fixtures for tests on the real stack: a real `vmhost serve`, real libvirtd,
real QEMU, real qemu-img. A missing piece fails the test; nothing is skipped."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import uuid

import libvirt
import pytest

from vmhost.ids import BLANK_UUID
from vmhost.storage import qemu_img
from vmhost.storage.metadata import VolumeMetadata
from vmhost.testing import guestio
from vmhost.testing.agentproc import AgentProcess
from vmhost.testing.outage import storage_hidden  # noqa: F401 (tests import it from here)
from vmhost.testing.volumes import create_volume
from vmhost.testing.waiting import wait_for
from vmhost.virt import domxml

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Storage must support O_DIRECT (drives use cache='none'): keep it off tmpfs.
TEST_BASE = os.environ.get("VMHOST_TEST_DIR", "/var/tmp/vmhost-tests")
# Per test session: concurrent test runs on one machine never touch each other's VMs.
VM_PREFIX = f"vmhost-test-{uuid.uuid4().hex[:6]}-"


@pytest.fixture(scope="session", autouse=True)
def libvirtd():
    """libvirtd must answer; start it the way `make setup` does if it does not."""
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "start-libvirt.sh")], check=True)
    conn = libvirt.open("qemu:///system")
    yield conn
    _destroy_test_domains(conn)
    conn.close()


def _destroy_test_domains(conn: libvirt.virConnect) -> None:
    try:
        conn.getLibVersion()
    except libvirt.libvirtError:   # libvirtd was restarted by the test
        conn = libvirt.open("qemu:///system")
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(VM_PREFIX):
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass


@pytest.fixture
def workdir(request):
    path = os.path.join(TEST_BASE, f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path, mode=0o755)
    os.chmod(TEST_BASE, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Env:
    agent: AgentProcess
    sd: str
    storage_root: str
    conn: libvirt.virConnect

    @property
    def client(self):
        return self.agent.client

    def call(self, method: str, **params):
        return self.agent.client.call(method, **params)

    # --- storage ----------------------------------------------------------

    def create_volume(self, img: str, vol: str | None = None, parent: str | None = None,
                      size: int = 64 * MiB, fmt: str = "COW") -> str:
        return create_volume(self.client, self.sd, img, vol=vol, parent=parent, size=size,
                             fmt=fmt)

    def image_dir(self, img: str) -> str:
        return os.path.join(self.storage_root, self.sd, "images", img)

    # --- VMs --------------------------------------------------------------

    def create_vm(self, images: list[tuple[str, str]], **params) -> str:
        vm = str(uuid.uuid4())
        devices = [{"device": "disk", "domainID": self.sd, "imageID": img, "volumeID": leaf}
                   for img, leaf in images]
        self.call("VM.create", vmID=vm, vmParams={
            "vmName": f"{VM_PREFIX}{vm[:8]}", "memSize": 64, "devices": devices, **params})
        return vm

    def snapshot(self, vm: str, img: str, base: str) -> str:
        new = self.create_volume(img, parent=base)
        self.call("VM.snapshot", vmID=vm, snapDrives=[
            {"domainID": self.sd, "imageID": img, "baseVolumeID": base, "volumeID": new}])
        return new

    def dom(self, vm: str) -> libvirt.virDomain:
        return self.conn.lookupByUUIDString(vm)

    def live_chain(self, vm: str, drive: str = "vda") -> list[str]:
        return [n.volume for n in domxml.live_disks(self.dom(vm).XMLDesc(0))[drive].chain]

    def agent_chain(self, vm: str, img: str) -> list[str]:
        info = self.call("Host.getVMFullList", vmList=[vm])[0]
        drive = next(d for d in info["devices"] if d["imageID"] == img)
        return [v["volumeID"] for v in drive["volumeChain"]]

    def metadata_chain(self, img: str, leaf: str) -> list[str]:
        """Walk PUUID pointers in the .meta files themselves, leaf to base."""
        chain, vol = [], leaf
        while vol != BLANK_UUID:
            chain.append(vol)
            vol = self.metadata(img, vol).parent
        return chain[::-1]

    def metadata(self, img: str, vol: str) -> VolumeMetadata:
        with open(os.path.join(self.image_dir(img), vol + ".meta"), "rb") as f:
            return VolumeMetadata.parse(f.read())

    def qemu_chain(self, img: str, leaf: str) -> list[str]:
        infos = qemu_img.info(os.path.join(self.image_dir(img), leaf), backing_chain=True)
        return [os.path.basename(i["filename"]) for i in reversed(infos)]

    def assert_four_views(self, vm: str, img: str, drive: str = "vda") -> list[str]:
        """getVMFullList, the live XML, qemu-img and the metadata tell one chain."""
        agent = self.agent_chain(vm, img)
        assert self.live_chain(vm, drive) == agent, "libvirt live XML vs Host.getVMFullList"
        assert self.qemu_chain(img, agent[-1]) == agent, "qemu-img --backing-chain vs agent"
        assert self.metadata_chain(img, agent[-1]) == agent, "metadata parents vs agent"
        return agent

    def vm_jobs(self, vm: str) -> dict:
        return self.call("VM.getStats", vmID=vm)[0]["vmJobs"]

    def wait_job_gone(self, vm: str, job: str, timeout: float = 60.0) -> None:
        wait_for(lambda: job not in self.vm_jobs(vm), timeout, f"job {job} to leave vmJobs")

    def job_outcome(self, vm: str, job: str, timeout: float = 60.0) -> dict:
        """Every job leaves vmJobs once cleaned up; its outcome is in the history."""
        self.wait_job_gone(vm, job, timeout)
        return next(e for e in self.call("Host.getJobHistory") if e["id"] == job)


class Guest:
    """Guest writes through QEMU's monitor, replayed offline into a reference
    image built with qemu-img/qemu-io: after any chain change the VM's disk
    must read exactly like the reference."""

    def __init__(self, env: Env, vm: str, workdir: str, drive: str = "vda",
                 size: int = 64 * MiB):
        self.env, self.vm, self.drive = env, vm, drive
        self.reference = os.path.join(workdir, f"reference-{vm[:8]}-{drive}.qcow2")
        qemu_img.create(self.reference, "qcow2", size=size)
        self.writes: list[tuple[int, int, int]] = []

    def write(self, pattern: int, offset: int, length: int) -> None:
        guestio.write(self.env.dom(self.vm), self.drive, pattern, offset, length)
        qemu_img.io(self.reference, f"write -P {pattern:#x} {offset} {length}")
        self.writes.append((pattern, offset, length))

    def assert_intact(self, img: str) -> None:
        dom = self.env.dom(self.vm)
        # Through the running VM: the last write to each range wins.
        for pattern, offset, length in self._visible():
            guestio.verify(dom, self.drive, pattern, offset, length)
        # On disk, after QEMU flushed its caches: the chain equals the reference.
        guestio.qemu_io(dom, self.drive, "flush")
        leaf = os.path.join(self.env.image_dir(img), self.env.agent_chain(self.vm, img)[-1])
        assert qemu_img.compare(self.reference, leaf), "chain differs from the reference image"

    def _visible(self) -> list[tuple[int, int, int]]:
        """Byte ranges with the pattern a reader must see (last writer wins)."""
        owner: dict[int, int] = {}
        for pattern, offset, length in self.writes:
            for block in range(offset // 65536, (offset + length) // 65536):
                owner[block] = pattern
        return [(p, b * 65536, 65536) for b, p in sorted(owner.items())]


def chain_with_data(env: Env, workdir: str, data_mib: int = 16):
    """A VM whose drive is base <- mid <- leaf: 1 MiB written in the base,
    `data_mib` MiB in mid (from 8 MiB on: what a merge of mid has to copy) and
    1 MiB in the leaf. Returns (vm, img, [base, mid, leaf], guest)."""
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    g = Guest(env, vm, workdir)
    g.write(0x11, 0, MiB)
    mid = env.snapshot(vm, img, base)
    for off in range(0, data_mib, 8):
        g.write(0x22, (8 + off) * MiB, min(8, data_mib - off) * MiB)
    leaf = env.snapshot(vm, img, mid)
    g.write(0x33, 40 * MiB, MiB)
    return vm, img, [base, mid, leaf], g


@contextlib.contextmanager
def small_domain(workdir: str, size: str, libvirtd) -> "Env":
    """An agent whose storage domain lives on its own small ext4 (loop device,
    no blocks reserved for root), so tests can fill it up for real."""
    image = os.path.join(workdir, "fs.img")
    root = os.path.join(workdir, "storage")
    os.makedirs(root)
    subprocess.run(["truncate", "-s", size, image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", image], check=True)
    subprocess.run(["mount", "-o", "loop", image, root], check=True)
    try:
        os.chmod(root, 0o755)
        e = Env(agent=start_agent(os.path.join(workdir, "state")), sd=str(uuid.uuid4()),
                storage_root=root, conn=libvirtd)
        try:
            e.call("StorageDomain.create", storagedomainID=e.sd, domainType="localfs",
                   typeArgs=root, name="small")
            yield e
        finally:
            e.agent.stop()
            _destroy_test_domains(libvirtd)
    finally:
        subprocess.run(["umount", "-l", root], check=False)


def start_agent(state_dir: str, **kw) -> AgentProcess:
    agent = AgentProcess(state_dir, extra_args=["--monitor-interval", "0.5", "--final-job-ttl", "0"],
                         **kw)
    agent.start().wait_ready()
    return agent


@pytest.fixture
def env(workdir, libvirtd):
    storage_root = os.path.join(workdir, "storage")
    os.makedirs(storage_root, mode=0o755)
    # A connection of its own: a test may restart libvirtd.
    e = Env(agent=start_agent(os.path.join(workdir, "state")), sd=str(uuid.uuid4()),
            storage_root=storage_root, conn=libvirt.open("qemu:///system"))
    try:
        e.call("StorageDomain.create", storagedomainID=e.sd, domainType="localfs",
               typeArgs=storage_root, name="test")
        yield e
    finally:
        e.agent.stop()  # the test may have replaced it with a restarted agent
        _destroy_test_domains(e.conn)
        _show_log(e.agent.log_path)


def _show_log(path: str, lines: int = 60) -> None:
    """Captured by pytest and shown only when the test failed."""
    try:
        with open(path, errors="replace") as f:
            print(f"--- last lines of {path}", *f.readlines()[-lines:], sep="")
    except OSError:
        pass


def tree_digest(root: str) -> dict[str, str]:
    """Every file under root with a hash of its content: 'nothing changed' checks."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.join(dirpath, d)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


# --- hung storage --------------------------------------------------------------

HUNG_OP_TIMEOUT = 3.0      # the agent's storage_op_timeout in hung_env
HUNG_WORKERS = 2           # its storage_workers: two hung calls park a domain's pool


@dataclasses.dataclass
class HungEnv:
    """One agent with two storage domains: `frozen` lives on a FUSE mount the
    test can freeze path by path (`fs`, see freezefs.py), `normal` on a plain
    directory. Both Envs share the agent, so either one's `call` will do."""
    frozen: Env
    normal: Env
    fs: "freezefs.FreezeFS"
    op_timeout: float = HUNG_OP_TIMEOUT

    def valid(self, e: Env) -> bool:
        """The domain's `valid` in Host.getStorageRepoStats."""
        return self.frozen.call("Host.getStorageRepoStats", domains=[e.sd])[e.sd]["valid"]


@pytest.fixture
def hung_env(workdir, libvirtd):
    """A HungEnv whose agent fails storage calls after HUNG_OP_TIMEOUT seconds.

    Freeze the volume metadata of the frozen domain (QEMU's I/O to the volume
    files keeps flowing) and release it again:

        def test_x(hung_env):
            h = hung_env
            with h.fs.frozen(*freezefs.METADATA):
                ...   # calls reading or writing .meta files hang in the kernel
            wait_for(lambda: h.valid(h.frozen), 30, "the frozen domain VALID")

    Teardown releases the freeze first, then stops the agent, destroys the
    test's VMs and unmounts the file system."""
    import freezefs

    state = os.path.join(workdir, "state")
    os.makedirs(state)
    config = os.path.join(state, "vmhost.toml")
    with open(config, "w") as f:
        f.write(f"storage_op_timeout = {HUNG_OP_TIMEOUT}\nstorage_workers = {HUNG_WORKERS}\n")
    fs = freezefs.FreezeFS(os.path.join(workdir, "fuse-source"),
                           os.path.join(workdir, "frozen")).start()
    agent = None
    try:
        os.chmod(fs.source, 0o755)
        normal_root = os.path.join(workdir, "storage")
        os.makedirs(normal_root, mode=0o755)
        agent = AgentProcess(state, extra_args=["--monitor-interval", "0.5", "--final-job-ttl", "0",
                                                "--config", config])
        agent.start().wait_ready()
        conn = libvirt.open("qemu:///system")
        h = HungEnv(frozen=Env(agent, str(uuid.uuid4()), fs.mountpoint, conn),
                    normal=Env(agent, str(uuid.uuid4()), normal_root, conn), fs=fs)
        for e, name in ((h.frozen, "frozen"), (h.normal, "normal")):
            e.call("StorageDomain.create", storagedomainID=e.sd, domainType="localfs",
                   typeArgs=e.storage_root, name=name)
        yield h
    finally:
        fs.release()
        if agent is not None:
            agent.stop()
            _show_log(agent.log_path)
        _destroy_test_domains(libvirtd)
        fs.stop()
