"""Shared pieces of the benchmarks: a bench environment (an agent, a storage
domain, tiny VMs), timing statistics, Markdown tables, result files, libvirt
and agent event recorders, an inotify access counter.

Every script imports this as `common` (the scripts run as `python bench/x.py`,
so bench/ is on sys.path). Nothing here asserts on time: these are
measurements, the report compares them with the targets.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable

import libvirt
import libvirt_qemu

from vmhost.client import Client, TransportError
from vmhost.storage import qemu_img
from vmhost.testing import guestio
from vmhost.testing.agentproc import AgentProcess
from vmhost.testing.volumes import create_volume
from vmhost.testing.waiting import wait_for  # noqa: F401 (the scripts import it from here)

MiB = 1 << 20
GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Drives use cache='none' (O_DIRECT): the storage must not be tmpfs.
BENCH_BASE = os.environ.get("VMHOST_BENCH_DIR", "/var/tmp/vmhost-bench")
LIBVIRT_URI = "qemu:///system"
RECOVERING = 99

# A boot sector that halts the vCPU for good (cli; hlt; jmp back to hlt):
# SeaBIOS boots it and the VM then costs no CPU. Without it SeaBIOS finds no
# bootable disk and keeps a third of a core busy per VM on this host.
HALT_BOOT_SECTOR = bytes([0xFA, 0xF4, 0xEB, 0xFD]) + bytes(506) + b"\x55\xaa"
HALT_EIP = "EIP=00007c02"


# --- output -----------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def md_table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_ms(seconds: float | None, digits: int = 1) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.{digits}f}"


def fmt_s(seconds: float | None, digits: int = 2) -> str:
    return "n/a" if seconds is None else f"{seconds:.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "TODO" if ok is None else ("met" if ok else "**missed**")


def save_result(out_dir: str, name: str, data: dict, markdown: str) -> str:
    """Write <name>.json (data plus the Markdown section) and print the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"name": name, "data": data, "markdown": markdown}, f, indent=1)
    print(markdown, flush=True)
    return path


def default_out_dir() -> str:
    return os.environ.get("VMHOST_BENCH_OUT", os.path.join(BENCH_BASE, "last-run"))


# --- statistics -----------------------------------------------------------------

def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float | None:
    return percentile(values, 50)


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a + b*x, with R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
    return {"intercept": a, "slope": b, "r2": r2}


# --- host facts ---------------------------------------------------------------------

def host_facts(conn: libvirt.virConnect | None = None) -> dict:
    def version(n: int) -> str:
        return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"
    facts = {"cpus": os.cpu_count(), "kernel": platform.release(),
             "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
             "loadavg": os.getloadavg(), "kvm": os.path.exists("/dev/kvm")}
    if conn is not None:
        facts.update(libvirt=version(conn.getLibVersion()), qemu=version(conn.getVersion()))
    return facts


def libvirtd_identity() -> str | None:
    """pid and start time of libvirtd: a change means it was restarted (by
    another test run on this machine) and a measurement may be disturbed."""
    try:
        with open("/run/libvirtd.pid") as f:
            pid = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid}@{f.read().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def process_memory(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def foreign_vmhost_domains(conn: libvirt.virConnect, prefix: str) -> list[str]:
    """Running domains with vmhost metadata that are not this bench's: another
    agent's VMs (a concurrent test run) that our agent would recover too."""
    names = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            if not dom.name().startswith(prefix) and "vmhost.dev/xmlns" in dom.XMLDesc(0):
                names.append(dom.name())
        except libvirt.libvirtError:
            pass
    return names


def serve_flags() -> set[str]:
    """The options `vmhost serve` has (to use knobs only when they exist)."""
    p = subprocess.run([sys.executable, "-m", "vmhost.cli.main", "serve", "--help"],
                       capture_output=True, text=True)
    return set(re.findall(r"--[a-z][a-z-]+", p.stdout))


# --- the bench environment --------------------------------------------------------------

class Bench:
    """One agent (restartable), one local storage domain, and this run's VMs,
    under a work dir of its own. VM names carry a per-run prefix; close()
    destroys those domains only and removes the work dir."""

    def __init__(self, name: str, agent_args: list[str] | None = None):
        self.name = name
        self.prefix = f"vmhost-bench-{uuid.uuid4().hex[:6]}-"
        self.workdir = os.path.join(BENCH_BASE, f"{name}-{uuid.uuid4().hex[:8]}")
        self.storage_root = os.path.join(self.workdir, "storage")
        self.state_dir = os.path.join(self.workdir, "state")
        self.agent_args = ["--monitor-interval", "5", *(agent_args or [])]
        self.sd = str(uuid.uuid4())
        self._conn: libvirt.virConnect | None = None
        self.agent: AgentProcess | None = None
        self._boot_sector = os.path.join(self.workdir, "halt-boot-sector.bin")
        self.vms: dict[str, "BenchVm"] = {}

    # --- life cycle --------------------------------------------------------

    def __enter__(self) -> "Bench":
        os.makedirs(self.storage_root, mode=0o755)
        for d in (BENCH_BASE, self.workdir):
            os.chmod(d, 0o755)
        with open(self._boot_sector, "wb") as f:
            f.write(HALT_BOOT_SECTOR)
        self.start_agent()
        self.call("StorageDomain.create", storagedomainID=self.sd, domainType="localfs",
                  typeArgs=self.storage_root, name=f"bench-{self.name}")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def conn(self) -> libvirt.virConnect:
        """This process's libvirt connection, reopened if libvirtd restarted
        (other test runs on this machine restart it)."""
        try:
            if self._conn is not None and self._conn.isAlive():
                return self._conn
        except libvirt.libvirtError:
            pass
        self._conn = libvirt.open(LIBVIRT_URI)
        return self._conn

    def close(self) -> None:
        """Never fails half-way: every step is tried."""
        if self.agent is not None:
            with contextlib.suppress(Exception):
                self.agent.kill9()
        for attempt in range(3):
            try:
                self.destroy_own_domains()
                break
            except libvirt.libvirtError as e:
                log(f"clean-up: cannot list domains ({e}); retrying")
                self._conn = None
                time.sleep(2)
        with contextlib.suppress(Exception):
            self.conn.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def destroy_own_domains(self) -> None:
        for dom in self.conn.listAllDomains(0):
            try:
                if dom.name().startswith(self.prefix):
                    dom.destroy()
            except libvirt.libvirtError:
                pass

    # --- the agent --------------------------------------------------------------

    def agent_process(self, extra_args: list[str] | None = None) -> AgentProcess:
        return AgentProcess(self.state_dir, extra_args=self.agent_args + (extra_args or []),
                            log_path=os.path.join(self.workdir, "agent.log"))

    def start_agent(self, extra_args: list[str] | None = None) -> AgentProcess:
        self.agent = self.agent_process(extra_args).start()
        self.agent.wait_ready(timeout=300)
        return self.agent

    def kill_agent(self) -> None:
        if self.agent is not None:
            self.agent.kill9()
            self.agent = None

    @property
    def client(self) -> Client:
        assert self.agent is not None, "no agent running"
        return self.agent.client

    def call(self, method: str, **params):
        return self.client.call(method, **params)

    # --- storage ------------------------------------------------------------------

    def image_dir(self, img: str) -> str:
        return os.path.join(self.storage_root, self.sd, "images", img)

    def volume_path(self, img: str, vol: str) -> str:
        return os.path.join(self.image_dir(img), vol)

    def create_volume(self, img: str, parent: str | None = None, size: int = 64 * MiB) -> str:
        return create_volume(self.client, self.sd, img, parent=parent, size=size, desc="bench")

    def delete_volume(self, img: str, vol: str) -> None:
        self.call("Volume.delete", storagedomainID=self.sd, imageID=img, volumeID=vol)

    # --- VMs ----------------------------------------------------------------------

    def create_vm(self, mem_mib: int = 16, disk_size: int = 64 * MiB) -> "BenchVm":
        """A VM through the agent (VM.create) on a fresh one-volume image whose
        boot sector halts the guest."""
        img = str(uuid.uuid4())
        base = self.create_volume(img, size=disk_size)
        qemu_img.io(self.volume_path(img, base), f"write -s {self._boot_sector} 0 512")
        vm_id = str(uuid.uuid4())
        self.call("VM.create", vmID=vm_id, vmParams={
            "vmName": f"{self.prefix}{vm_id[:8]}", "memSize": mem_mib,
            "devices": [{"device": "disk", "domainID": self.sd, "imageID": img,
                         "volumeID": base}]})
        vm = BenchVm(self, vm_id, img, [base])
        self.vms[vm_id] = vm
        return vm

    def create_vms(self, count: int, mem_mib: int = 16, paused: bool = False) -> list["BenchVm"]:
        """`paused`: VM.pause right after VM.create, before SeaBIOS has used
        much CPU (for measurements where the guest's state does not matter)."""
        vms = []
        for i in range(count):
            vms.append(self.create_vm(mem_mib))
            if paused:
                self.call("VM.pause", vmID=vms[-1].id)
            if (i + 1) % 10 == 0:
                log(f"  {i + 1}/{count} VMs created")
        return vms

    def wait_halted(self, vms: list["BenchVm"], timeout: float = 600) -> float:
        """Wait until every VM's vCPU sits in the halt boot sector (SeaBIOS is
        done and the VM costs no CPU any more). Returns the seconds waited."""
        started = time.monotonic()
        pending = list(vms)
        while pending:
            pending = [vm for vm in pending if not vm.halted()]
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{len(pending)} VM(s) did not reach the halt loop")
            if pending:
                time.sleep(0.5)
        return time.monotonic() - started

    def merge(self, vm: "BenchVm", base: str, top: str, bandwidth: int = 0) -> str:
        return self.call("VM.merge", vmID=vm.id,
                         drive={"domainID": self.sd, "imageID": vm.img, "volumeID": vm.chain[-1]},
                         baseVolUUID=base, topVolUUID=top, bandwidth=bandwidth)

    def job_ids(self) -> set[str]:
        """Every job id shown in vmJobs across all VMs."""
        return {job for s in self.call("Host.getAllVmStats") for job in s.get("vmJobs", {})}


class BenchVm:
    def __init__(self, bench: Bench, vm_id: str, img: str, chain: list[str]):
        self.bench, self.id, self.img, self.chain = bench, vm_id, img, chain

    def dom(self) -> libvirt.virDomain:
        return self.bench.conn.lookupByUUIDString(self.id)

    def halted(self) -> bool:
        try:
            out = libvirt_qemu.qemuMonitorCommand(
                self.dom(), "info registers", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        except libvirt.libvirtError:
            return False   # libvirtd restarting: ask again
        return HALT_EIP in out and "HLT=1" in out

    def block_job_gone(self) -> bool:
        try:
            return self.dom().blockJobInfo("vda", 0) == {}
        except libvirt.libvirtError:
            return False

    def snapshot(self, size: int = 64 * MiB) -> str:
        """Switch the drive to a new leaf; returns it."""
        new = self.bench.create_volume(self.img, parent=self.chain[-1], size=size)
        self.bench.call("VM.snapshot", vmID=self.id, snapDrives=[
            {"domainID": self.bench.sd, "imageID": self.img, "baseVolumeID": self.chain[-1],
             "volumeID": new}])
        self.chain.append(new)
        return new

    def write(self, pattern: int, offset: int, length: int, chunk: int = 64 * MiB) -> None:
        """Guest writes into the active layer, through QEMU (qemu-io in the monitor)."""
        for off in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - off)
            retry_libvirt(lambda: guestio.write(self.dom(), "vda", pattern, off, n))

    def merged(self, base: str, top: str) -> list[str]:
        """Update the local chain after base..top merged; returns the merged volumes."""
        i, j = self.chain.index(base), self.chain.index(top)
        gone = self.chain[i + 1: j + 1]
        self.chain = self.chain[: i + 1] + self.chain[j + 1:]
        return gone

    def image_dir(self) -> str:
        return self.bench.image_dir(self.img)


# --- event recorders -------------------------------------------------------------

class LibvirtJobEvents:
    """This process's own libvirt connection with an event loop: the time
    (time.time()) at which each BLOCK_JOB_2 event arrived, per domain UUID."""

    NAMES = {libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "COMPLETED",
             libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "FAILED",
             libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "CANCELED",
             libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "READY"}

    def __init__(self):
        # vmhost's Connection runs libvirt's default event loop in a thread.
        from vmhost.virt.connection import Connection
        self._cond = threading.Condition()
        self.events: list[tuple[float, str, str, str]] = []   # (time, vm uuid, disk, status)
        self._connection = Connection(LIBVIRT_URI)
        self._connection.block_job_listeners.append(self._on_event)
        self._connection.get()
        self._stop = threading.Event()
        threading.Thread(target=self._keep_connected, daemon=True).start()

    def _keep_connected(self) -> None:
        # Connection.get() reopens (and re-registers) after a libvirtd restart.
        while not self._stop.wait(0.5):
            with contextlib.suppress(libvirt.libvirtError):
                self._connection.get()

    def _on_event(self, vm_uuid: str, disk: str, job_type: int, status: int) -> None:
        with self._cond:
            self.events.append((time.time(), vm_uuid, disk, self.NAMES.get(status, str(status))))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait(self, vm_uuid: str, status: str, since: int, timeout: float = 120) -> float:
        """Time of the first `status` event for the VM after mark `since`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, vm, _, st in self.events[since:]:
                    if vm == vm_uuid and st == status:
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no libvirt {status} event for VM {vm_uuid}")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self._connection.close()


class AgentJobEvents:
    """The agent's notifications (GET /events) read in a thread: the agent's
    own publish time of each job state change."""

    def __init__(self, client: Client):
        self._stream = client.events(timeout=None)
        self._cond = threading.Condition()
        self.jobs: dict[str, dict[str, float]] = {}   # job id -> state -> agent time
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                if event.get("event") == "job":
                    with self._cond:
                        self.jobs.setdefault(event["jobId"], {})[event["to"]] = event["time"]
                        self._cond.notify_all()
        except TransportError:
            pass

    def wait(self, job_id: str, states: tuple[str, ...] = ("DONE",),
             timeout: float = 300) -> tuple[str, float]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = self.jobs.get(job_id, {})
                for st in states:
                    if st in seen:
                        return st, seen[st]
                for bad in ("FAILED", "ABORTED"):
                    if bad in seen and bad not in states:
                        raise RuntimeError(f"job {job_id} ended {bad}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} did not reach {states}")
                self._cond.wait(left)

    # No close(): EventStream is not safe to close from another thread while
    # the reader blocks in it. The stream (and the thread) end with the agent.


# --- storage access counting ---------------------------------------------------------

IN_ACCESS, IN_MODIFY, IN_OPEN, IN_CREATE, IN_MOVED_TO = 0x1, 0x2, 0x20, 0x100, 0x80
_libc = ctypes.CDLL(None, use_errno=True)


class AccessCounter:
    """inotify on directories: every open (and create/rename) of a file in
    them, and of the directory itself (listdir), is one storage call. QEMU
    already holds its images open, so opens come from the agent or from
    processes it runs (qemu-img)."""

    MASK = IN_OPEN | IN_CREATE | IN_MOVED_TO | IN_MODIFY | IN_ACCESS

    def __init__(self, groups: dict[str, list[str]]):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._group_of: dict[int, str] = {}
        for group, dirs in groups.items():
            for d in dirs:
                wd = _libc.inotify_add_watch(self.fd, d.encode(), self.MASK)
                if wd < 0:
                    raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")
                self._group_of[wd] = group
        self.counts: dict[str, dict[str, int]] = {
            g: {"opens": 0, "writes": 0, "reads": 0} for g in groups}

    def drain(self) -> dict[str, dict[str, int]]:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return {g: dict(c) for g, c in self.counts.items()}
            pos = 0
            while pos < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, pos)
                c = self.counts[self._group_of.get(wd, next(iter(self.counts)))]
                if mask & (IN_OPEN | IN_CREATE | IN_MOVED_TO):
                    c["opens"] += 1
                if mask & IN_MODIFY:
                    c["writes"] += 1
                if mask & IN_ACCESS:
                    c["reads"] += 1
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)


# --- misc -------------------------------------------------------------------------

def retry_libvirt(fn: Callable[[], Any], attempts: int = 5, delay: float = 2.0) -> Any:
    """Run an idempotent libvirt call again if libvirtd went away under it."""
    for attempt in range(attempts):
        try:
            return fn()
        except libvirt.libvirtError as e:
            if attempt == attempts - 1:
                raise
            log(f"libvirt call failed ({e}); retrying in {delay}s")
            time.sleep(delay)


def drop_caches() -> None:
    with contextlib.suppress(OSError):
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def main_guard(fn: Callable[[], int]) -> None:
    try:
        sys.exit(fn())
    except KeyboardInterrupt:
        sys.exit(130)
