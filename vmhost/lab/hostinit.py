"""PID 1 of one lab host, run by `unshare` in the host's new namespaces.

    python -m vmhost.lab.hostinit HOSTDIR/host.json

Binds the host's directories over /run, /etc/libvirt, ..., sets the hostname,
waits for the veth end the lab moves into its network namespace and gives it
the host's address, then starts virtlogd, the sanlock daemon, libvirtd and
`vmhost serve`, and reaps every process of the namespace (QEMU daemonizes, so
it ends up here). SIGTERM (`lab down`) stops the agent and the daemons, then
exits: the kernel kills what is left in the namespace. SIGKILL from outside
(`lab poweroff`) is a power cut.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

IFACE = "eth0"


@dataclasses.dataclass
class HostSpec:
    name: str
    sanlock_host_id: int
    address: str                   # IP/prefix of IFACE
    binds: list[list[str]]         # [source, target]: the host's own /run, /etc/libvirt, ...
    log_dir: str
    sanlock_name: str              # sanlock's name of this host in delta leases (unique per host)
    agent_argv: list[str]
    env: dict[str, str]

    def save(self, path: str) -> None:
        from vmhost.fsutil import atomic_write
        atomic_write(path, json.dumps(dataclasses.asdict(self), indent=1).encode())

    @classmethod
    def load(cls, path: str) -> "HostSpec":
        with open(path) as f:
            return cls(**json.load(f))


class _Shutdown(Exception):
    pass


def _on_term(signum, frame):
    raise _Shutdown()


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _iface_present() -> bool:
    try:
        socket.if_nametoindex(IFACE)
        return True
    except OSError:
        return False


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def setup(spec: HostSpec) -> None:
    for source, target in spec.binds:
        _run("mount", "--bind", source, target)
    socket.sethostname(spec.name)
    _run("ip", "link", "set", "lo", "up")
    if not _wait(_iface_present, 30):
        raise RuntimeError(f"{IFACE} did not appear in the host's network namespace")
    _run("ip", "addr", "add", spec.address, "dev", IFACE)
    _run("ip", "link", "set", IFACE, "up")


def _start(spec: HostSpec, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
    log = open(os.path.join(spec.log_dir, name + ".log"), "ab")
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
    finally:
        log.close()


def start_daemons(spec: HostSpec, started: list[subprocess.Popen]) -> None:
    """virtlogd, sanlock, libvirtd (it needs both), then the agent; each appended to
    `started` as soon as it runs, so a shutdown meanwhile stops it."""
    started.append(_start(spec, "virtlogd", ["virtlogd"]))
    os.makedirs("/run/sanlock", exist_ok=True)
    # No CAP_SYS_RESOURCE in containers: unprivileged mode skips setrlimit and
    # setuid. No watchdog (-w 0): nothing fences a dead host's processes, the
    # lab's power cut kills them itself. -D: stay in the foreground, log to stderr.
    started.append(_start(spec, "sanlock", [
        "sanlock", "daemon", "-D", "-w", "0", "-l", "0", "-L", "-1", "-S", "-1",
        "-e", spec.sanlock_name], env={"SANLOCK_PRIVILEGED": "0"}))
    _wait(lambda: _socket_answers("/run/sanlock/sanlock.sock"), 30)
    started.append(_start(spec, "libvirtd", ["libvirtd"]))
    _wait(lambda: _socket_answers("/run/libvirt/libvirt-sock"), 60)
    started.append(_start(spec, "agent", spec.agent_argv, env=spec.env))


def stop(started: list[subprocess.Popen], timeout: float = 10) -> None:
    """The agent first (it may still talk to libvirtd), then the daemons together.
    What does not stop in time dies with the namespace when this init exits (sanlock
    keeps running while it holds lockspaces, for one)."""
    agent, daemons = started[3:], started[:3]
    for group, wait in ((agent, timeout), (daemons, 3.0)):
        for proc in group:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + wait
        for proc in group:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def reap_forever(started: list[subprocess.Popen]) -> None:
    ours = {proc.pid: proc for proc in started}
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(0.5)    # no child at all: only if every daemon died
            continue
        if pid in ours:        # tell Popen, so stop() does not signal a reused pid
            ours[pid].returncode = os.waitstatus_to_exitcode(status)
            print(f"{ours[pid].args[0]} exited with {ours[pid].returncode}", flush=True)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    spec = HostSpec.load(argv[1])
    started: list[subprocess.Popen] = []
    try:
        setup(spec)
        start_daemons(spec, started)
        print(f"{spec.name}: booted", flush=True)
        reap_forever(started)
    except _Shutdown:
        print(f"{spec.name}: shutting down", flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop(started)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
