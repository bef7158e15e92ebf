"""The stage of `vmhost demo --fleet`: a lab of two hosts (`vmhost lab`, under
the state directory) sharing one posixfs storage domain. The story acts on one
host at a time (`on`); the clean-up is `vmhost lab down`, whatever happened."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil

import libvirt

from vmhost.client import Client
from vmhost.demo.stage import DemoVm, VmActions
from vmhost.lab.lab import DEFAULT_IO_TIMEOUT, Lab
from vmhost.testing.fleet import shared_domain

HOSTS = 2


class FleetStage(VmActions):
    def __init__(self, state_dir: str, io_timeout: int = DEFAULT_IO_TIMEOUT):
        self.state_dir = os.path.abspath(state_dir)
        self.storage_root = os.path.join(self.state_dir, "storage")
        self.lab = Lab(os.path.join(self.state_dir, "lab"))
        self.log_path = os.path.join(self.lab.dir, "hosts", "host*", "log")
        self.io_timeout = io_timeout
        self.vm_prefix = f"vmhost-fleet-{hashlib.sha1(self.state_dir.encode()).hexdigest()[:6]}-"
        self.sd = ""
        self.hosts: dict[str, dict] = {}      # name -> `vmhost lab status` entry
        self.host = ""                        # the host the story acts on
        self.vm: DemoVm | None = None
        self.conn: libvirt.virConnect | None = None
        self._client: Client | None = None
        # What the story learns on the way.
        self.cut = 0.0                        # time.monotonic() of host1's power cut
        self.knew: list[str] = []             # the chain the engine knew
        self.failover = 0.0                   # seconds from the cut to the VM running

    # --- set-up and clean-up ---------------------------------------------------

    def prepare(self) -> None:
        """Start from nothing, whatever an earlier run left (idempotent)."""
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.lab.down()                       # a lab an interrupted run left up
        shutil.rmtree(self.state_dir, ignore_errors=True)
        os.makedirs(self.storage_root, mode=0o755)
        os.chmod(self.state_dir, 0o755)       # QEMU (user libvirt-qemu) opens the volumes

    def up(self) -> list[dict]:
        """The lab's hosts, up, and a posixfs domain all of them joined."""
        hosts = self.lab.up(HOSTS, self.storage_root, self.io_timeout)
        self.hosts = {h["name"]: h for h in hosts}
        self.sd = shared_domain(hosts, self.storage_root, name="demo-fleet")
        return hosts

    def cleanup(self, keep_vm: bool = False) -> list[str]:
        self._disconnect()
        if keep_vm:
            return [f"lab kept running: vmhost lab --dir {self.lab.dir} status"]
        self.lab.down()
        return ["vmhost lab down: every host stopped, its VMs with it"]

    def remove_state(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # --- hosts ---------------------------------------------------------------------

    def on(self, name: str) -> None:
        """Act on host `name` from now on: its agent and its libvirtd."""
        self._disconnect()
        h = self.hosts[name]
        self.host, self._client = name, Client(h["url"], timeout=60)
        self.conn = libvirt.open(h["libvirtUri"])

    @property
    def client(self) -> Client:
        return self._client

    def url(self, name: str) -> str:
        return self.hosts[name]["url"]

    def poweroff(self, name: str) -> None:
        """`vmhost lab poweroff NAME`: every process of the host killed at once."""
        if name == self.host:
            self._disconnect()
        self.lab.poweroff(name)

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.conn is not None:
            with contextlib.suppress(libvirt.libvirtError):   # its host may be gone
                self.conn.close()
        self._client = self.conn = None
