"""VM recovery: rebuild the registry from libvirt at start-up, and re-read
every VM's state after libvirtd reconnects.

Recovery reads libvirt only: each domain carrying vmhost metadata is rebuilt
from that metadata, and only drives with a pending chain change (a snapshot
or a block job) are re-read from the live XML. No storage access. A domain
that cannot be recovered is reported (log, event) and left alone; one VM never
stops the recovery of the others.

Recovery is the one path that resumes every VM-bound job kind: the
write-ahead fields of older definitions become job records first
(`_upgrade_legacy`); a snapshot job is resolved here from the live XML (its
record removed); live merge and disk sync jobs are handed to their modules
once the VM is registered. An unreadable record of any kind is reported on
the VM and kept as it is.
"""
from __future__ import annotations

import json
import logging
from typing import Callable

import libvirt

from vmhost import errors
from vmhost.jobs.record import Record
from vmhost.jobs.store import VmJobStore
from vmhost.virt import domread, domxml
from vmhost.virt.disksync import DiskSynchronizer, DiskSyncJob
from vmhost.virt.merge import Merger, MergeJob
from vmhost.virt.registry import VmRegistry
from vmhost.virt.snapshot import SnapshotJob
from vmhost.virt.vm import DOWN, Vm, status_from_state
from vmhost.virt.vmdef import DefinitionError, VmDefinition

log = logging.getLogger(__name__)


class VmRecovery:
    def __init__(self, registry: VmRegistry, conn: Callable[[], libvirt.virConnect],
                 merger: Merger, disksync: DiskSynchronizer, publish: Callable[[dict], None],
                 host_id: str):
        self._registry = registry
        self._conn = conn
        self._merger = merger
        self._disksync = disksync
        self._publish = publish
        self._host_id = host_id
        self._snapshots: VmJobStore[SnapshotJob] = VmJobStore(
            SnapshotJob, persist=lambda vm: vm.persist(self._conn()), field="agent_jobs")

    def recover(self) -> int:
        """Rebuild VMs from libvirt alone; returns how many were recovered."""
        conn = self._conn()
        found: dict[str, tuple[Vm, libvirt.virDomain]] = {}
        states = _all_states(conn)
        for read in domread.read_all(conn.listAllDomains(0)):
            dom = read.dom
            try:
                if read.error is not None:
                    raise read.error
                vm = self._recover_one(conn, dom, read.payload, states.get(dom.UUIDString()))
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # went away while we listed
                if e.get_error_code() in (libvirt.VIR_ERR_SYSTEM_ERROR,
                                          libvirt.VIR_ERR_INTERNAL_ERROR,
                                          libvirt.VIR_ERR_NO_CONNECT,
                                          libvirt.VIR_ERR_INVALID_CONN):
                    raise   # libvirtd itself: recovery is retried as a whole
                self._unrecoverable(dom, f"libvirt: {e}")
                continue
            except DefinitionError as e:
                self._unrecoverable(dom, str(e))
                continue
            except Exception as e:   # one VM never stops the recovery of the others
                log.exception("domain %s: recovery failed", _uuid_of(dom))
                self._unrecoverable(dom, f"{type(e).__name__}: {e}")
                continue
            if vm is not None:
                found[vm.id] = (vm, dom)
        self._registry.add(vm for vm, _ in found.values())
        # Registered first: a resumed job's work item looks its VM up.
        for vm, dom in found.values():
            try:
                if vm.definition.jobs:
                    self._merger.resume(vm, dom)
                self._disksync.resume(vm)
            except Exception as e:
                log.exception("VM %s: cannot resume its jobs", vm.id)
                vm.recovery_error = f"cannot resume its jobs: {type(e).__name__}: {e}"
                self._publish({"event": "vm_recovery_error", "vmId": vm.id,
                               "error": vm.recovery_error})
            vm.jobs_known = True
        log.info("recovered %d VM(s)", len(found))
        return len(found)

    def owned_jobs(self) -> set[str]:
        """Ids of the job records that recovered VMs carry (their jobs own their
        images): live merges' and the agent's own kinds' (a disk sync's)."""
        return {job_id for vm in self._registry.all()
                for job_id in (*vm.definition.jobs, *vm.definition.agent_jobs)}

    def _unrecoverable(self, dom: libvirt.virDomain, reason: str) -> None:
        """Reported (log, event), never adopted."""
        uuid = _uuid_of(dom)
        log.error("domain %s: cannot be recovered, left alone: %s", uuid, reason)
        self._publish({"event": "vm_recovery_error", "vmId": uuid, "error": reason})

    def _recover_one(self, conn: libvirt.virConnect, dom: libvirt.virDomain, payload: str | None,
                     state: tuple[int, int] | None = None) -> Vm | None:
        if payload is None:
            return None  # not ours
        try:
            definition = VmDefinition.from_json(payload)
        except DefinitionError as e:
            if _foreign(payload, self._host_id):
                return None
            raise DefinitionError(f"its vmhost metadata is unreadable: {e}") from None
        if definition.host_id and definition.host_id != self._host_id:
            # Another agent instance runs it (one agent per libvirtd is the
            # rule; this keeps two from driving the same VM's jobs).
            log.warning("domain %s belongs to agent %s, not to us (%s): ignored",
                        dom.UUIDString(), definition.host_id, self._host_id)
            return None
        vm = Vm(definition, *status_from_state(*(state or dom.state())))
        _upgrade_legacy(definition)
        bad = {**_bad_job_records(definition.jobs, MergeJob.from_record),
               **_bad_job_records(definition.agent_jobs, _agent_job)}
        if bad:
            # Reported on the VM and kept as they are (a newer agent may read
            # them): the VM is adopted, so the engine can still see and stop it;
            # their drives stay busy for new merges.
            vm.bad_jobs.update(bad)
            vm.recovery_error = "; ".join(f"job {k}: {v}" for k, v in bad.items())
            log.error("VM %s: unreadable job record(s): %s", vm.id, vm.recovery_error)
            self._publish({"event": "vm_recovery_error", "vmId": vm.id,
                           "error": vm.recovery_error})
        # Only drives with a tracked change are asked about: a snapshot that
        # was switching leaves, or a block job.
        snapshots = self._snapshots.readable(vm)
        switching = {name for job in snapshots for name in job.drives}
        stale = sorted(switching | set(Merger.tracked_drives(vm)))
        if stale:
            changed = vm.apply_live_chain(domxml.live_disks(dom.XMLDesc(0)), stale)
            if changed or snapshots:
                for job in snapshots:   # resolved: the live XML is the answer
                    self._snapshots.take(vm, job.id)
                vm.persist(conn)
            log.info("VM %s: re-read chains of %s from libvirt", vm.id, ", ".join(stale))
        return vm

    def refresh_status(self) -> None:
        """Poll libvirt for every VM's state (after a reconnect events may be lost)."""
        conn = self._conn()
        for vm in self._registry.all():
            try:
                vm.status, vm.pause_code = status_from_state(*vm.domain(conn).state())
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    vm.status = DOWN
                    vm.exit_message = "domain disappeared"


def _all_states(conn: libvirt.virConnect) -> dict[str, tuple[int, int]]:
    """(state, reason) of every domain in one libvirt call: recovery then
    spends no call per VM on its state (one round trip per VM was a fifth of
    the recovery step at 200 VMs). A domain missing here is asked on its own."""
    try:
        stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
    except (libvirt.libvirtError, AttributeError):
        return {}
    return {dom.UUIDString(): (s["state.state"], s["state.reason"]) for dom, s in stats
            if "state.state" in s and "state.reason" in s}


def _uuid_of(dom: libvirt.virDomain) -> str:
    try:
        return dom.UUIDString()
    except libvirt.libvirtError:
        return "?"


def _foreign(payload: str, host_id: str) -> bool:
    """A definition we cannot parse but that names another agent is not ours."""
    try:
        owner = json.loads(payload).get("hostId")
    except (ValueError, AttributeError):
        return False
    return bool(owner) and owner != host_id


def _upgrade_legacy(definition: VmDefinition) -> None:
    """The old write-ahead fields (`pendingSync`, `storageSync`) as job
    records, in memory: the next persist writes the new format."""
    legacy = definition.legacy
    jobs: list[Record] = [*SnapshotJob.from_legacy(legacy),
                          *DiskSyncJob.from_legacy(definition.vm_id, legacy)]
    for job in jobs:
        definition.agent_jobs.setdefault(job.id, job.to_record())
    definition.legacy = {}


_AGENT_KINDS: dict[str, type[Record]] = {k.KIND: k for k in (SnapshotJob, DiskSyncJob)}


def _agent_job(rec: dict) -> Record:
    kind = _AGENT_KINDS.get(rec.get("kind"))   # type: ignore[arg-type]
    if kind is None:
        raise ValueError(f"unknown job kind {rec.get('kind')!r}")
    return kind.from_record(rec)


def _bad_job_records(jobs: dict, parse: Callable[[dict], object]) -> dict[str, str]:
    bad = {}
    for job_id, rec in jobs.items():
        try:
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            parse(dict(rec))
        except (ValueError, TypeError, KeyError, errors.VmhostError) as e:
            bad[job_id] = f"{type(e).__name__}: {e}"
    return bad
