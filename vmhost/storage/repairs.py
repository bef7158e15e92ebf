"""Image repairs that outlive the VM that needed them: a merge job's storage
work, and the storage half of a VM.synchronizeDisks still pending.

A merge job keeps its record in the VM's libvirt metadata, and that record
dies with QEMU (our domains are transient). The storage work a job still owes
(sync the metadata chain, mark merged-away volumes ILLEGAL, drop the pivot
marker's volumes) must not die with it. So every merge writes an *intent*
here, in the agent's state dir, before its first side effect (write-ahead),
and removes it after its own cleanup is done:

| the VM at start-up / when the job ends | what happens to the intent               |
|-----------------------------------------|------------------------------------------|
| runs, and still carries the job record  | the job owns the image; intent kept      |
| runs, the job record is gone            | the job finished or never started: drop  |
| gone (QEMU died, destroyed, host reboot)| repair scheduled: runs when the domain   |
|                                         | is VALID, retried with backoff, survives |
|                                         | restarts (the file stays until done)     |

The repair itself is the engine's offline repair (Image.reconcileVolumeChain):
the chain is what the qcow2 headers say, walked from the leaf the job started
from; volumes at its top marked ILLEGAL are the pivot marker (set only after a
pivot, with the guest paused: see virt/merge.py), so they are dropped; then
the metadata is synced and, if the merge happened, the merged-away volumes
become ILLEGAL and the base takes the top's capacity. If a VM of this host
runs the image again by then, that VM owns the image (VM.synchronizeDisks):
the repair is handed over and dropped.

A chain sync (kind "sync", virt/disksync.py) lives the same way: its intent
is written before the VM view changes and removed once the storage half is
done; if the VM goes first, the repair syncs the metadata walked from the
leaf the storage knew to the qcow2 chain of the VM's last leaf
(StorageService.repair_chain_sync).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Callable, Protocol

from vmhost import errors, failpoints
from vmhost.fsutil import atomic_write, unlink_durable
from vmhost.ids import check_uuid, is_uuid
from vmhost.scheduler import DONE, Blocked, Outcome, Requirement, Retry, Scheduler

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Version 2 is written for the kinds a version-1 reader would take for a
# merge's repair; such a reader leaves them alone.
SYNC_FORMAT_VERSION = 2
MERGE, SYNC = "merge", "sync"


@dataclasses.dataclass
class ImageRepair:
    key: str                 # the merge (or disk sync) job's id
    vm_id: str
    domain: str
    image: str
    walk_from: str           # the drive's leaf when the job started
    base: str
    merged: list[str]        # volumes that leave the chain if the merge happened
    capacity: int            # the top's capacity (the base grows to it)
    reason: str = ""         # why it runs (set when the VM is gone)
    created: float = dataclasses.field(default_factory=time.time)
    kind: str = MERGE        # SYNC: the storage half of VM.synchronizeDisks
    leaf: str = ""           # SYNC: the VM's leaf (the qcow2 chain is walked from it)

    @classmethod
    def chain_sync(cls, key: str, vm_id: str, domain: str, image: str, walk_from: str,
                   chain: list[str]) -> "ImageRepair":
        """A drive's pending chain sync: `chain` is the VM's, base first."""
        return cls(key=key, vm_id=vm_id, domain=domain, image=image, walk_from=walk_from,
                   base=chain[0], merged=[], capacity=0, kind=SYNC, leaf=chain[-1])

    def to_dict(self) -> dict:
        version = SYNC_FORMAT_VERSION if self.kind == SYNC else FORMAT_VERSION
        return {"version": version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageRepair":
        if d.get("version") not in (FORMAT_VERSION, SYNC_FORMAT_VERSION):
            raise ValueError(f"unknown image repair version {d.get('version')!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        repair = cls(**{k: v for k, v in d.items() if k in fields})
        if repair.kind not in (MERGE, SYNC):
            raise ValueError(f"unknown image repair kind {repair.kind!r}")
        for name in ("key", "vm_id", "domain", "image", "walk_from", "base"):
            check_uuid(getattr(repair, name), name)
        if repair.kind == SYNC:
            check_uuid(repair.leaf, "leaf")
        for vol in repair.merged:
            check_uuid(vol, "merged")
        return repair

    def what(self) -> str:
        job = "merge job" if self.kind == MERGE else "disk sync"
        return f"storage repair of image {self.image} after {job} {self.key} of VM {self.vm_id}"


class RepairStorage(Protocol):
    def repair_after_merge(self, sd_uuid: str, img_uuid: str, walk_from: str, base: str,
                           merged: list[str], capacity: int) -> list[str]: ...
    def repair_chain_sync(self, sd_uuid: str, img_uuid: str, walk_from: str,
                          leaf: str) -> list[str]: ...
    def domain_valid(self, sd_uuid: str) -> bool: ...


class Repairs(Protocol):
    """Where a job's storage work goes when its VM does (ImageRepairs)."""
    def intend(self, repair: ImageRepair) -> None: ...
    def has(self, key: str) -> bool: ...
    def cancel(self, key: str) -> None: ...
    def start(self, key: str, reason: str) -> bool: ...


class NoRepairs:
    def intend(self, repair: ImageRepair) -> None: pass
    def has(self, key: str) -> bool: return False
    def cancel(self, key: str) -> None: pass
    def start(self, key: str, reason: str) -> bool: return False


class ImageRepairs:
    def __init__(self, state_dir: str | None, storage: RepairStorage, scheduler: Scheduler,
                 publish: Callable[[dict], None] = lambda event: None):
        self._dir = os.path.join(state_dir, "repairs") if state_dir else None
        self._storage = storage
        self._scheduler = scheduler
        self._publish = publish
        self._lock = threading.Lock()
        self._intents: dict[str, ImageRepair] = {}
        self._load()

    # --- the store ------------------------------------------------------

    def _path(self, key: str) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, f"{check_uuid(key, 'repair key')}.json")

    def _load(self) -> None:
        if not self._dir or not os.path.isdir(self._dir):
            return
        for name in sorted(os.listdir(self._dir)):
            key, ext = os.path.splitext(name)
            if ext != ".json" or not is_uuid(key):
                continue   # temp files of a writer that died are removed by atomic_write
            try:
                with open(os.path.join(self._dir, name), "rb") as f:
                    self._intents[key] = ImageRepair.from_dict(json.load(f))
            except (OSError, ValueError, TypeError, errors.VmhostError) as e:
                # Kept on disk for an operator; never stops the agent.
                log.error("image repair %s is unreadable, left alone: %s", name, e)

    def _write(self, repair: ImageRepair) -> None:
        if self._dir:
            os.makedirs(self._dir, exist_ok=True)
            atomic_write(self._path(repair.key), json.dumps(repair.to_dict()).encode())

    # --- used by the merge flow -----------------------------------------

    def intend(self, repair: ImageRepair) -> None:
        """Write-ahead: the job may leave storage work behind from now on."""
        with self._lock:
            self._write(repair)
            self._intents[repair.key] = repair

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._intents

    def cancel(self, key: str) -> None:
        """The job did its own storage work (or never started)."""
        with self._lock:
            if self._intents.pop(key, None) is not None and self._dir:
                unlink_durable(self._path(key))

    def start(self, key: str, reason: str) -> bool:
        """The VM is gone: the repair runs when the domain is VALID. False if
        there is no intent for that key."""
        with self._lock:
            repair = self._intents.get(key)
            if repair is None:
                return False
            if not repair.reason:
                repair.reason = reason
                self._write(repair)
        failpoints.hit("repair.queued")
        log.warning("image %s: %s; storage repair queued", repair.image, reason)
        self._submit(repair)
        return True

    def resume(self, owned: set[str], running_vms: set[str]) -> None:
        """After VM recovery: start the repairs whose VM is gone; drop those whose
        VM runs without the job (it finished, or never started)."""
        with self._lock:
            intents = list(self._intents.values())
        for repair in intents:
            if repair.key in owned:
                continue
            if repair.vm_id in running_vms:
                self.cancel(repair.key)
            else:
                self.start(repair.key, repair.reason or "the VM was gone at agent start-up")

    def pending(self) -> list[dict]:
        with self._lock:
            return [r.to_dict() for r in self._intents.values() if r.reason]

    # --- the work item --------------------------------------------------

    def _submit(self, repair: ImageRepair) -> None:
        self._scheduler.submit(f"repair/{repair.key}", repair.what(),
                               lambda: self._run(repair.key))

    def _run(self, key: str) -> Outcome:
        with self._lock:
            repair = self._intents.get(key)
        if repair is None:
            return DONE
        if not self._storage.domain_valid(repair.domain):
            return Blocked(Requirement(f"storage domain {repair.domain} is VALID",
                                       ("domain", repair.domain),
                                       lambda: self._storage.domain_valid(repair.domain)))
        try:
            if repair.kind == SYNC:
                chain = self._storage.repair_chain_sync(repair.domain, repair.image,
                                                        repair.walk_from, repair.leaf)
            else:
                chain = self._storage.repair_after_merge(repair.domain, repair.image,
                                                         repair.walk_from, repair.base,
                                                         repair.merged, repair.capacity)
            outcome = "repaired"
        except errors.VolumeIsBusy as e:
            chain, outcome = [], f"handed over: {e}"
        except (errors.ImageFileNotFound, errors.StorageDomainDoesNotExist) as e:
            # The engine removed the volumes (or the domain) meanwhile.
            chain, outcome = [], f"nothing left to repair: {e}"
        except errors.InvalidParameter as e:
            # The metadata chain no longer leads to the VM's chain (the engine
            # reconciled or replaced the image meanwhile): retrying cannot help.
            chain, outcome = [], f"not applicable any more: {e}"
        except Exception as e:
            log.warning("image %s: storage repair failed: %s", repair.image, e)
            return Retry(f"storage repair of image {repair.image} failed: {e}")
        failpoints.hit("repair.done.before_forget")
        self.cancel(key)
        log.info("image %s: storage repair after job %s: %s %s", repair.image, key, outcome,
                 chain)
        self._publish({"event": "repair", "jobId": key, "vmId": repair.vm_id,
                       "domainID": repair.domain, "imageID": repair.image,
                       "outcome": outcome, "chain": chain})
        return DONE
