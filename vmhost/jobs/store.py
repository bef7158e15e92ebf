"""Where job records live; every write is made before the side effect it
announces (write-ahead), so a restarted agent finds each job in the state
whose step it has to run (again).

- VmJobStore: a VM-bound job's record is in the VM definition (by job id:
  `definition.jobs` for the live merge, `definition.agent_jobs` for the
  agent's own kinds, which share it and are told apart by "kind"),
  persisted into the libvirt domain's metadata: it travels with the domain
  and needs no storage.
- DomainJobStore: a storage job's record is a file on its storage domain
  (`<domain>/jobs/<job>.json`, written atomically), so any host that sees
  the domain finds it.
"""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Generic, Protocol, TypeVar

from vmhost import errors, failpoints
from vmhost.fsutil import atomic_write, fsync_dir, unlink_durable
from vmhost.ids import check_uuid, is_uuid
from vmhost.jobs.record import Record

if TYPE_CHECKING:
    from vmhost.storage.domain import StorageDomain
    from vmhost.virt.vm import Vm

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Record)
UNREADABLE = (ValueError, TypeError, KeyError, errors.VmhostError)


class JobStore(Protocol[R]):
    """What both stores offer; `where` is the VM or the storage domain."""
    def save(self, where: Any, job: R) -> None: ...
    def remove(self, where: Any, job_id: str) -> None: ...
    def readable(self, where: Any) -> list[R]: ...


class VmJobStore(Generic[R]):
    """The records of one job kind in VM definitions, in the map named
    `field` (kinds that write "kind" may share one and each sees only its
    own records). Callers hold the VM's lock."""

    def __init__(self, kind: type[R], persist: Callable[["Vm"], None], field: str = "jobs"):
        self.kind = kind
        self._persist = persist
        self._field = field

    def _map(self, vm: "Vm") -> dict[str, dict]:
        return getattr(vm.definition, self._field)

    def _mine(self, rec: object) -> bool:
        # (a record without "kind" is any kind's, as Record.upgrade reads it)
        return isinstance(rec, dict) and (not self.kind.WRITES_KIND
                                          or rec.get("kind", self.kind.KIND) == self.kind.KIND)

    def records(self, vm: "Vm") -> list[dict]:
        """The raw records, unreadable ones included (reports show them as they are)."""
        return [r for r in list(self._map(vm).values()) if self._mine(r)]

    def get(self, vm: "Vm", job_id: str) -> R | None:
        rec = self._map(vm).get(job_id)
        return None if rec is None else self.kind.from_record(rec)

    def readable(self, vm: "Vm") -> list[R]:
        """The jobs whose records recovery could read (vm.bad_jobs lists the others)."""
        return [self.kind.from_record(r) for k, r in list(self._map(vm).items())
                if k not in vm.bad_jobs and self._mine(r)]

    def put(self, vm: "Vm", job: R) -> None:
        """The record in memory only: the caller persists it together with
        other changes of the definition, in one write."""
        self._map(vm)[job.id] = job.to_record()

    def save(self, vm: "Vm", job: R) -> None:
        """Persist the record; if libvirt cannot store it, memory keeps the old one."""
        previous = self._map(vm).get(job.id)
        self.put(vm, job)
        state = job.job_state.value
        failpoints.hit(f"{job.KIND}.save.{state}.before")
        try:
            self._persist(vm)
            failpoints.hit(f"{job.KIND}.save.{state}.after")
        except BaseException:
            self.put_back(vm, job.id, previous)
            raise

    def take(self, vm: "Vm", job_id: str) -> dict | None:
        """Remove the record from memory only (the caller persists, or puts it back)."""
        return self._map(vm).pop(job_id, None)

    def remove(self, vm: "Vm", job_id: str) -> None:
        """Remove the record and persist; memory keeps it if libvirt cannot store that."""
        rec = self.take(vm, job_id)
        try:
            self._persist(vm)
        except BaseException:
            self.put_back(vm, job_id, rec)
            raise

    def put_back(self, vm: "Vm", job_id: str, rec: dict | None) -> None:
        """Undo take/save in memory: the record is `rec` again (None: absent)."""
        if rec is None:
            self._map(vm).pop(job_id, None)
        else:
            self._map(vm)[job_id] = rec


class DomainJobStore(Generic[R]):
    """The records of one job kind on storage domains. Call it on the
    domain's executor: it reads and writes the domain's files."""

    def __init__(self, kind: type[R]):
        self.kind = kind

    @staticmethod
    def path(dom: "StorageDomain", job_id: str) -> str:
        return os.path.join(dom.jobs_dir(), f"{check_uuid(job_id, 'job id')}.json")

    def save(self, dom: "StorageDomain", job: R) -> None:
        directory = dom.jobs_dir()
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o755, exist_ok=True)
            fsync_dir(os.path.dirname(directory))
        atomic_write(self.path(dom, job.id), json.dumps(job.to_record()).encode())

    def get(self, dom: "StorageDomain", job_id: str) -> R | None:
        """The job's record as the domain holds it now; None once it is gone."""
        try:
            with open(self.path(dom, job_id), "rb") as f:
                return self.kind.from_record(json.load(f))
        except FileNotFoundError:
            return None

    def remove(self, dom: "StorageDomain", job_id: str) -> None:
        unlink_durable(self.path(dom, job_id))

    def readable(self, dom: "StorageDomain") -> list[R]:
        """Readable records on the domain; unreadable ones are logged and
        left for an operator (they never stop the others)."""
        try:
            names = sorted(os.listdir(dom.jobs_dir()))
        except FileNotFoundError:
            return []
        jobs = []
        for name in names:
            key, ext = os.path.splitext(name)
            if ext != ".json" or not is_uuid(key):
                continue    # temp files of a writer that died: atomic_write removes them
            try:
                with open(os.path.join(dom.jobs_dir(), name), "rb") as f:
                    jobs.append(self.kind.from_record(json.load(f)))
            except (OSError, *UNREADABLE) as e:
                log.error("storage job record %s on domain %s is unreadable, left alone: %s",
                          name, dom.uuid, e)
        return jobs
