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
| STARTING | validated; before blockCommit           | libvirt job present -> COMMIT; top gone from the live      |
|          |                                         | chain -> CLEANUP; else call blockCommit (again) -> COMMIT  |
| COMMIT   | blockCommit was called                  | job present: report cur/end; active and <mirror            |
|          |                                         | ready='yes'> -> READY. job absent -> CLEANUP               |
| READY    | active job ready; before marking the    | needs the domain VALID: mark base+1..leaf ILLEGAL (storage |
|          | leaf ILLEGAL                            | sync to the chain after the pivot); if that fails, no      |
|          |                                         | pivot, retry later. Then -> PIVOT                          |
| PIVOT    | leaf is ILLEGAL; before blockJobAbort   | job present and ready: pivot, wait until the live chain    |
|          | (PIVOT)                                 | shows base as leaf -> CLEANUP. Pivot error: leaf LEGAL     |
|          |                                         | again, attempts+1 -> READY (retry with backoff), or past   |
|          |                                         | the bound -> ABORTING. Job absent -> CLEANUP               |
| ABORTING | abort requested (API or pivot bound);   | job present: blockJobAbort (no pivot). Job absent ->       |
|          | before blockJobAbort                    | CLEANUP                                                    |
| CLEANUP  | libvirt has no job for us any more      | VM definition re-read from the live chain; storage (needs  |
|          |                                         | the domain VALID): chain sync (four cases), and if top has |
|          |                                         | left the chain, base capacity, base LEAF after an active   |
|          |                                         | merge, merged-away volumes ILLEGAL. Outcome from the       |
|          |                                         | chain: merged -> DONE, else ABORTED or FAILED              |
| FAILED   | terminal; kept in vmJobs with `error`   | none: stays until dismissed or a new merge on the drive    |

DONE and ABORTED jobs leave vmJobs (after cleanup, never before) and go to
the job history. A job leaves vmJobs only when the VM definition and the
storage metadata both agree with the live chain.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
import uuid
from typing import Callable, Protocol

import libvirt

from vmhost import errors, failpoints
from vmhost.ids import check_uuid
from vmhost.scheduler import DONE, Blocked, Outcome, Requirement, Retry, Scheduler, Wait
from vmhost.virt import domxml
from vmhost.virt.jobhistory import JobHistory
from vmhost.virt.vm import DOWN, Vm

log = logging.getLogger(__name__)

RECORD_VERSION = 2


class State(str, enum.Enum):
    STARTING = "STARTING"
    COMMIT = "COMMIT"
    READY = "READY"
    PIVOT = "PIVOT"
    ABORTING = "ABORTING"
    CLEANUP = "CLEANUP"
    FAILED = "FAILED"
    # Terminal states that are never persisted: the record is removed.
    DONE = "DONE"
    ABORTED = "ABORTED"


LIVE_STATES = {State.STARTING, State.COMMIT, State.READY, State.PIVOT, State.ABORTING,
               State.CLEANUP}


@dataclasses.dataclass
class MergeJob:
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

    def to_record(self) -> dict:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        d["version"] = RECORD_VERSION
        return d

    @classmethod
    def from_record(cls, d: dict) -> "MergeJob":
        version = d.get("version", 1)
        if version == 1:
            d = upgrade_v1(d)
        elif version != RECORD_VERSION:
            raise ValueError(f"unknown merge job record version {version!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        job = cls(**{k: v for k, v in d.items() if k in fields})
        job.state = State(job.state)
        return job


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


class DomainAdapter(Protocol):
    """The libvirt surface a merge uses (a seam for unit tests)."""
    def blockCommit(self, disk, base, top, bandwidth=0, flags=0): ...
    def blockJobInfo(self, disk, flags=0): ...
    def blockJobAbort(self, disk, flags=0): ...
    def XMLDesc(self, flags=0): ...


class MergeStorage(Protocol):
    def volume_info(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> dict: ...
    def sync_volume_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                          actual: list[str]) -> str: ...
    def finish_merge(self, sd_uuid: str, img_uuid: str, base: str, merged: list[str],
                     capacity: int, base_is_leaf: bool) -> None: ...
    def domain_valid(self, sd_uuid: str) -> bool: ...


@dataclasses.dataclass
class MergeConfig:
    poll_interval: float = 1.0      # seconds between polls of a running job
    pivot_retries: int = 5          # failed pivots before the job is aborted
    pivot_timeout: float = 10.0     # seconds to wait for the live XML after a pivot


class StorageUnavailable(Exception):
    pass


class Merger:
    """Starts, drives, aborts and reports the merge jobs of every VM."""

    def __init__(self, storage: MergeStorage, scheduler: Scheduler,
                 vm_lookup: Callable[[str], Vm | None],
                 domain_of: Callable[[Vm], DomainAdapter],
                 persist: Callable[[Vm], None],
                 config: MergeConfig | None = None,
                 publish: Callable[[dict], None] = lambda event: None,
                 history: JobHistory | None = None):
        self._storage = storage
        self._scheduler = scheduler
        self._vm_lookup = vm_lookup
        self._domain_of = domain_of
        self._persist = persist
        self.config = config or MergeConfig()
        self._publish = publish
        self._live: dict[str, dict] = {}            # job id -> last blockJobInfo
        self._last_event: dict[tuple[str, str], str] = {}   # (vm, drive) -> status name
        self._lock = threading.Lock()
        # Jobs that finished before any stats call showed them: each is shown
        # once, in its final state, so a job is always seen in the next stats.
        self._unreported: set[str] = set()
        self._finished_unseen: dict[str, dict[str, dict]] = {}
        self.history = history or JobHistory(None)

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
            job = self._validate(vm, drive_spec, base, top, bandwidth, job_id)
            dom = self._domain_of(vm)
            # A new merge acknowledges a FAILED job left on the drive.
            for old in self._jobs(vm):
                if old.drive == job.drive and old.state is State.FAILED:
                    self._forget(vm, old)
            with self._lock:
                self._unreported.add(job.id)   # until a stats call has shown it
            self._save(vm, job, None, "merge requested")  # write-ahead: STARTING
            try:
                self._block_commit(dom, job)
            except libvirt.libvirtError as e:
                del vm.definition.jobs[job.id]
                self._persist(vm)
                self._emit(vm, job, State.STARTING, State.FAILED, f"blockCommit failed: {e}")
                raise errors.MergeFailed(f"libvirt refused the commit: {e}") from None
            self._transition(vm, job, State.COMMIT, "blockCommit started")
        self._submit(vm.id, job.id)
        return job.id

    def abort(self, vm: Vm, job_id: str, wait: float = 30.0) -> dict:
        check_uuid(job_id, "jobUUID")
        with vm.lock:
            job = self._job(vm, job_id)
            if job.state is State.FAILED:
                raise errors.MergeFailed(f"job {job_id} already failed: {job.error}")
            if job.state is State.CLEANUP:
                raise errors.MergeFailed(f"job {job_id} has already finished in libvirt; "
                                         "it is being cleaned up")
            if job.state is not State.ABORTING:
                job.abort_requested = True
                self._transition(vm, job, State.ABORTING, "abort requested")
        self._submit(vm.id, job_id)
        self._scheduler.wait_idle(self._key(vm.id, job_id), wait)
        return {"jobUUID": job_id, "state": self.job_state(vm, job_id)}

    def dismiss(self, vm: Vm, job_id: str) -> None:
        """Acknowledge a FAILED job: it leaves vmJobs (it stays in the history)."""
        check_uuid(job_id, "jobUUID")
        with vm.lock:
            job = self._job(vm, job_id)
            if job.state is not State.FAILED:
                raise errors.MergeFailed(f"job {job_id} is {job.state.value}, not FAILED")
            self._forget(vm, job)

    def job_state(self, vm: Vm, job_id: str) -> str:
        rec = vm.definition.jobs.get(job_id) or self.history.find(job_id)
        return rec["state"].lower() if rec else "unknown"

    def job_stats(self, vm: Vm) -> dict:
        with self._lock:
            out = self._finished_unseen.pop(vm.id, {})
            records = list(vm.definition.jobs.values())
            self._unreported.difference_update(rec["id"] for rec in records)
        for rec in records:
            live = self._live.get(rec["id"], {})
            info = {"id": rec["id"], "jobType": "block", "blockJobType": "commit",
                    "drive": rec["drive"], "imgUUID": rec["image"],
                    "bandwidth": rec["bandwidth"], "cur": str(live.get("cur", 0)),
                    "end": str(live.get("end", 0)), "state": rec["state"].lower(),
                    "baseVolUUID": rec["base"], "topVolUUID": rec["top"]}
            if rec.get("error"):
                info["error"] = rec["error"]
            out[rec["id"]] = info
        return out

    def busy_drives(self, vm: Vm) -> set[str]:
        return {rec["drive"] for rec in vm.definition.jobs.values()
                if rec["state"] != State.FAILED.value}

    def resume(self, vm: Vm, dom: DomainAdapter) -> None:
        """After recovery: read each live job from libvirt and carry it on."""
        for job in self._jobs(vm):
            if job.state in LIVE_STATES:
                info = dom.blockJobInfo(job.drive, 0)
                if info:
                    self._live[job.id] = {"cur": info.get("cur", 0), "end": info.get("end", 0)}
                self._submit(vm.id, job.id)

    @staticmethod
    def tracked_drives(vm: Vm) -> list[str]:
        return sorted({rec["drive"] for rec in vm.definition.jobs.values()
                       if rec["state"] in {s.value for s in LIVE_STATES}})

    def on_block_job_event(self, vm_uuid: str, disk: str, job_type: int, status: int) -> None:
        """libvirt BLOCK_JOB_2: only a hint to poll now (runs on the event thread)."""
        self._last_event[(vm_uuid, disk)] = _EVENT_NAMES.get(status, str(status))
        self._scheduler.notify(("vm", vm_uuid))

    # --- validation -----------------------------------------------------

    def _validate(self, vm: Vm, spec: dict, base: str, top: str, bandwidth: int,
                  job_id: str) -> MergeJob:
        if vm.status == DOWN:
            raise errors.MergeFailed(f"VM {vm.id} is not running")
        drive = vm.definition.find_drive(spec["domainID"], spec["imageID"])
        if drive is None or drive.volume != spec["volumeID"]:
            raise errors.ImageFileNotFound(
                f"VM {vm.id} has no drive with image {spec['imageID']} and leaf {spec['volumeID']}")
        if job_id in vm.definition.jobs or self.history.find(job_id):
            raise errors.MergeFailed(f"jobUUID {job_id} is already used")
        for rec in vm.definition.jobs.values():
            if rec["drive"] == drive.name and rec["state"] != State.FAILED.value:
                raise errors.MergeFailed(f"drive {drive.name} already has job {rec['id']} "
                                         f"({rec['state']})")
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
        base_info = self._storage.volume_info(drive.domain, drive.image, base)
        top_info = self._storage.volume_info(drive.domain, drive.image, top)
        if base_info["voltype"] == "SHARED":
            raise errors.MergeFailed(f"base {base} is a shared (template) volume")
        # QEMU grows a smaller base during the commit on file storage; the
        # capacity in metadata is updated in cleanup. A domain type that cannot
        # grow a volume in place would raise DestinationVolumeTooSmall here.
        return MergeJob(id=job_id, drive=drive.name, domain=drive.domain, image=drive.image,
                        leaf=drive.volume, base=base, top=top, chain=chain,
                        bandwidth=bandwidth, top_capacity=int(top_info["capacity"]))

    # --- the work item --------------------------------------------------

    def _submit(self, vm_id: str, job_id: str) -> None:
        self._scheduler.submit(self._key(vm_id, job_id), f"merge job {job_id} of VM {vm_id}",
                               lambda: self.advance(vm_id, job_id), topics=(("vm", vm_id),))

    @staticmethod
    def _key(vm_id: str, job_id: str) -> str:
        return f"merge/{vm_id}/{job_id}"

    def advance(self, vm_id: str, job_id: str) -> Outcome:
        """One run of the job's work item: drive the state machine as far as it goes now."""
        vm = self._vm_lookup(vm_id)
        if vm is None or job_id not in vm.definition.jobs:
            self._live.pop(job_id, None)
            return DONE
        if vm.status == DOWN:
            # QEMU is gone and the job with it; the record cannot be persisted
            # any more (the domain is gone). The engine reconciles the image.
            self._live.pop(job_id, None)
            rec = vm.definition.jobs[job_id]
            rec.update(state=State.FAILED.value, error="the VM went down during the merge")
            log.warning("merge job %s: VM %s went down during the merge", job_id, vm_id)
            return DONE
        with vm.lock:
            job = self._job(vm, job_id)
            dom = self._domain_of(vm)
            for _ in range(len(State) + 2):   # steps chain within one run
                step = getattr(self, f"_step_{job.state.value.lower()}", None)
                if step is None:   # FAILED: nothing to drive
                    return DONE
                before = job.state
                outcome = step(vm, dom, job)
                if outcome is not None:
                    return outcome
                if job.state is before:
                    return Wait(self.config.poll_interval)
            return Wait(self.config.poll_interval)

    # Each step returns None to go on with the (new) state at once, or an outcome.

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
        blocked = self._require_domain(job)
        if blocked:
            return blocked
        chain = self._live_chain(dom, job)
        # The crash-safety marker: volumes that a pivot may leave behind must
        # never be started again (the chain as it will be after the pivot,
        # storage case 1). No marker, no pivot.
        failpoints.hit("merge.mark_illegal.before")
        try:
            self._storage.sync_volume_chain(job.domain, job.image, job.leaf,
                                            chain[:chain.index(job.base) + 1])
        except Exception as e:
            return Retry(f"cannot mark leaf {job.leaf} ILLEGAL before pivot: {e}")
        failpoints.hit("merge.mark_illegal.after")
        self._transition(vm, job, State.PIVOT, f"volumes above base {job.base} marked ILLEGAL")
        return None

    def _step_pivot(self, vm: Vm, dom: DomainAdapter, job: MergeJob) -> Outcome | None:
        info = dom.blockJobInfo(job.drive, 0)
        if not info:
            self._transition(vm, job, State.CLEANUP, "libvirt job ended")
            return None
        mirror = self._live_disk(dom, job.drive).mirror
        if mirror is None or not mirror.ready:
            # READY can blip; wait for it to come back before pivoting.
            return Wait(self.config.poll_interval)
        failpoints.hit("merge.pivot.before")
        try:
            dom.blockJobAbort(job.drive, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        except libvirt.libvirtError as e:
            return self._pivot_failed(vm, dom, job, str(e))
        failpoints.hit("merge.pivot.after")
        if not self._wait_for_pivot(dom, job):
            return Wait(self.config.poll_interval)  # checked again: job absent -> chain decides
        self._transition(vm, job, State.CLEANUP, "pivot done")
        return None

    def _pivot_failed(self, vm: Vm, dom: DomainAdapter, job: MergeJob, err: str) -> Outcome:
        job.pivot_attempts += 1
        log.warning("merge job %s: pivot attempt %d failed: %s", job.id, job.pivot_attempts, err)
        try:
            self._storage.sync_volume_chain(job.domain, job.image, job.leaf,
                                            self._live_chain(dom, job))
        except Exception as e:
            # The leaf stays ILLEGAL for now; cleanup makes it LEGAL in the end.
            log.warning("merge job %s: cannot mark leaf LEGAL again yet: %s", job.id, e)
        if job.pivot_attempts >= self.config.pivot_retries:
            job.error = f"pivot failed {job.pivot_attempts} times: {err}"
            self._transition(vm, job, State.ABORTING, job.error)
            return Retry(job.error)
        self._transition(vm, job, State.READY, f"pivot failed: {err}")
        return Retry(f"pivot failed: {err}")

    def _wait_for_pivot(self, dom: DomainAdapter, job: MergeJob) -> bool:
        """libvirt may return from the pivot before the XML shows it (BZ 1202719)."""
        deadline = time.monotonic() + self.config.pivot_timeout
        while time.monotonic() < deadline:
            if job.top not in self._live_chain(dom, job):
                return True
            time.sleep(0.02)
        return False

    def _step_aborting(self, vm: Vm, dom: DomainAdapter, job: MergeJob) -> Outcome | None:
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

    def _step_cleanup(self, vm: Vm, dom: DomainAdapter, job: MergeJob) -> Outcome | None:
        live = self._live_disk(dom, job.drive)
        chain = [n.volume for n in live.chain]
        # The VM's view first: it needs libvirt only.
        if vm.apply_live_chain({job.drive: live}, [job.drive]):
            self._persist(vm)
        failpoints.hit("merge.cleanup.vm_synced")
        blocked = self._require_domain(job)
        if blocked:
            return blocked
        merged = job.top not in chain
        try:
            failpoints.hit("merge.cleanup.storage_sync.before")
            self._storage.sync_volume_chain(job.domain, job.image, job.leaf, chain)
            failpoints.hit("merge.cleanup.storage_sync.after")
            if merged:
                failpoints.hit("merge.cleanup.finish_merge.before")
                self._storage.finish_merge(job.domain, job.image, job.base,
                                           [v for v in job.merged_volumes if v not in chain],
                                           job.top_capacity, base_is_leaf=job.active)
                failpoints.hit("merge.cleanup.finish_merge.after")
        except Exception as e:
            return Retry(f"storage cleanup of image {job.image} failed: {e}")
        if merged:
            self._finish(vm, job, State.DONE, "merged")
        elif job.abort_requested and not job.error:
            self._finish(vm, job, State.ABORTED, "aborted, chain unchanged")
        else:
            job.error = job.error or self._ended_reason(vm, job)
            self._transition(vm, job, State.FAILED, job.error)
        return DONE

    def _ended_reason(self, vm: Vm, job: MergeJob) -> str:
        status = self._last_event.pop((vm.id, job.drive), None)
        if status == "FAILED":
            return "libvirt reported the block job FAILED; chain unchanged"
        if status == "CANCELED":
            return "the block job was cancelled outside vmhost; chain unchanged"
        return "the block job ended without merging (cancelled or failed); chain unchanged"

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
        return [MergeJob.from_record(r) for r in vm.definition.jobs.values()]

    def _job(self, vm: Vm, job_id: str) -> MergeJob:
        rec = vm.definition.jobs.get(job_id)
        if rec is None:
            raise errors.MergeFailed(f"VM {vm.id} has no job {job_id}")
        return MergeJob.from_record(rec)

    def _save(self, vm: Vm, job: MergeJob, old: State | None, reason: str) -> None:
        """Persist the record; if libvirt cannot store it, memory keeps the old one."""
        previous = vm.definition.jobs.get(job.id)
        vm.definition.jobs[job.id] = job.to_record()
        failpoints.hit(f"merge.save.{job.state.value}.before")
        try:
            self._persist(vm)
            failpoints.hit(f"merge.save.{job.state.value}.after")
        except BaseException:
            if previous is None:
                vm.definition.jobs.pop(job.id, None)
            else:
                vm.definition.jobs[job.id] = previous
            raise
        self._emit(vm, job, old, job.state, reason)

    def _transition(self, vm: Vm, job: MergeJob, new: State, reason: str) -> None:
        old, job.state = job.state, new
        self._save(vm, job, old, reason)

    def _finish(self, vm: Vm, job: MergeJob, final: State, reason: str) -> None:
        old, job.state = job.state, final
        # The outcome is in the history before the job leaves vmJobs, so an
        # engine polling both never finds it in neither.
        self._record_history(vm, job)
        with self._lock:  # against job_stats: the job is always in one of the two places
            rec = vm.definition.jobs.pop(job.id)
            if job.id in self._unreported:
                self._unreported.discard(job.id)
                self._finished_unseen.setdefault(vm.id, {})[job.id] = {
                    "id": job.id, "jobType": "block", "blockJobType": "commit",
                    "drive": job.drive, "imgUUID": job.image, "bandwidth": job.bandwidth,
                    "cur": "0", "end": "0", "state": final.value.lower(),
                    "baseVolUUID": rec["base"], "topVolUUID": rec["top"]}
        failpoints.hit("merge.finish.before")
        try:
            self._persist(vm)
        except BaseException:
            with self._lock:
                vm.definition.jobs[job.id] = rec
                self._finished_unseen.get(vm.id, {}).pop(job.id, None)
            raise
        failpoints.hit("merge.finish.after")
        self._emit(vm, job, old, final, reason)
        self._live.pop(job.id, None)

    def _forget(self, vm: Vm, job: MergeJob) -> None:
        self._record_history(vm, job)
        vm.definition.jobs.pop(job.id, None)
        self._persist(vm)
        self._live.pop(job.id, None)

    def _record_history(self, vm: Vm, job: MergeJob) -> None:
        entry = job.to_record()
        entry.update(vmId=vm.id, finished=time.time(),
                     bytes=self._live.get(job.id, {}).get("end", 0))
        try:
            self.history.append(entry)
        except OSError as e:  # history is a convenience; never fail a job for it
            log.error("cannot record job %s in the history: %s", job.id, e)

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


_EVENT_NAMES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "COMPLETED",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "FAILED",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "CANCELED",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "READY",
}
