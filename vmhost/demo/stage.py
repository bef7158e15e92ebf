"""The demo's stage: its agent process, its storage domain and its VM, all
under one state directory, and the clean-up that leaves nothing behind (VMs
destroyed, mounts removed, agent stopped), also after a run that was killed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator

import libvirt

from vmhost.client import Client
from vmhost.testing import chains, guestio
from vmhost.testing.agentproc import AgentProcess
from vmhost.testing.outage import storage_hidden, unhide_all
from vmhost.testing.volumes import create_volume

MiB = 1 << 20
DISK_SIZE = 128 * MiB
AGENT_ARGS = ["--monitor-interval", "0.5", "--final-job-ttl", "0"]


@dataclasses.dataclass
class Write:
    """One guest write, remembered to be read back at the end."""
    pattern: int
    offset: int
    length: int
    into: str            # label of the volume that was the leaf when written


@dataclasses.dataclass
class DemoVm:
    id: str
    name: str
    img: str
    chain: list[str]                                  # base first, as the demo expects it
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    writes: list[Write] = dataclasses.field(default_factory=list)

    def label(self, vol: str) -> str:
        return self.labels.get(vol, vol[:8])

    def names(self, chain: list[str]) -> str:
        return " <- ".join(self.label(v) for v in chain)


class VmActions:
    """What a story does through one host's agent and libvirt: volumes on the
    storage domain `sd` (under `storage_root`), the VM, snapshots, guest writes,
    merges. A stage provides `client`, `conn`, `sd`, `storage_root`, `vm_prefix`."""
    conn: libvirt.virConnect | None
    sd: str
    storage_root: str
    vm_prefix: str
    vm: DemoVm | None                 # the VM the story follows

    @property
    def client(self) -> Client:
        raise NotImplementedError

    def call(self, verb: str, **params):
        return self.client.call(verb, **params)

    def image_dir(self, img: str) -> str:
        return os.path.join(self.storage_root, self.sd, "images", img)

    def create_volume(self, img: str, parent: str | None = None) -> str:
        return create_volume(self.client, self.sd, img, parent=parent, size=DISK_SIZE,
                             desc="demo")

    # --- the VM -------------------------------------------------------------------

    def create_vm(self) -> DemoVm:
        img = str(uuid.uuid4())
        base = self.create_volume(img)
        vm_id = str(uuid.uuid4())
        vm = DemoVm(vm_id, f"{self.vm_prefix}{vm_id[:8]}", img, [base], {base: "base"})
        self.call("VM.create", vmID=vm.id, vmParams=self.vm_params(vm))
        return vm

    def vm_params(self, vm: DemoVm) -> dict:
        """VM.create's vmParams of the VM as an engine knows it: on the leaf vm.chain[-1]."""
        return {"vmName": vm.name, "memSize": 64, "devices": [
            {"device": "disk", "domainID": self.sd, "imageID": vm.img,
             "volumeID": vm.chain[-1]}]}

    def dom(self, vm: DemoVm) -> libvirt.virDomain:
        return self.conn.lookupByUUIDString(vm.id)

    def snapshot(self, vm: DemoVm) -> str:
        new = self.create_volume(vm.img, parent=vm.chain[-1])
        self.call("VM.snapshot", vmID=vm.id, snapDrives=[
            {"domainID": self.sd, "imageID": vm.img, "baseVolumeID": vm.chain[-1],
             "volumeID": new}])
        vm.labels[new] = f"snap{len(vm.labels)}"
        vm.chain.append(new)
        return new

    def guest_write(self, vm: DemoVm, pattern: int, offset: int, length: int) -> Write:
        """What a guest would write, through QEMU (qemu-io in its monitor)."""
        guestio.write(self.dom(vm), "vda", pattern, offset, length)
        w = Write(pattern, offset, length, vm.label(vm.chain[-1]))
        vm.writes.append(w)
        return w

    def merge(self, vm: DemoVm, base: str, top: str, bandwidth: int) -> str:
        return self.call("VM.merge", vmID=vm.id, baseVolUUID=base, topVolUUID=top,
                         bandwidth=bandwidth,
                         drive={"domainID": self.sd, "imageID": vm.img, "volumeID": vm.chain[-1]})

    def vm_jobs(self, vm: DemoVm) -> dict:
        return self.call("VM.getStats", vmID=vm.id)[0].get("vmJobs") or {}

    def libvirt_job_running(self, vm: DemoVm) -> bool:
        return self.dom(vm).blockJobInfo("vda", 0) != {}

    def live_chain(self, vm: DemoVm) -> list[str]:
        return chains.live_chain(self.dom(vm))


class Stage(VmActions):
    """The stage of `make demo`: an agent of its own, a localfs domain."""

    def __init__(self, state_dir: str):
        self.state_dir = os.path.abspath(state_dir)
        self.storage_root = os.path.join(self.state_dir, "storage")
        self.agent_dir = os.path.join(self.state_dir, "agent")
        self.log_path = os.path.join(self.state_dir, "agent.log")
        self.pid_file = os.path.join(self.state_dir, "agent.pid")
        self.sd = str(uuid.uuid4())
        # Every VM of this state dir is named so: a run finds what an earlier
        # run left, and never touches a demo running elsewhere on the host.
        self.vm_prefix = f"vmhost-demo-{hashlib.sha1(self.state_dir.encode()).hexdigest()[:6]}-"
        self.agent: AgentProcess | None = None
        self.vm: DemoVm | None = None          # the VM the story follows
        self.conn: libvirt.virConnect | None = None

    # --- set-up and clean-up ---------------------------------------------------

    def prepare(self) -> None:
        """Start from nothing, whatever an earlier run left (idempotent)."""
        # Errors the demo handles are not printed by libvirt as well.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.conn = libvirt.open("qemu:///system")
        self._clear_leftovers()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        os.makedirs(self.storage_root, mode=0o755)
        os.chmod(self.state_dir, 0o755)   # QEMU (user libvirt-qemu) opens the volumes

    def cleanup(self, keep_vm: bool = False) -> list[str]:
        """Stop the agent, unmount, destroy the demo's VMs; returns what was done."""
        done = []
        if self.agent is not None:
            self.agent.stop()
            done.append("agent stopped")
        if os.path.isdir(self.storage_root) and unhide_all(self.storage_root):
            done.append("storage unhidden")
        if not keep_vm and self.conn is not None:
            n = self._destroy_demo_domains()
            done.append(f"{n} VM(s) destroyed")
        with contextlib.suppress(OSError):
            os.unlink(self.pid_file)
        return done

    def remove_state(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _clear_leftovers(self) -> None:
        self._kill_old_agent()
        if os.path.isdir(self.storage_root):
            unhide_all(self.storage_root)
        self._destroy_demo_domains()

    def _kill_old_agent(self) -> None:
        """The agent of an earlier run that was itself killed: its process
        group, by the id that run recorded, if it is still that agent."""
        try:
            with open(self.pid_file) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except (OSError, ValueError):
            return
        if "vmhost" in cmdline and self.agent_dir in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def _destroy_demo_domains(self) -> int:
        n = 0
        for dom in self.conn.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):   # gone meanwhile: fine
                if not dom.name().startswith(self.vm_prefix):
                    continue
                persistent = dom.isPersistent()   # a transient domain vanishes on destroy
                if dom.isActive():
                    dom.destroy()
                if persistent:
                    dom.undefine()
                n += 1
        return n

    # --- the agent -------------------------------------------------------------

    def start_agent(self) -> float:
        """Start (or restart) the agent; returns the seconds until it answered."""
        started = time.monotonic()
        self.agent = AgentProcess(self.agent_dir, log_path=self.log_path,
                                  extra_args=AGENT_ARGS).start()
        with open(self.pid_file, "w") as f:
            f.write(str(self.agent.proc.pid))
        self.agent.wait_ready()
        return time.monotonic() - started

    def kill_agent(self) -> None:
        self.agent.kill9()

    @property
    def client(self) -> Client:
        return self.agent.client

    # --- storage ----------------------------------------------------------------

    def create_domain(self) -> None:
        self.call("StorageDomain.create", storagedomainID=self.sd, domainType="localfs",
                  typeArgs=self.storage_root, name="demo")

    @contextlib.contextmanager
    def storage_hidden(self) -> Iterator[None]:
        with storage_hidden(self.storage_root):
            yield

    def domain_valid(self) -> bool:
        return self.call("Host.getStorageRepoStats", domains=[self.sd])[self.sd]["valid"]
