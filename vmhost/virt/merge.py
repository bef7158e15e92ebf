"""Live merge: a write-ahead job state machine around libvirt's blockCommit.

A merge removes volumes from a running VM's chain by committing `top` into
`base`. Internal merge: top is not the active leaf; QEMU rewrites the child's
backing pointer and the job ends by itself. Active merge: top is the leaf; the
job becomes ready and a pivot makes base the new leaf.

The job record lives in the VM definition (the libvirt domain metadata) and is
persisted *before* each side effect, so every crash point maps to exactly one
recovery action: load the record and run the state's step again. Every step is
idempotent and decides from what libvirt shows now (blockJobInfo + the live
XML chain), never from events (they only trigger an earlier poll) and never
from a job's absence alone (the outcome is read from the chain).

State table (recovery = what a restarted agent does; it is the same step):

| state    | meaning / persisted before              | step (poll, and recovery)                                  |
|----------|-----------------------------------------|------------------------------------------------------------|
| STARTING | validated; the image repair intent is   | libvirt job present -> COMMIT; top gone from the live      |
|          | written; before blockCommit             | chain -> CLEANUP; else call blockCommit (again) -> COMMIT  |
| COMMIT   | blockCommit was called                  | job present: report cur/end; active and <mirror            |
|          |                                         | ready='yes'> -> READY. job absent -> CLEANUP               |
| READY    | active job ready for a pivot            | needs the domain VALID (the marker must be writable right  |
|          |                                         | after the pivot) and a pivot slot (pivotslots.py; waits    |
|          |                                         | with the guest running). -> PIVOT (paused_for_pivot unless |
|          |                                         | the VM is already paused)                                  |
| PIVOT    | before pausing the VM and the pivot     | job present and ready: pause the VM, hold the image lease  |
|          |                                         | (shared domain; not to be had: no pivot), lift the         |
|          |                                         | bandwidth limit, pivot, wait until the live chain shows    |
|          |                                         | base as leaf                                               |
|          |                                         | -> CLEANUP (the VM stays paused). Pivot error: resume,     |
|          |                                         | -> READY and retry with backoff, or past the time budget   |
|          |                                         | -> ABORTING. Job absent -> CLEANUP                         |
| ABORTING | abort requested (API or pivot budget);  | resume if we paused. job present: blockJobAbort (no       |
|          | before blockJobAbort                    | pivot). Job absent -> CLEANUP                              |
| CLEANUP  | libvirt has no job for us any more      | VM definition re-read from the live chain; storage (needs  |
|          |                                         | the domain VALID, done outside the VM lock): chain sync    |
|          |                                         | (four cases; after a pivot it marks the old top ILLEGAL),  |
|          |                                         | THEN resume the VM if we paused it; if top left the chain: |
|          |                                         | base capacity, base LEAF after an active merge, merged-    |
|          |                                         | away volumes ILLEGAL. Outcome from the chain: DONE,        |
|          |                                         | ABORTED or FAILED; the record and the intent are removed   |

The pivot marker means exactly one thing. A volume at the top of a qcow2
chain marked ILLEGAL (what Image.reconcileVolumeChain drops) means: a pivot
completed away from it and the guest has written only to the base since.
It is never set before a pivot: in READY an active commit copies guest
writes to the base in the background (at the job's bandwidth), so the base
may lag the top, and if QEMU died then, dropping the top would lose writes
the guest saw completed. Instead the VM is paused for the pivot itself:
  paused, pivot not done   -> top LEGAL; top-over-base holds every write;
  paused, pivot done       -> top LEGAL or ILLEGAL: no guest write since the
                              mirror converged, so top-over-base == base;
  marker written           -> only then is the VM resumed; new writes go to
                              the base, and the top is ILLEGAL.
So whatever point QEMU (or the host) dies at, the chain that survives holds
every acknowledged write. VM.cont is refused while a job holds the VM paused.
On a shared domain libvirt gives QEMU's leases up at the pause: the agent
holds the image's lease itself from the pause until the marker is written,
and gives it back before the resume (libvirt takes it again for QEMU then).
Another host took it after the pause: no pivot (resume, READY, retry).

Ownership: while a drive has a live job, only the job touches that drive's
storage metadata (VM.synchronizeDisks skips such a drive). Every job leaves
vmJobs once its cleanup is done, whatever its outcome (the engine waits for
that); the outcome and reason stay in the job history and in the job's last
notification. If the VM goes down while a job is live, the job ends FAILED
and its storage work is handed to an image repair (storage/repairs.py) that
survives agent restarts and runs when the domain is VALID.

Storage I/O never runs under the VM's lock: a step decides under the lock,
returns an _Outside (vmhost.jobs.runner.Outside: the storage call and its
continuation), the runner (run_steps) makes the call without the lock, and
the continuation re-checks the record under the lock before it persists
anything. The scheduler runs one work item per job at a time, so the job's
own steps never race each other.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import time
import uuid
from typing import Any, Callable, Protocol

import libvirt

from vmhost import errors, failpoints
from vmhost.ids import check_uuid
from vmhost.jobs.record import Record
from vmhost.jobs.report import VmJobsReport, record_history
from vmhost.jobs.runner import Outside as _Outside, run_steps
from vmhost.jobs.store import UNREADABLE, VmJobStore
from vmhost.scheduler import DONE, Blocked, Outcome, Requirement, Retry, Scheduler, Wait
from vmhost.storage.repairs import ImageRepair, NoRepairs, Repairs
from vmhost.virt import domxml
from vmhost.virt.jobhistory import JobHistory
from vmhost.virt.pivotslots import DEFAULT_SLOTS, PivotSlots
from vmhost.virt.vm import DOWN, Vm

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    STARTING = "STARTING"
    COMMIT = "COMMIT"
    READY = "READY"
    PIVOT = "PIVOT"
    ABORTING = "ABORTING"
    CLEANUP = "CLEANUP"
    # Terminal states: never persisted (the record is removed), kept in the
    # history. FAILED records of older agents are still read (and ended).
    FAILED = "FAILED"
    DONE = "DONE"
    ABORTED = "ABORTED"


LIVE_STATES = {State.STARTING, State.COMMIT, State.READY, State.PIVOT, State.ABORTING,
               State.CLEANUP}


def upgrade_v1(d: dict) -> dict:
    """Version 1 is VDSM's live merge record (livemerge.Job.to_dict: id, drive,
    disk{domainID, imageID, volumeID}, base, top, bandwidth, state, extend,
    pivot), so a VM whose job came from a VDSM host, or from an agent of the
    first format, can still be finished here. VDSM's states map onto ours;
    the chain at start is unknown in v1 and is rebuilt from base..top."""
    disk = d["disk"]
    state = {"INIT": "STARTING", "EXTEND": "STARTING", "COMMIT": "COMMIT",
             "CLEANUP": "CLEANUP"}.get(d.get("state", "COMMIT"), "COMMIT")
    if state == "CLEANUP" and d.get("pivot"):
        state = "READY"  # VDSM's cleanup with pivot pending = our READY
    return {"id": d["id"], "drive": d["drive"], "domain": disk["domainID"],
            "image": disk["imageID"], "leaf": disk["volumeID"], "base": d["base"],
            "top": d["top"], "chain": [d["base"], d["top"]] if d["top"] != d["base"] else [d["base"]],
            "bandwidth": int(d.get("bandwidth", 0)), "state": state}


@dataclasses.dataclass
class MergeJob(Record):
    KIND = "merge"
    VERSION = 2
    STATES = State
    UUID_FIELDS = ("id", "domain", "image", "leaf", "base", "top")
    UPGRADES = {1: upgrade_v1}
    UNVERSIONED = 1        # VDSM's records carry no version
    WRITES_KIND = False    # (and ours never did)

    id: str
    drive: str                 # libvirt target ("vda"): stable across a pivot
    domain: str
    image: str
    leaf: str                  # the drive's leaf when the merge started
    base: str
    top: str
    chain: list[str]           # the live chain when the merge started, base first
    bandwidth: int             # MiB/s, 0 = unlimited
    state: State = State.STARTING
    pivot_attempts: int = 0
    pivot_failing_since: float = 0.0   # wall clock of the first failed pivot in a row
    paused_for_pivot: bool = False     # the job pauses the VM for the pivot
    abort_requested: bool = False
    error: str = ""
    top_capacity: int = 0
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def active(self) -> bool:
        return self.top == self.leaf

    @property
    def merged_volumes(self) -> list[str]:
        """Volumes that leave the chain when the merge succeeds."""
        return self.chain[self.chain.index(self.base) + 1: self.chain.index(self.top) + 1]

    def check(self) -> None:
        if self.base not in self.chain or self.top not in self.chain:
            raise ValueError(f"job record {self.id}: base/top not in its chain")

    def repair(self, vm_id: str) -> ImageRepair:
        """The storage work this job owes if its VM goes away."""
        return ImageRepair(key=self.id, vm_id=vm_id, domain=self.domain, image=self.image,
                           walk_from=self.leaf, base=self.base, merged=self.merged_volumes,
                           capacity=self.top_capacity)


def job_entry(rec: dict, live: dict | None = None) -> dict:
    """The vmJobs entry of a job record (raw, or of any version)."""
    disk = rec.get("disk") if isinstance(rec.get("disk"), dict) else {}
    live = live or {}
    entry = {"id": rec.get("id"), "jobType": "block", "blockJobType": "commit",
             "drive": rec.get("drive"), "imgUUID": rec.get("image", disk.get("imageID")),
             "bandwidth": rec.get("bandwidth", 0), "cur": str(live.get("cur", 0)),
             "end": str(live.get("end", 0)), "state": str(rec.get("state", "")).lower(),
             "baseVolUUID": rec.get("base"), "topVolUUID": rec.get("top")}
    if rec.get("error"):
        entry["error"] = rec["error"]
    return entry


class DomainAdapter(Protocol):
    """The libvirt surface a merge uses (a seam for unit tests)."""
    def blockCommit(self, disk, base, top, bandwidth=0, flags=0): ...
    def blockJobInfo(self, disk, flags=0): ...
    def blockJobAbort(self, disk, flags=0): ...
    def blockJobSetSpeed(self, disk, bandwidth, flags=0): ...
    def XMLDesc(self, flags=0): ...
    def state(self, flags=0): ...
    def suspend(self): ...
    def resume(self): ...


class MergeStorage(Protocol):
    def volume_info(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> dict: ...
    def sync_volume_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                          actual: list[str]) -> str: ...
    def finish_merge(self, sd_uuid: str, img_uuid: str, base: str, merged: list[str],
                     capacity: int, base_is_leaf: bool) -> None: ...
    def domain_valid(self, sd_uuid: str) -> bool: ...
    # libvirt gives a VM's leases up while it is paused: the agent holds the
    # image's lease itself from the pause for a pivot until the pivot marker is
    # written (no-op where there are no leases; 651 if another host has it).
    def hold_image(self, sd_uuid: str, img_uuid: str) -> None: ...
    def release_image(self, sd_uuid: str, img_uuid: str) -> None: ...


@dataclasses.dataclass
class MergeConfig:
    poll_interval: float = 1.0      # seconds between polls of a running job
    pivot_budget: float = 300.0     # seconds of failing pivots before the job is aborted
    pivot_timeout: float = 10.0     # seconds to wait for the live XML after a pivot
    final_entry_ttl: float = 30.0   # seconds a finished job stays visible once shown
    pivot_slots: int = DEFAULT_SLOTS  # VMs paused for a pivot at once (vmhost.virt.pivotslots)


class Merger:
    """Starts, drives, aborts and reports the merge jobs of every VM."""

    def __init__(self, storage: MergeStorage, scheduler: Scheduler,
                 vm_lookup: Callable[[str], Vm | None],
                 domain_of: Callable[[Vm], DomainAdapter],
                 persist: Callable[[Vm], None],
                 config: MergeConfig | None = None,
                 publish: Callable[[dict], None] = lambda event: None,
                 history: JobHistory | None = None,
                 repairs: Repairs | None = None):
        self._storage = storage
        self._scheduler = scheduler
        self._vm_lookup = vm_lookup
        self._domain_of = domain_of
        self._persist = persist
        self.config = config or MergeConfig()
        self._publish = publish
        self.repairs: Repairs = repairs or NoRepairs()
        self._live: dict[str, dict] = {}            # job id -> last blockJobInfo
        self._last_event: dict[tuple[str, str], str] = {}   # (vm, drive) -> status name
        # (through self._persist, which tests replace)
        self._store = VmJobStore(MergeJob, persist=lambda vm: self._persist(vm))
        self.report = VmJobsReport(ttl=lambda: self.config.final_entry_ttl)
        self.history = history or JobHistory(None)
        self.pivot_slots = PivotSlots(self.config.pivot_slots)

    # --- API ------------------------------------------------------------

    def merge(self, vm: Vm, drive_spec: dict, base: str, top: str, bandwidth: int = 0,
              job_id: str | None = None) -> str:
        job_id = check_uuid(job_id, "jobUUID") if job_id else str(uuid.uuid4())
        for key in ("domainID", "imageID", "volumeID"):
            check_uuid(drive_spec.get(key), f"drive.{key}")
        check_uuid(base, "baseVolUUID")
        check_uuid(top, "topVolUUID")
        if not isinstance(bandwidth, int) or bandwidth < 0:
            raise errors.InvalidParameter(f"bandwidth must be a non-negative integer, got {bandwidth!r}")
        with vm.lock:
            drive, chain = self._validate_live(vm, drive_spec, base, top, job_id)
        # Storage reads outside the VM lock; the live checks are repeated below.
        base_info = self._storage.volume_info(drive.domain, drive.image, base)
        top_info = self._storage.volume_info(drive.domain, drive.image, top)
        if base_info["voltype"] == "SHARED":
            raise errors.MergeFailed(f"base {base} is a shared (template) volume")
        with vm.lock:
            again = self._validate_live(vm, drive_spec, base, top, job_id)
            if again[1] != chain:
                raise errors.MergeFailed(f"the chain of drive {drive.name} changed meanwhile")
            job = MergeJob(id=job_id, drive=drive.name, domain=drive.domain, image=drive.image,
                           leaf=drive.volume, base=base, top=top, chain=chain,
                           bandwidth=bandwidth, top_capacity=int(top_info["capacity"]))
            # A new merge acknowledges a FAILED record left by an older agent.
            for old in self._jobs(vm):
                if old.drive == job.drive and old.state is State.FAILED:
                    self._forget(vm, old)
            self._last_event.pop((vm.id, job.drive), None)
            self.repairs.intend(job.repair(vm.id))        # write-ahead, in the state dir
            failpoints.hit("merge.intent.written")
            try:
                self._save(vm, job, None, "merge requested")  # write-ahead: STARTING
            except BaseException:
                self.repairs.cancel(job.id)
                raise
            self.report.started(job.id)   # shown once, even if it ends before a stats call
            try:
                self._block_commit(self._domain_of(vm), job)
            except libvirt.libvirtError as e:
                self._start_failed(vm, job, f"blockCommit failed: {e}")
                raise errors.MergeFailed(f"libvirt refused the commit: {e}") from None
            # From here on the commit runs: whatever happens, the work item
            # exists, and its STARTING step finds the libvirt job.
            try:
                self._transition(vm, job, State.COMMIT, "blockCommit started")
            except Exception as e:
                log.warning("merge job %s: cannot persist COMMIT yet (%s); the job's "
                            "work item carries on from STARTING", job.id, e)
            finally:
                self._submit(vm.id, job.id)
        return job.id

    def _start_failed(self, vm: Vm, job: MergeJob, reason: str) -> None:
        """blockCommit was refused: the job leaves no trace, or, if even that
        cannot be persisted, ends through its own work item."""
        self.report.unstarted(job.id)
        rec = self._store.take(vm, job.id)
        try:
            self._persist(vm)
        except Exception as e:
            log.warning("merge job %s: cannot remove the record (%s); ending it later",
                        job.id, e)
            job.error, job.state = reason, State.CLEANUP
            vm.definition.jobs[job.id] = {**rec, **job.to_record()}
            self._submit(vm.id, job.id)
            return
        self.repairs.cancel(job.id)
        self._emit(vm, job, State.STARTING, State.FAILED, reason)

    def abort(self, vm: Vm, job_id: str, wait: float = 30.0) -> dict:
        check_uuid(job_id, "jobUUID")
        with vm.lock:
            job = self._job(vm, job_id)
            if job.state is State.FAILED:
                raise errors.MergeFailed(f"job {job_id} already failed: {job.error}")
            if job.state in (State.CLEANUP, State.PIVOT):
                raise errors.MergeFailed(f"job {job_id} is {job.state.value}: it cannot be "
                                         "aborted any more; it is being finished")
            if job.state is not State.ABORTING:
                job.abort_requested = True
                self._transition(vm, job, State.ABORTING, "abort requested")
        self._submit(vm.id, job_id)
        self._scheduler.wait_idle(self._key(vm.id, job_id), wait)
        return {"jobUUID": job_id, "state": self.job_state(vm, job_id)}

    def dismiss(self, vm: Vm, job_id: str) -> None:
        """Jobs leave vmJobs by themselves once cleaned up; this stays for
        clients that acknowledge a failure, and for FAILED records of older
        agents. A job already gone is a no-op."""
        check_uuid(job_id, "jobUUID")
        with vm.lock:
            rec = vm.definition.jobs.get(job_id)
            if rec is None:
                self.report.drop(vm.id, job_id)
                return
            job = self._job(vm, job_id)
            if job.state is not State.FAILED:
                raise errors.MergeFailed(f"job {job_id} is {job.state.value}, not FAILED")
            self._forget(vm, job)

    def job_state(self, vm: Vm, job_id: str) -> str:
        rec = vm.definition.jobs.get(job_id) or self.history.find(job_id)
        return rec["state"].lower() if rec else "unknown"

    def job_stats(self, vm: Vm) -> dict:
        return self.report.entries(vm.id, lambda: self._store.records(vm),
                                   lambda rec: job_entry(rec, self._live.get(rec.get("id"))))

    def forget_vm(self, vm_id: str) -> None:
        """The VM left this host: drop what is kept for its reports."""
        self.report.forget(vm_id)
        for key in [k for k in self._last_event if k[0] == vm_id]:
            self._last_event.pop(key, None)

    def busy_drives(self, vm: Vm) -> set[str]:
        return {rec.get("drive") for rec in self._store.records(vm)
                if rec.get("state") != State.FAILED.value}

    def paused_by_job(self, vm: Vm) -> str | None:
        """The id of a job that holds the VM paused for its pivot, if any."""
        for rec in self._store.records(vm):
            if rec.get("paused_for_pivot"):
                return rec.get("id")
        return None

    def resume(self, vm: Vm, dom: DomainAdapter) -> None:
        """After recovery: read each live job from libvirt and carry it on."""
        for job in self._jobs(vm):
            if not self.repairs.has(job.id):
                self.repairs.intend(job.repair(vm.id))   # a record from an older agent
            if job.state in LIVE_STATES or job.state is State.FAILED:
                info = dom.blockJobInfo(job.drive, 0)
                if info:
                    self._live[job.id] = {"cur": info.get("cur", 0), "end": info.get("end", 0)}
                self._submit(vm.id, job.id)

    @staticmethod
    def tracked_drives(vm: Vm) -> list[str]:
        names = {d.name for d in vm.definition.drives}
        return sorted({rec.get("drive") for rec in vm.definition.jobs.values()
                       if isinstance(rec, dict) and rec.get("drive") in names
                       and rec.get("state") in {s.value for s in LIVE_STATES}})

    def on_block_job_event(self, vm_uuid: str, disk: str, job_type: int, status: int) -> None:
        """libvirt BLOCK_JOB_2: only a hint to poll now (runs on the event thread)."""
        vm = self._vm_lookup(vm_uuid)
        if vm is not None and disk in self.busy_drives(vm):
            self._last_event[(vm_uuid, disk)] = _EVENT_NAMES.get(status, str(status))
        self._scheduler.notify(("vm", vm_uuid))

    # --- validation -----------------------------------------------------

    def _validate_live(self, vm: Vm, spec: dict, base: str, top: str, job_id: str):
        """The checks that need libvirt only; returns (drive, live chain)."""
        if vm.status == DOWN:
            raise errors.MergeFailed(f"VM {vm.id} is not running")
        drive = vm.definition.find_drive(spec["domainID"], spec["imageID"])
        if drive is None or drive.volume != spec["volumeID"]:
            raise errors.ImageFileNotFound(
                f"VM {vm.id} has no drive with image {spec['imageID']} and leaf {spec['volumeID']}")
        if job_id in vm.definition.jobs or self.history.find(job_id):
            raise errors.MergeFailed(f"jobUUID {job_id} is already used")
        for rec in self._store.records(vm):
            if rec.get("drive") == drive.name and rec.get("state") != State.FAILED.value:
                raise errors.MergeFailed(f"drive {drive.name} already has job {rec.get('id')} "
                                         f"({rec.get('state')})")
        live = self._live_disk(self._domain_of(vm), drive.name)
        chain = [n.volume for n in live.chain]
        for name, vol in (("baseVolUUID", base), ("topVolUUID", top)):
            if vol not in chain:
                raise errors.ImageFileNotFound(f"{name} {vol} is not in the live chain of "
                                               f"drive {drive.name}")
        if chain.index(base) >= chain.index(top):
            raise errors.MergeFailed(f"base {base} is not an ancestor of top {top}")
        if live.mirror is not None:
            raise errors.MergeFailed(f"drive {drive.name} has a block job not started by vmhost")
        # QEMU grows a smaller base during the commit on file storage; the
        # capacity in metadata is updated in cleanup. A domain type that cannot
        # grow a volume in place would raise DestinationVolumeTooSmall here.
        return drive, chain

    # --- the work item --------------------------------------------------

    def _submit(self, vm_id: str, job_id: str) -> None:
        self._scheduler.submit(self._key(vm_id, job_id), f"merge job {job_id} of VM {vm_id}",
                               lambda: self.advance(vm_id, job_id), topics=(("vm", vm_id),))

    @staticmethod
    def _key(vm_id: str, job_id: str) -> str:
        return f"merge/{vm_id}/{job_id}"

    def advance(self, vm_id: str, job_id: str) -> Outcome:
        """One run of the job's work item: drive the state machine as far as it goes now."""
        return run_steps(lambda: self._decide(vm_id, job_id),
                         lambda work, result: self._reenter(vm_id, job_id, work, result),
                         lambda: self._state_of(vm_id, job_id), f"merge job {job_id}",
                         self.config.poll_interval, 2 * len(State) + 2)

    def _decide(self, vm_id: str, job_id: str) -> tuple[State | None, Outcome | _Outside | None]:
        """One step under the VM lock: (the state it started from, its result)."""
        vm = self._vm_lookup(vm_id)
        if vm is None:
            return None, self._vm_gone(None, vm_id, job_id)
        with vm.lock:
            if job_id not in vm.definition.jobs:
                self._live.pop(job_id, None)
                return None, DONE
            if vm.status == DOWN:
                return None, self._vm_gone(vm, vm_id, job_id)
            job = self._job(vm, job_id)
            step = getattr(self, f"_step_{job.state.value.lower()}", None)
            if step is None:   # FAILED (an older agent's record): end it
                self._finish(vm, job, State.FAILED, job.error or "failed")
                return job.state, DONE
            try:
                return job.state, step(vm, self._domain_of(vm), job)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                vm.status = DOWN   # QEMU went away under us: same as a stop event
                return job.state, self._vm_gone(vm, vm_id, job_id)

    def _state_of(self, vm_id: str, job_id: str) -> State | None:
        vm = self._vm_lookup(vm_id)
        rec = vm.definition.jobs.get(job_id) if vm is not None else None
        return State(rec["state"]) if rec else None

    def _reenter(self, vm_id: str, job_id: str, work: _Outside,
                 result: Any) -> Outcome | _Outside | None:
        """After a step's storage I/O: re-check under the VM lock, then go on."""
        vm = self._vm_lookup(vm_id)
        if vm is None:
            return self._vm_gone(None, vm_id, job_id)
        with vm.lock:
            if vm.status == DOWN:
                return self._vm_gone(vm, vm_id, job_id)
            if job_id not in vm.definition.jobs:
                return DONE
            job = self._job(vm, job_id)
            if job.state is not work.expect:
                return None    # changed meanwhile (an abort): decide again
            return work.then(vm, self._domain_of(vm), job, result)

    # Each step returns None to go on with the (new) state at once, an
    # _Outside for storage work, or an outcome.

    def _step_starting(self, vm: Vm, dom: DomainAdapter, job: MergeJob) -> Outcome | None:
        info = dom.blockJobInfo(job.drive, 0)
        if info:
            self._transition(vm, job, State.COMMIT, "found the libvirt job running")
            return None
        if job.top not in self._live_chain(dom, job):
            self._transition(vm, job, State.CLEANUP, "top already left the chain")
            return None
        try:
            self._block_commit(dom, job)
        except libvirt.libvirtError as e:
            job.error = f"blockCommit failed: {e}"
            self._transition(vm, job, State.CLEANUP, job.error)
            return None
        self._transition(vm, job, State.COMMIT, "blockCommit started")
        return None

    def _step_commit(self, vm: Vm, dom: DomainAdapter, job: MergeJob) -> Outcome | None:
        info = dom.blockJobInfo(job.drive, 0)
        if not info:
            self._transition(vm, job, State.CLEANUP, "libvirt job ended")
            return None
        self._live[job.id] = {"cur": info.get("cur", 0), "end": info.get("end", 0)}
        if job.active:
            mirror = self._live_disk(dom, job.drive).mirror
            if mirror is not None and mirror.ready:
                self._transition(vm, job, State.READY, "active commit ready for pivot")
                return None
        return Wait(self.config.poll_interval)

    def _step_ready(self, vm: Vm, dom: DomainAdapter, job: MergeJob) -> Outcome | None:
        # Right after the pivot the old top must be marked ILLEGAL before the
        # VM runs again: do not pause a VM for a pivot whose marker cannot be
        # written now.
        blocked = self._require_domain(job)
        if blocked:
            return blocked
        # The slot before the pause: the guest waits for it running.
        if not self.pivot_slots.take(job.id, lambda: self._scheduler.notify(("vm", vm.id))):
            return Wait(self.config.poll_interval)
        job.paused_for_pivot = _is_running(dom)
        self._transition(vm, job, State.PIVOT, "pausing the VM for the pivot"
                         if job.paused_for_pivot else "pivot (the VM is already paused)")
        return None

    def _step_pivot(self, vm: Vm, dom: DomainAdapter, job: MergeJob) -> Outcome | None:
        info = dom.blockJobInfo(job.drive, 0)
        if not info:
            self._transition(vm, job, State.CLEANUP, "libvirt job ended")
            return None
        if job.paused_for_pivot and _is_running(dom):
            dom.suspend()
            failpoints.hit("merge.pivot.paused")
        # Paused, QEMU holds no lease: the agent takes the image's, so that no
        # other host changes the image or starts the VM until the marker is
        # written. Another host took it meanwhile: no pivot.
        return _Outside(lambda: self._hold_image(job), self._pivot_leased, State.PIVOT,
                        f"lease of image {job.image}")

    def _hold_image(self, job: MergeJob) -> str:
        """'' once the agent holds the image's lease, else why not."""
        try:
            self._storage.hold_image(job.domain, job.image)
            return ""
        except errors.VmhostError as e:
            return f"cannot hold the lease of image {job.image}: {e}"

    def _pivot_leased(self, vm: Vm, dom: DomainAdapter, job: MergeJob,
                      refused: str) -> Outcome | None:
        if refused:
            return self._pivot_failed(vm, dom, job, refused)
        mirror = self._live_disk(dom, job.drive).mirror
        if mirror is None or not mirror.ready:
            # READY can blip; with the guest paused the mirror converges at once.
            return Wait(self.config.poll_interval)
        if job.bandwidth:
            try:   # the guest waits: drain what is left at full speed
                dom.blockJobSetSpeed(job.drive, 0, 0)
            except libvirt.libvirtError as e:
                log.info("merge job %s: cannot lift the bandwidth limit: %s", job.id, e)
        failpoints.hit("merge.pivot.before")
        try:
            failpoints.error("merge.pivot")
            dom.blockJobAbort(job.drive, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        except (libvirt.libvirtError, failpoints.InjectedError) as e:
            return self._pivot_failed(vm, dom, job, str(e))
        failpoints.hit("merge.pivot.after")
        if not self._wait_for_pivot(dom, job):
            return Wait(self.config.poll_interval)  # checked again: job absent -> chain decides
        job.pivot_attempts, job.pivot_failing_since = 0, 0.0
        self._transition(vm, job, State.CLEANUP, "pivot done")
        return None

    def _pivot_failed(self, vm: Vm, dom: DomainAdapter, job: MergeJob, err: str) -> Outcome:
        job.pivot_attempts += 1
        now = time.time()
        job.pivot_failing_since = job.pivot_failing_since or now
        log.warning("merge job %s: pivot attempt %d failed: %s", job.id, job.pivot_attempts, err)
        # The marker was never written (it follows the pivot): nothing to undo
        # in storage. The VM runs again before the record says READY; a crash
        # in between finds PIVOT and pauses it again.
        self._unpause(dom, job)
        failpoints.hit("merge.pivot_failed.resumed")
        if now - job.pivot_failing_since >= self.config.pivot_budget:
            job.error = (f"pivot failed {job.pivot_attempts} times in "
                         f"{now - job.pivot_failing_since:.0f}s: {err}")
            self._transition(vm, job, State.ABORTING, job.error)
            return Retry(job.error)
        self._transition(vm, job, State.READY, f"pivot failed: {err}")
        return Retry(f"pivot failed: {err}")

    def _unpause(self, dom: DomainAdapter, job: MergeJob) -> None:
        """Resume the VM if this job paused it (the record is persisted by the caller).
        The agent's hold of the image lease ends first: on resume libvirt takes it
        again for QEMU (and fails while anyone else holds it)."""
        self._storage.release_image(job.domain, job.image)
        if job.paused_for_pivot:
            if not _is_running(dom):
                dom.resume()
            job.paused_for_pivot = False
        self.pivot_slots.release(job.id)

    def _wait_for_pivot(self, dom: DomainAdapter, job: MergeJob) -> bool:
        """libvirt may return from the pivot before the XML shows it (BZ 1202719)."""
        deadline = time.monotonic() + self.config.pivot_timeout
        while time.monotonic() < deadline:
            if job.top not in self._live_chain(dom, job):
                return True
            time.sleep(0.02)
        return False

    def _step_aborting(self, vm: Vm, dom: DomainAdapter, job: MergeJob) -> Outcome | None:
        if job.paused_for_pivot and job.top in self._live_chain(dom, job):
            self._unpause(dom, job)   # no pivot happened: the VM may run on the top
            self._save(vm, job, job.state, "VM resumed")
        if dom.blockJobInfo(job.drive, 0):
            try:
                dom.blockJobAbort(job.drive, 0)
            except libvirt.libvirtError as e:
                if dom.blockJobInfo(job.drive, 0):
                    return Retry(f"blockJobAbort failed: {e}")
            if dom.blockJobInfo(job.drive, 0):
                return Wait(self.config.poll_interval)
        self._transition(vm, job, State.CLEANUP, "libvirt job cancelled")
        return None

    def _step_cleanup(self, vm: Vm, dom: DomainAdapter, job: MergeJob) -> Outcome | _Outside:
        live = self._live_disk(dom, job.drive)
        chain = [n.volume for n in live.chain]
        # The VM's view first: it needs libvirt only.
        if vm.apply_live_chain({job.drive: live}, [job.drive]):
            self._persist(vm)
        failpoints.hit("merge.cleanup.vm_synced")
        if job.paused_for_pivot and job.top in chain:
            # Paused for a pivot that did not happen: no marker to write.
            self._unpause(dom, job)
            self._save(vm, job, job.state, "VM resumed, no pivot happened")
        blocked = self._require_domain(job)
        if blocked:
            return blocked
        # A paused VM's QEMU holds no lease: the agent holds the image's for the
        # write (the marker, after a pivot); until it gets it the VM stays paused.
        leased = not _is_running(dom)

        def sync() -> None:
            if leased:
                self._storage.hold_image(job.domain, job.image)
            failpoints.hit("merge.cleanup.storage_sync.before")
            self._storage.sync_volume_chain(job.domain, job.image, job.leaf, chain)
            failpoints.hit("merge.cleanup.storage_sync.after")
        return _Outside(sync, lambda v, d, j, _: self._cleanup_synced(v, d, j, chain),
                        State.CLEANUP, f"storage chain sync of image {job.image}")

    def _cleanup_synced(self, vm: Vm, dom: DomainAdapter, job: MergeJob,
                        chain: list[str]) -> Outcome | _Outside:
        self._storage.release_image(job.domain, job.image)   # the chain is synced
        if job.paused_for_pivot:
            # The old top is marked ILLEGAL now: the guest may write to the base.
            self._unpause(dom, job)
            failpoints.hit("merge.cleanup.resumed")
            self._save(vm, job, job.state, "pivot marker written; VM resumed")
        if job.top in chain:
            return self._cleanup_done(vm, job, merged=False)
        gone = [v for v in job.merged_volumes if v not in chain]

        def finish() -> None:
            failpoints.hit("merge.cleanup.finish_merge.before")
            self._storage.finish_merge(job.domain, job.image, job.base, gone,
                                       job.top_capacity, base_is_leaf=job.active)
            failpoints.hit("merge.cleanup.finish_merge.after")
        return _Outside(finish, lambda v, d, j, _: self._cleanup_done(v, j, merged=True),
                        State.CLEANUP, f"merge finish of image {job.image}")

    def _cleanup_done(self, vm: Vm, job: MergeJob, merged: bool) -> Outcome:
        if merged:
            self._finish(vm, job, State.DONE, "merged")
        elif job.abort_requested and not job.error:
            self._finish(vm, job, State.ABORTED, "aborted, chain unchanged")
        else:
            job.error = job.error or self._ended_reason(vm, job)
            self._finish(vm, job, State.FAILED, job.error)
        return DONE

    def _ended_reason(self, vm: Vm, job: MergeJob) -> str:
        status = self._last_event.pop((vm.id, job.drive), None)
        if status == "FAILED":
            return "libvirt reported the block job FAILED; chain unchanged"
        if status == "CANCELED":
            return "the block job was cancelled outside vmhost; chain unchanged"
        return "the block job ended without merging (cancelled or failed); chain unchanged"

    # --- the VM went away -------------------------------------------------

    def vm_gone(self, vm: Vm) -> None:
        """The VM is down or destroyed (caller holds its lock): end its jobs."""
        for job_id in [j for j in vm.definition.jobs if j not in vm.bad_jobs]:
            self._vm_gone(vm, vm.id, job_id)
        self.forget_vm(vm.id)

    def _vm_gone(self, vm: Vm | None, vm_id: str, job_id: str) -> Outcome:
        """QEMU is gone and the job with it. Its storage work becomes an image
        repair (persisted in the state dir) and the job ends FAILED."""
        reason = "the VM went down during the merge; storage repair queued"
        self._live.pop(job_id, None)
        if vm is None:
            # Destroyed and forgotten: the intent written at the start knows the job.
            if not self.repairs.start(job_id, reason):
                log.warning("merge job %s of VM %s: VM gone, no repair intent", job_id, vm_id)
            return DONE
        try:
            job = self._store.get(vm, job_id)
        except UNREADABLE as e:
            log.error("merge job %s of VM %s: unreadable record, dropped: %s", job_id, vm_id, e)
            self._store.take(vm, job_id)
            return DONE
        if job is None:
            return DONE
        self._storage.release_image(job.domain, job.image)   # if the pivot held it
        if not self.repairs.has(job.id):
            self.repairs.intend(job.repair(vm.id))
        self.repairs.start(job.id, reason)
        failpoints.hit("merge.down.repair_queued")
        job.error = job.error or reason
        log.warning("merge job %s: VM %s went down during the merge", job_id, vm_id)
        self._finish(vm, job, State.FAILED, job.error, persist=False, keep_intent=True)
        return DONE

    # --- helpers --------------------------------------------------------

    def _require_domain(self, job: MergeJob) -> Blocked | None:
        if self._storage.domain_valid(job.domain):
            return None
        return Blocked(Requirement(f"storage domain {job.domain} is VALID",
                                   ("domain", job.domain),
                                   lambda: self._storage.domain_valid(job.domain)))

    def _block_commit(self, dom: DomainAdapter, job: MergeJob) -> None:
        nodes = {n.volume: n for n in self._live_disk(dom, job.drive).chain}
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
        if job.active:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
        base, top = (f"{job.drive}[{nodes[v].index}]" for v in (job.base, job.top))
        failpoints.hit("merge.blockcommit.before")
        dom.blockCommit(job.drive, base, top, job.bandwidth, flags)
        failpoints.hit("merge.blockcommit.after")

    @staticmethod
    def _live_disk(dom: DomainAdapter, drive: str) -> domxml.LiveDisk:
        disk = domxml.live_disks(dom.XMLDesc(0)).get(drive)
        if disk is None:
            raise errors.GeneralError(f"drive {drive} is not in the live XML")
        return disk

    def _live_chain(self, dom: DomainAdapter, job: MergeJob) -> list[str]:
        return [n.volume for n in self._live_disk(dom, job.drive).chain]

    def _jobs(self, vm: Vm) -> list[MergeJob]:
        """The readable job records (unreadable ones are reported at recovery)."""
        return self._store.readable(vm)

    def _job(self, vm: Vm, job_id: str) -> MergeJob:
        job = self._store.get(vm, job_id)
        if job is None:
            raise errors.MergeFailed(f"VM {vm.id} has no job {job_id}")
        return job

    def _save(self, vm: Vm, job: MergeJob, old: State | None, reason: str) -> None:
        """Persist the record (write-ahead; failpoints merge.save.<STATE>.*)
        and report a state change."""
        self._store.save(vm, job)
        if old is not job.state:
            self._emit(vm, job, old, job.state, reason)

    def _transition(self, vm: Vm, job: MergeJob, new: State, reason: str) -> None:
        old, job.state = job.state, new
        self._save(vm, job, old, reason)

    def _finish(self, vm: Vm, job: MergeJob, final: State, reason: str, persist: bool = True,
                keep_intent: bool = False) -> None:
        """The job leaves vmJobs, whatever its outcome; the history and its
        last notification keep the outcome."""
        old, job.state = job.state, final
        # The outcome is in the history before the job leaves vmJobs, so an
        # engine polling both never finds it in neither.
        self._record_history(vm, job)
        entry = job_entry(job.to_record(), {"cur": 0, "end": 0})
        _, undo = self.report.finish(vm.id, job.id, entry,
                                     leave=lambda: self._store.take(vm, job.id))
        failpoints.hit("merge.finish.before")
        if persist:
            try:
                self._persist(vm)
            except BaseException:
                undo(lambda rec: self._store.put_back(vm, job.id, rec))
                raise
        failpoints.hit("merge.finish.after")
        if not keep_intent:
            self.repairs.cancel(job.id)
        self._last_event.pop((vm.id, job.drive), None)
        self._emit(vm, job, old, final, reason)
        self._live.pop(job.id, None)
        self.pivot_slots.release(job.id)

    def _forget(self, vm: Vm, job: MergeJob) -> None:
        self._record_history(vm, job)
        self._store.remove(vm, job.id)
        self.repairs.cancel(job.id)
        self._live.pop(job.id, None)

    def _record_history(self, vm: Vm, job: MergeJob) -> None:
        record_history(self.history, {**job.to_record(), "vmId": vm.id, "finished": time.time(),
                                      "bytes": self._live.get(job.id, {}).get("end", 0)})

    def _emit(self, vm: Vm, job: MergeJob, old: State | None, new: State, reason: str) -> None:
        fields = {"vmID": vm.id, "drive": job.drive, "jobID": job.id,
                  "from": old.value if old else None, "to": new.value, "reason": reason}
        log.info("merge job %s VM %s drive %s: %s -> %s (%s)", job.id, vm.id, job.drive,
                 old.value if old else "-", new.value, reason, extra=fields)
        self._publish({"event": "job", "vmId": vm.id, "jobId": job.id, "drive": job.drive,
                       "from": fields["from"], "to": new.value, "reason": reason,
                       "error": job.error or None, "kind": "active" if job.active else "internal",
                       "started": job.started, "bytes": self._live.get(job.id, {}).get("end", 0),
                       "pivotAttempts": job.pivot_attempts})


def _is_running(dom: DomainAdapter) -> bool:
    state = dom.state(0)[0]
    return state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED)


_EVENT_NAMES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "COMPLETED",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "FAILED",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "CANCELED",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "READY",
}
