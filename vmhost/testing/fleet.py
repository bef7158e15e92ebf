"""The engine's side of a fleet (hosts sharing a posixfs domain, e.g. `vmhost lab`):
a shared domain every host joins, and the engine's path to restart the VM of a
host that died. Used by the lab tests and `vmhost demo --fleet`."""
from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Callable

from vmhost import errors
from vmhost.client import Client, RpcError, TransportError
from vmhost.testing.waiting import wait_for

POSIXFS = 6                  # VDSM's domain type number
RETRY_INTERVAL = 1.0         # seconds between the engine's attempts (each may start a QEMU)


class EngineError(AssertionError):
    """An answer the engine's path does not expect: a failed check for pytest."""


def answers(url: str) -> bool:
    """Whether the agent at `url` answers (a powered-off host's does not)."""
    try:
        with Client(url, timeout=2) as c:
            c.call("Host.ping")
        return True
    except (TransportError, RpcError, OSError):
        return False


def wait_acquired(url: str, sd: str, timeout: float = 60) -> None:
    """Until the host at `url` holds its host id in the domain's lockspace."""
    with Client(url, timeout=10) as c:
        wait_for(lambda: c.call("Host.getStorageRepoStats", domains=[sd])[sd]["acquired"],
                 timeout, f"{url} to acquire its host id in {sd}")


def shared_domain(hosts: list[dict], storage: str, name: str = "shared") -> str:
    """A posixfs domain created by the first host, connected by the others, joined by
    all (`hosts`: `vmhost lab status --json`'s entries); returns its id."""
    sd = str(uuid.uuid4())
    with Client(hosts[0]["url"], timeout=30) as c:
        c.call("StorageDomain.create", storagedomainID=sd, domainType=POSIXFS,
               typeArgs=storage, name=name)
    for h in hosts[1:]:
        with Client(h["url"], timeout=30) as c:
            c.call("StorageDomain.connect", storagedomainID=sd, domainType=POSIXFS,
                   typeArgs=storage)
    for h in hosts:
        wait_acquired(h["url"], sd)
    return sd


@dataclasses.dataclass
class Restart:
    """How the engine's path started the VM."""
    path: str = "create"             # or "reconcile+create"
    refusals: int = 0                # VM.create answers 651 while the dead host's lease lives
    reconciled: list[str] | None = None   # the chain Image.reconcileVolumeChain returned
    seconds: float = 0.0             # from the first VM.create to the VM running


# How sanlock sees the holder of a lease (vmhost.storage.sanlock_adapter.host_state).
HOLDER_STATES = {"live": "renewing its host id", "fail": "no longer renewing, not yet dead",
                 "unknown": "not known yet to this host's sanlock"}


def _holder(message: str) -> str:
    """'host id 1 (sanlock: fail, ...)' out of a 651's message, which names the holder."""
    found = re.search(r"host id (\d+), (\w+)", message)
    if not found:
        return message
    meaning = HOLDER_STATES.get(found[2])
    return f"host id {found[1]} (sanlock: {found[2]}" + (f", {meaning})" if meaning else ")")


def engine_start(url: str, vm: str, params: dict, sd: str, img: str, timeout: float = 150,
                 say: Callable[[str], None] = lambda line: None,
                 label: Callable[[str], str] = lambda vol: vol[:8]) -> Restart:
    """The engine's path to start a VM whose host died, on the host at `url`:
    VM.create, retried while another host holds the VM lease (651, a refusal
    that must change nothing); if the leaf is ILLEGAL (227: the dead host had
    pivoted), the offline Image.reconcileVolumeChain and a create on the leaf it
    returns. params["devices"][0]["volumeID"] is the leaf the engine knew; it is
    updated. `say` gets a line for each new turn of events."""
    restart, started, last = Restart(), time.monotonic(), ""
    with Client(url, timeout=180) as c:
        def attempt() -> bool:
            nonlocal last
            disk = params["devices"][0]
            try:
                c.call("VM.create", vmID=vm, vmParams=params)
                return True
            except RpcError as err:
                if err.code == errors.PrepareIllegalVolume.code:
                    return _reconcile(c, sd, img, disk, restart, say, label)
                if err.code != errors.AcquireLockFailure.code or \
                        "held by another host" not in err.message:
                    raise EngineError(f"VM.create on {url}: {err}") from None
                if c.call("Host.getVMList") != []:
                    raise EngineError(f"a refused VM.create left a VM on {url}")
                restart.refusals += 1
                holder = _holder(err.message)
                if holder != last:
                    last = holder
                    say(f"VM.create refused ({err.code}): the VM lease is held by {holder}; "
                        f"retrying every {RETRY_INTERVAL:.0f}s")
                return False
        wait_for(attempt, timeout, f"{url} to start VM {vm}", interval=RETRY_INTERVAL)
    restart.seconds = time.monotonic() - started
    say(f"VM.create accepted on the leaf {label(params['devices'][0]['volumeID'])} "
        f"after {restart.refusals} refusals ({restart.seconds:.1f}s)")
    return restart


def _reconcile(c: Client, sd: str, img: str, disk: dict, restart: Restart,
               say: Callable[[str], None], label: Callable[[str], str]) -> bool:
    """The leaf the engine knew is ILLEGAL: ask the host which chain the image
    holds (it takes the image's lease, so it waits as VM.create does)."""
    try:
        chain = c.call("Image.reconcileVolumeChain", storagedomainID=sd, imageID=img,
                       leafVolID=disk["volumeID"])
    except RpcError as err:
        if err.code != errors.AcquireLockFailure.code:   # the image's lease lives on
            raise EngineError(f"Image.reconcileVolumeChain: {err}") from None
        return False
    say(f"VM.create refused (227): the leaf {label(disk['volumeID'])} is ILLEGAL (the dead host "
        f"had pivoted); Image.reconcileVolumeChain says the chain is "
        f"{' <- '.join(label(v) for v in chain)}")
    disk["volumeID"], restart.path, restart.reconciled = chain[-1], "reconcile+create", chain
    return False
