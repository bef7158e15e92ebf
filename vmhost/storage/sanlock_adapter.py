"""The one place that talks to sanlock.

Formatting lease areas uses `sanlock direct` (no daemon needed: it writes the
file itself). Joining, inquiring and leaving lockspaces goes through this
host's sanlock daemon (the Python binding, Debian's python3-sanlock; its socket
is /run/sanlock/sanlock.sock, so a lab host reaches its own daemon).

sanlock names lockspaces and resources with at most 48 bytes; vmhost uses
UUIDs (36). Failures raise SanlockError with sanlock's errno and message.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import subprocess

MiB = 1 << 20
LEASE_SIZE = MiB        # one delta-lease area or paxos lease, 512-byte sectors, 1 MiB alignment
# A paxos lease another host holds or is acquiring (IDLIVE, OWNED, OTHER): for the
# short-held lease of a resource index, a retry succeeds.
CONTENDED = frozenset({243, 244, 245})
# The watchdog's fire timeout: sanlock waits for it before calling a host dead,
# even when no watchdog runs.
WATCHDOG_FIRE_TIMEOUT = 60


class SanlockError(Exception):
    def __init__(self, errno: int, message: str):
        super().__init__(f"sanlock: {message} (errno {errno})")
        self.errno = errno


def _binding():
    try:
        import sanlock
    except ImportError:
        raise SanlockError(0, "the sanlock Python binding is missing "
                              "(Debian python3-sanlock; `make setup` links it)") from None
    return sanlock


def _direct(*args: str) -> None:
    done = subprocess.run(["sanlock", "direct", *args], capture_output=True, text=True)
    if done.returncode:
        raise SanlockError(done.returncode, f"direct {' '.join(args)}: "
                                            f"{(done.stderr or done.stdout).strip()}")


def init_lockspace(lockspace: str, path: str, io_timeout: int) -> None:
    """Write empty delta leases for every host id; io_timeout is recorded in them."""
    _direct("init", "-s", f"{lockspace}:0:{path}:0", "-o", str(io_timeout))


def init_resource(lockspace: str, resource: str, path: str, offset: int) -> None:
    _direct("init", "-r", f"{lockspace}:{resource}:{path}:{offset}")


def format_index(lockspace: str, path: str) -> None:
    """A resource index (sanlock's rindex) at offset 0 of path: the daemon later
    creates and deletes leases in it under the index's own paxos lease, so hosts
    creating leases at once cannot corrupt it."""
    _direct("format", "-x", f"{lockspace}:{path}:0")


def _client(*args: str) -> tuple[int, dict[str, str]]:
    """`sanlock client ...` through this host's daemon: (sanlock's result, its
    `key value` lines). The Python binding has no resource-index calls."""
    done = subprocess.run(["sanlock", "client", *args], capture_output=True, text=True)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    result = next((int(v.rsplit(" ", 1)[1]) for k, v in lines.items()
                   if v.startswith("done ")), None)
    if result is None:
        raise SanlockError(done.returncode, f"client {' '.join(args)}: "
                                            f"{(done.stderr or done.stdout).strip()}")
    return result, lines


def _index(lockspace: str, path: str) -> str:
    return f"{lockspace}:{path}:0"


def index_lookup(lockspace: str, path: str, name: str) -> int | None:
    """Offset of the lease named `name` in the resource index at path, or None."""
    result, lines = _client("lookup", "-x", _index(lockspace, path), "-e", name)
    if result == -errno.ENOENT:
        return None
    if result:
        raise SanlockError(-result, f"looking up {name} in {path} failed ({result})")
    return int(lines["name"].rsplit(" ", 1)[1])


def index_create(lockspace: str, path: str, name: str) -> int:
    """A new lease named `name` (the index may then hold the name twice: callers
    look up first and remove a duplicate they made)."""
    result, lines = _client("create", "-x", _index(lockspace, path), "-e", name)
    if result:
        raise SanlockError(-result, f"creating {name} in {path} failed ({result})")
    return int(lines["offset"])


def index_delete(lockspace: str, path: str, name: str, offset: int) -> None:
    result, _ = _client("delete", "-x", _index(lockspace, path), "-e", f"{name}:{offset}")
    if result and result != -errno.ENOENT:
        raise SanlockError(-result, f"deleting {name} from {path} failed ({result})")


def _call(fn, *args, **kwargs):
    sanlock = _binding()
    try:
        return fn(sanlock)(*args, **kwargs)
    except sanlock.SanlockException as e:   # args: (errno, what failed, strerror)
        # errno is positive for system errors, negative for sanlock's own (-243...)
        raise SanlockError(abs(e.errno), ": ".join(str(a) for a in e.args[1:])) from None


def add_lockspace(lockspace: str, host_id: int, path: str, io_timeout: int) -> None:
    """Start joining; returns at once (the daemon needs a few io_timeouts to
    acquire the host id). Joining a lockspace already joined or being joined is a
    no-op."""
    try:
        _call(lambda s: s.add_lockspace, lockspace.encode(), host_id, path, 0,
              iotimeout=io_timeout, wait=False)
    except SanlockError as e:
        if e.errno not in (errno.EEXIST, errno.EINPROGRESS):   # joined, or being joined
            raise


def inq_lockspace(lockspace: str, host_id: int, path: str) -> bool | None:
    """True: joined; None: joining or leaving; False: not joined."""
    return _call(lambda s: s.inq_lockspace, lockspace.encode(), host_id, path, 0)


def rem_lockspace(lockspace: str, host_id: int, path: str) -> None:
    """Leave (waits until done). Refused (EBUSY) while a resource in it is held:
    `unused` keeps sanlock from killing the holders as it would by default."""
    try:
        _call(lambda s: s.rem_lockspace, lockspace.encode(), host_id, path, 0, unused=True)
    except SanlockError as e:
        if e.errno != errno.ENOENT:    # not joined
            raise


def lease_owners(lockspace: str, resource: str, path: str, offset: int) -> list[int]:
    """Host ids the lease's leader names as holding it (maybe failing or dead ones)."""
    owners = _call(lambda s: s.read_resource_owners, lockspace.encode(), resource.encode(),
                   [(path, offset)])
    return [int(o["host_id"]) for o in owners]


def host_state(lockspace: str, host_id: int) -> tuple[str, int]:
    """(state, io_timeout) of a host id as this host's daemon sees it: "free", "live",
    "fail" (not renewing), "dead" or "unknown" (just joined, or not known yet)."""
    sanlock = _binding()
    names = {sanlock.HOST_FREE: "free", sanlock.HOST_LIVE: "live", sanlock.HOST_FAIL: "fail",
             sanlock.HOST_DEAD: "dead", sanlock.HOST_UNKNOWN: "unknown"}
    try:
        hosts = _call(lambda s: s.get_hosts, lockspace.encode(), host_id)
    except SanlockError as e:
        if e.errno == errno.EAGAIN:
            return "unknown", 0
        raise
    if not hosts:
        return "unknown", 0
    return names.get(hosts[0]["flags"], "unknown"), int(hosts[0].get("io_timeout", 0))


def host_dead_seconds(io_timeout: int) -> int:
    """How long after a host's last delta-lease renewal sanlock calls it dead and
    gives its leases to others: 8 io_timeouts, then the watchdog's fire timeout."""
    return 8 * io_timeout + WATCHDOG_FIRE_TIMEOUT


@dataclasses.dataclass(frozen=True)
class Held:
    """A resource lease this process holds through its own registration (fd)."""
    fd: int
    lockspace: str
    resource: str
    path: str
    offset: int


def acquire(lockspace: str, resource: str, path: str, offset: int) -> Held:
    """Hold a resource lease as this process until release(): the daemon releases
    it by itself when the registration's fd closes (the process died). Raises
    SanlockError: CONTENDED while a live host holds it; while the holder's host
    is dead but not yet expired, sanlock waits inside the acquire."""
    fd = _call(lambda s: s.register)
    try:
        _call(lambda s: s.acquire, lockspace.encode(), resource.encode(), [(path, offset)],
              slkfd=fd)
    except BaseException:
        os.close(fd)
        raise
    return Held(fd, lockspace, resource, path, offset)


def release(held: Held) -> None:
    try:
        _call(lambda s: s.release, held.lockspace.encode(), held.resource.encode(),
              [(held.path, held.offset)], slkfd=held.fd)
    finally:
        os.close(held.fd)      # released anyway once the daemon sees the fd closed


def still_held(held: Held) -> bool:
    """Whether the daemon says this registration still holds the lease (no storage
    access): not after a daemon restart, nor once sanlock took it away."""
    try:
        resources = _call(lambda s: s.inquire, slkfd=held.fd)
    except SanlockError:
        return False
    return any(r.get("lockspace") == held.lockspace.encode() and
               r.get("resource") == held.resource.encode() for r in resources)


@contextlib.contextmanager
def holding(lockspace: str, resource: str, path: str, offset: int):
    """Hold a resource lease for the duration of the block (see acquire)."""
    held = acquire(lockspace, resource, path, offset)
    try:
        yield
    finally:
        release(held)
