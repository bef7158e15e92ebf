"""How long a powered-off lab host keeps its sanlock leases: the figure a failover
waits for. sanlock gives a dead host's resources away once its delta lease has
not been renewed for host_dead_seconds = 8 * io_timeout + 60 (the 60 s are the
watchdog's fire timeout, waited for even without a watchdog); lab hosts use
io_timeout 1, so 68 s, plus up to one renewal interval (2 * io_timeout) that
passed since the dead host's last renewal, minus nothing."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import wait_for
from labutil import lab_cli, lab_dir, lab_up, shared_domain  # noqa: F401 - lab_dir is a fixture
from scenario import record
from vmhost.lab.lab import DEFAULT_IO_TIMEOUT, Lab

pytestmark = pytest.mark.faults   # about 75 s: run by `make faults`, not `make test`
MiB = 1 << 20


def holds(lab_dir: str, host: str, resource: str) -> bool:
    out = lab_cli(lab_dir, "exec", host, "sanlock", "client", "status")
    return any(line.startswith(f"r {resource}") for line in out.splitlines())


def try_acquire(lab_dir: str, host: str, spec: str) -> bool:
    """Acquire and release at once (sanlock runs /bin/true holding the lease). While
    the owner's delta lease stops being renewed, sanlock waits inside the acquire
    until the owner is dead, rather than failing at once."""
    done = subprocess.run([*Lab(lab_dir).enter_argv(host), "sanlock", "client", "command",
                           "-r", spec, "-c", "/bin/true"], capture_output=True, text=True,
                          timeout=180)
    return done.returncode == 0


def test_a_powered_off_hosts_lease_expires_after_host_dead_seconds(lab_dir, workdir):
    storage = os.path.join(workdir, "shared")
    hosts = lab_up(lab_dir, storage, 2)
    sd = shared_domain(hosts, storage)
    lease = os.path.join(storage, "probe.lease")
    with open(lease, "wb") as f:
        f.truncate(MiB)
    spec = f"{sd}:probe:{lease}:0"
    subprocess.run(["sanlock", "direct", "init", "-r", spec], check=True, capture_output=True)

    holder = subprocess.Popen([*Lab(lab_dir).enter_argv("host1"), "sanlock", "client", "command",
                               "-r", spec, "-c", "/bin/sleep", "3600"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: holds(lab_dir, "host1", f"{sd}:probe"), 30, "host1 to hold the lease")
        assert not try_acquire(lab_dir, "host2", spec), "host2 took a lease host1 holds"

        lab_cli(lab_dir, "poweroff", "host1")
        cut = time.monotonic()
        wait_for(lambda: try_acquire(lab_dir, "host2", spec), 150,
                 "host2 to get the dead host's lease")
        expiry = time.monotonic() - cut
    finally:
        holder.kill()
        holder.wait()
    dead = 8 * DEFAULT_IO_TIMEOUT + 60
    print(f"lease expiry after power-off: {expiry:.1f} s (host_dead_seconds {dead})")
    record({"scenario": "lease-expiry", "ioTimeout": DEFAULT_IO_TIMEOUT,
            "seconds": round(expiry, 1)})
    assert dead - 2 * DEFAULT_IO_TIMEOUT - 1 <= expiry <= dead + 20
