"""The lab: hosts as namespaces (see vmhost/lab/__init__.py), their state in lab.json.

Every command takes lab.lock, so two lab commands never interleave. Pids are
kept with their start times: a pid the kernel reused for something else is
never signalled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid

import vmhost
from vmhost import config as configmod
from vmhost.client import Client
from vmhost.fsutil import atomic_write
from vmhost.lab import procs
from vmhost.lab.hostinit import HostSpec

DEFAULT_DIR = "/var/lib/vmhost-lab"
MAX_HOSTS = 32
AGENT_PORT = 54321
# Lab hosts join lockspaces with this io_timeout: a dead host's leases expire after
# sanlock's host_dead_seconds = 8 * io_timeout + 60 (no watchdog: its fire timeout).
DEFAULT_IO_TIMEOUT = 1
SUBNET_PREFIX = "10.237"          # each lab takes a free 10.237.X.0/24
# Short links to the hosts' /run directories: a unix socket path must fit in 108 bytes.
LINKS_DIR = "/run/vmhost-lab"
# The host's own copies of these machine directories (name under the host dir, target).
BINDS = (("run", "/run"), ("etc-libvirt", "/etc/libvirt"), ("var-lib-libvirt", "/var/lib/libvirt"),
         ("var-log-libvirt", "/var/log/libvirt"), ("var-cache-libvirt", "/var/cache/libvirt"))
LIBVIRT_CONF = {
    # Leases as oVirt takes them: only the <lease> elements of the domain XML.
    "qemu.conf": {"lock_manager": '"sanlock"',
                  # libvirt names a VM's cgroup after its name and per-daemon id: two hosts
                  # starting "vm" as domain 1 would share one. The lab runs without.
                  "cgroup_controllers": "[ ]"},
    "qemu-sanlock.conf": {"auto_disk_leases": "0", "require_lease_for_disks": "0"},
}


class LabError(Exception):
    pass


@dataclasses.dataclass
class HostState:
    name: str
    hostId: int                    # its sanlock host id
    ip: str
    unshare: list[int] | None = None   # [pid, start time] of the unshare process
    init: list[int] | None = None      # [pid, start time] of the host's PID 1 (hostinit)
    pidNs: str | None = None


@dataclasses.dataclass
class LabState:
    storage: str
    subnet: int                    # X of 10.237.X.0/24
    labId: str
    ioTimeout: int
    hosts: list[HostState]

    @property
    def bridge(self) -> str:
        return f"vmlab{self.subnet}"

    def host(self, name: str) -> HostState:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"no host {name!r} in the lab (hosts: "
                       f"{', '.join(h.name for h in self.hosts) or 'none'})")


class Lab:
    def __init__(self, directory: str = DEFAULT_DIR):
        self.dir = os.path.abspath(directory)
        self.state_path = os.path.join(self.dir, "lab.json")

    # --- state ------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self):
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        with open(os.path.join(self.dir, "lab.lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def load(self) -> LabState | None:
        try:
            with open(self.state_path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        raw["hosts"] = [HostState(**h) for h in raw["hosts"]]
        return LabState(**raw)

    def save(self, state: LabState) -> None:
        atomic_write(self.state_path, json.dumps(dataclasses.asdict(state), indent=1).encode())

    def _state(self) -> LabState:
        state = self.load()
        if state is None:
            raise LabError(f"no lab in {self.dir}: run `vmhost lab up` first")
        return state

    def host_dir(self, name: str) -> str:
        return os.path.join(self.dir, "hosts", name)

    # --- commands ---------------------------------------------------------

    def up(self, hosts: int, storage: str | None = None,
           io_timeout: int = DEFAULT_IO_TIMEOUT) -> list[dict]:
        if not 1 <= hosts <= MAX_HOSTS:
            raise LabError(f"--hosts must be 1-{MAX_HOSTS}, got {hosts}")
        if io_timeout < 1:
            raise LabError(f"--io-timeout must be at least 1, got {io_timeout}")
        with self.locked():
            with _machine_lock():    # two labs starting at once must not pick one subnet
                state = self._plan(hosts, storage, io_timeout)
                _ensure_bridge(state)
            for h in state.hosts:
                if not self._running(h):
                    self._boot(state, h)
                    self.save(state)
            for h in state.hosts:
                self._wait_agent(h)
            return self._status(state)

    def status(self) -> dict:
        state = self._state()
        return {"storage": state.storage, "labDir": self.dir, "hosts": self._status(state)}

    def poweroff(self, name: str) -> bool:
        """A power cut: SIGKILL to the host's PID 1, so the kernel kills every
        process of its PID namespace at once. Returns False if it was off."""
        with self.locked():
            state = self._state()
            h = state.host(name)
            if not self._running(h):
                return False
            procs.sigkill(*h.init)
            self._wait_gone(h, 30)
            return True

    def boot(self, name: str, agent_env: dict[str, str] | None = None) -> bool:
        """Start a host that is off (as after a reboot: empty /run, no VMs).
        `agent_env`: extra environment of its agent for this boot only (fault
        tests: VMHOST_FAILPOINT). Returns False if it was running."""
        with self.locked():
            state = self._state()
            h = state.host(name)
            if self._running(h):
                return False
            _ensure_bridge(state)
            self._boot(state, h, agent_env or {})
            self.save(state)
            self._wait_agent(h)
            return True

    def down(self) -> None:
        """Stop every host (SIGTERM to its PID 1: agent and daemons stop, then the
        kernel ends the rest; SIGKILL if that takes too long); remove the bridge."""
        with self.locked():
            state = self.load()
            if state is None:
                return
            stopping = [h for h in state.hosts if self._running(h)]
            for h in stopping:
                procs.kill(*h.init, signal.SIGTERM)
            for h in stopping:
                try:
                    self._wait_gone(h, 30)
                except TimeoutError:
                    procs.sigkill(*h.init)
                    self._wait_gone(h, 30)
            subprocess.run(["ip", "link", "del", state.bridge], stderr=subprocess.DEVNULL)
            shutil.rmtree(_links_dir(state), ignore_errors=True)

    def enter_argv(self, name: str) -> list[str]:
        """The argv prefix that runs a command inside a running host (all its namespaces:
        its sanlock and libvirt sockets, its pids, its hostname, its network)."""
        h = self._state().host(name)
        if not self._running(h):
            raise LabError(f"{name} is off")
        return ["nsenter", "-t", str(h.init[0]), "-m", "-u", "-n", "-p", "--"]

    def pids(self, name: str) -> list[int]:
        """Every live process of a host (outside pids), for tests and `status`."""
        h = self._state().host(name)
        return procs.pids_in_namespace(h.pidNs) if h.pidNs and self._running(h) else []

    # --- helpers ----------------------------------------------------------

    def _plan(self, hosts: int, storage: str | None, io_timeout: int) -> LabState:
        state = self.load()
        storage = os.path.abspath(storage) if storage else None
        running = [h for h in state.hosts if self._running(h)] if state else []
        if state is None or not running:
            subnet = state.subnet if state else _free_subnet()
            old = state.hosts if state else []
            state = LabState(storage=storage or (state.storage if state else
                                                 os.path.join(self.dir, "storage")),
                             subnet=subnet, labId=state.labId if state else uuid.uuid4().hex,
                             ioTimeout=io_timeout, hosts=old[:hosts])
        elif storage and storage != state.storage:
            raise LabError(f"the lab runs on storage {state.storage}; run `vmhost lab down` "
                           f"before changing it to {storage}")
        elif hosts < len(state.hosts):
            raise LabError(f"the lab runs {len(state.hosts)} hosts; run `vmhost lab down` "
                           f"before asking for {hosts}")
        for i in range(len(state.hosts) + 1, hosts + 1):
            state.hosts.append(HostState(name=f"host{i}", hostId=i,
                                         ip=f"{SUBNET_PREFIX}.{state.subnet}.{10 + i}"))
        os.makedirs(state.storage, mode=0o755, exist_ok=True)
        os.chmod(state.storage, 0o755)     # QEMU runs as libvirt-qemu
        self.save(state)
        return state

    def _running(self, h: HostState) -> bool:
        return h.init is not None and procs.alive(*h.init)

    def _status(self, state: LabState) -> list[dict]:
        return [{"name": h.name, "hostId": h.hostId, "url": _url(h),
                 "libvirtUri": self._libvirt_uri(state, h),
                 "up": self._running(h) and _answers(_url(h))} for h in state.hosts]

    def _libvirt_uri(self, state: LabState, h: HostState) -> str:
        sock = os.path.join(_links_dir(state), h.name, "libvirt", "libvirt-sock")
        return f"qemu+unix:///system?socket={sock}"

    def _link_run(self, state: LabState, h: HostState) -> None:
        """LINKS_DIR/<lab>/<host> -> the host's /run, replaced atomically."""
        links = _links_dir(state)
        os.makedirs(links, mode=0o755, exist_ok=True)
        tmp = os.path.join(links, f".{h.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.path.join(self.host_dir(h.name), "run"), tmp)
        os.rename(tmp, os.path.join(links, h.name))

    def _boot(self, state: LabState, h: HostState, agent_env: dict[str, str] | None = None) -> None:
        spec_path = self._prepare_host(state, h, agent_env or {})
        self._link_run(state, h)
        hd = self.host_dir(h.name)
        console = open(os.path.join(hd, "log", "console.log"), "ab")
        try:
            unshare = subprocess.Popen(
                ["unshare", "--mount", "--uts", "--net", "--pid", "--fork", "--mount-proc",
                 "--propagation", "private", sys.executable, "-m", "vmhost.lab.hostinit", spec_path],
                stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=_env())
        finally:
            console.close()
        procs.wait_until(lambda: procs.children(unshare.pid) or unshare.poll() is not None, 10,
                         f"{h.name}'s init to start")
        if unshare.poll() is not None:
            raise LabError(f"{h.name} did not start; see {hd}/log/console.log")
        init = procs.children(unshare.pid)[0]
        h.unshare = [unshare.pid, procs.start_time(unshare.pid)]
        h.init = [init, procs.start_time(init)]
        h.pidNs = procs.pid_namespace(init)
        veth = f"{state.bridge}h{h.hostId}"
        subprocess.run(["ip", "link", "del", veth], stderr=subprocess.DEVNULL)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(init))
        _ip("link", "set", veth, "master", state.bridge, "up")
        # The host's new interface has a new MAC: forget the old one, or connections to
        # its address hang until the neighbour entry expires (~30 s).
        subprocess.run(["ip", "neigh", "flush", "to", h.ip], stderr=subprocess.DEVNULL)

    def _prepare_host(self, state: LabState, h: HostState, agent_env: dict[str, str]) -> str:
        """The host's directories and configuration; its /run emptied as by a reboot."""
        hd = self.host_dir(h.name)
        run = os.path.join(hd, "run")
        shutil.rmtree(run, ignore_errors=True)
        for sub, _ in BINDS:
            os.makedirs(os.path.join(hd, sub), mode=0o755, exist_ok=True)
        for sub in ("log", "vmhost", "var-lib-libvirt/qemu", "var-log-libvirt/qemu",
                    "var-cache-libvirt/qemu"):
            os.makedirs(os.path.join(hd, sub), mode=0o755, exist_ok=True)
        shutil.chown(os.path.join(hd, "var-lib-libvirt", "qemu"), "libvirt-qemu", "libvirt-qemu")
        _libvirt_config(os.path.join(hd, "etc-libvirt"))
        agent_config = os.path.join(hd, "vmhost.toml")
        atomic_write(agent_config, configmod.Config(
            listen=f"{h.ip}:{AGENT_PORT}", insecure=True,  # plain HTTP on the lab's private subnet
            state_dir=os.path.join(hd, "vmhost"), sanlock_host_id=h.hostId,
            sanlock_io_timeout=state.ioTimeout).validate().to_toml().encode())
        spec = HostSpec(
            name=h.name, sanlock_host_id=h.hostId, address=f"{h.ip}/24",
            binds=[[os.path.join(hd, sub), target] for sub, target in BINDS],
            log_dir=os.path.join(hd, "log"), sanlock_name=f"{h.name}-{state.labId}",
            agent_argv=[sys.executable, "-m", "vmhost.cli.main", "serve", "--config",
                        agent_config, "--host-id", str(h.hostId)],
            env={**_env(), **agent_env})
        spec_path = os.path.join(hd, "host.json")
        spec.save(spec_path)
        return spec_path

    def _wait_gone(self, h: HostState, timeout: float) -> None:
        procs.wait_until(lambda: not self._running(h) and not (
            h.pidNs and procs.pids_in_namespace(h.pidNs)), timeout, f"{h.name}'s processes to end")

    def _wait_agent(self, h: HostState, timeout: float = 120) -> None:
        def ready() -> bool:
            if not self._running(h):
                raise LabError(f"{h.name} died while booting; see "
                               f"{self.host_dir(h.name)}/log/")
            return _answers(_url(h), "Host.getVMList")   # refused while it recovers
        procs.wait_until(ready, timeout, f"{h.name}'s agent to be ready at {_url(h)}", 0.1)


@contextlib.contextmanager
def _machine_lock():
    os.makedirs(LINKS_DIR, mode=0o755, exist_ok=True)
    with open(os.path.join(LINKS_DIR, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _links_dir(state: LabState) -> str:
    return os.path.join(LINKS_DIR, state.labId[:8])


def _url(h: HostState) -> str:
    return f"http://{h.ip}:{AGENT_PORT}/jsonrpc"


def _answers(url: str, verb: str = "Host.ping") -> bool:
    try:
        with Client(url, timeout=2) as c:
            c.call(verb)
        return True
    except Exception:   # noqa: BLE001 - any failure means "not answering"
        return False


def _env() -> dict[str, str]:
    """This process's environment, with the vmhost that runs the lab first on the path:
    the hosts run the same code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(vmhost.__file__)))
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _free_subnet() -> int:
    """The first 10.237.X.0/24 that no interface of this machine uses."""
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    used = {int(x) for x in re.findall(rf"{re.escape(SUBNET_PREFIX)}\.(\d+)\.", out)}
    used |= {int(x) for x in re.findall(r": vmlab(\d+)[:@]", links)}
    for x in range(1, 255):
        if x not in used:
            return x
    raise LabError(f"no free subnet left in {SUBNET_PREFIX}.0.0/16")


def _ensure_bridge(state: LabState) -> None:
    br = state.bridge
    if subprocess.run(["ip", "link", "show", br], capture_output=True).returncode:
        _ip("link", "add", br, "type", "bridge")
    addr = f"{SUBNET_PREFIX}.{state.subnet}.1/24"
    if addr not in subprocess.run(["ip", "-o", "addr", "show", br], capture_output=True,
                                  text=True).stdout:
        _ip("addr", "add", addr, "dev", br)
    _ip("link", "set", br, "up")


def _libvirt_config(etc: str) -> None:
    """The machine's /etc/libvirt, without its VMs and autostarted networks, with LIBVIRT_CONF."""
    if not os.path.exists(os.path.join(etc, "libvirtd.conf")):
        shutil.copytree("/etc/libvirt", etc, symlinks=True, dirs_exist_ok=True)
        for path in (glob.glob(os.path.join(etc, "qemu", "*.xml"))
                     + glob.glob(os.path.join(etc, "qemu", "networks", "autostart", "*"))):
            os.unlink(path)
    for name, settings in LIBVIRT_CONF.items():
        path = os.path.join(etc, name)
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        keep = [line for line in lines
                if not any(re.match(rf"\s*{key}\s*=", line) for key in settings)]
        keep += [f"{key} = {value}" for key, value in settings.items()]
        atomic_write(path, ("\n".join(keep) + "\n").encode())
