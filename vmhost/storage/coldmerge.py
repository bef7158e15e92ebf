"""Cold merge: VDSM's `SDM.merge` as a host job on an image no VM runs.

`top` is merged into `base`, its parent, with qemu-img; no QEMU runs the
image, so the job record cannot live in a VM's definition: it lives on the
storage domain (`<domain>/jobs/<job>.json`, written atomically), where any
host that sees the domain finds it. Each phase is persisted *before* its
side effect (write-ahead) and every side effect is idempotent, so a job
interrupted anywhere is finished by running its phase again:

| phase    | persisted before            | step (and recovery: the same step)                       |
|----------|-----------------------------|----------------------------------------------------------|
| PREPARE  | validated; nothing changed  | base smaller than top: `qemu-img resize` the base and    |
|          | yet (the record is the      | write its CAP (GEN kept) -> COMMIT                       |
|          | image's job lock from now)  |                                                          |
| COMMIT   | before `qemu-img commit`    | `qemu-img commit -t none -p` of top into base, progress  |
|          |                             | reported; interrupted at any point it is simply redone:  |
|          |                             | top still overlays base, so the chain reads the same     |
|          |                             | -> REBASE (internal merge) or FINALIZE (top is the leaf) |
| REBASE   | the commit completed        | `qemu-img rebase -u` of top's child onto base (again)    |
|          |                             | -> FINALIZE                                              |
| FINALIZE | the child's header names    | metadata, each write idempotent: the child's parent =    |
|          | base (or a leaf merge)      | base (chain sync), top ILLEGAL with MERGED=base          |
|          |                             | (Image.finish_merge), LAST the base with its new CAP,    |
|          |                             | LEAF after a leaf merge, and GEN+1 -> record removed     |

Between COMMIT and REBASE the base holds top's data and top still overlays
it: redoing the commit rewrites the same data. Between the rebase and the
metadata sync the qcow2 header and the metadata disagree only about a
volume (top) whose content equals what the base now has below the child.

GEN (VDSM's fencing): the base's GEN is read when the job is created (and
must equal `base_generation` when the caller gives one); nothing writes the
base's GEN while the job runs, and the job's last write sets GEN+1 together
with the result. So "base GEN is N+1" means "the merge is done" for anyone
reading the storage, even when the host that ran the job is gone; a GEN
other than N or N+1 means someone fenced the job: it stops (FAILED) and
removes its record without touching any volume.

Abort (Host.abortJob): accepted in PREPARE and COMMIT only; qemu-img is
killed and the record removed: ABORTED, the chain as before.

Failure: an error in PREPARE or COMMIT (qemu-img failed: no space, a bad
image) ends the job FAILED and removes its record: the chain is as before
(top over base; the base may have grown). From REBASE on the job only goes
forward: errors are retried with backoff. A domain that is not VALID blocks
the job until it is (vmhost.scheduler).

Ownership: while its record exists the job owns the image: no VM of this
host starts on it, no volume of it is created or deleted (StorageService
.image_job reads the records, so this holds before the start-up scan and
for other hosts' records too), no second job is accepted.

The fleet (a shared, posixfs domain): the job runs holding the image's lease
(taken before the record is written, given back when the job ends), so no VM
runs the image anywhere meanwhile and only one host runs the job. Before
every phase the job makes sure it still holds the lease and re-reads its
record: a record another host advanced is followed, a record gone means
another host finished the job. A record of another host is left alone until
this host gets the image's lease: at once if that host's agent died (sanlock
releases a dead process's leases), after its lease expired if the host died;
the domain's records are scanned again every `takeover_interval` for that.
On a local domain records of another host are never taken over.

Reporting: Host.getJobs shows each job as VDSM's HostJobInfo; finished jobs
stay listed for `keep_seconds` (at most `keep_max` of them), in memory
(vmhost.jobs.report.HostJobs). The record is a vmhost.jobs Record kept by a
DomainJobStore.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from typing import Callable, Protocol

from vmhost import errors, failpoints
from vmhost.ids import check_uuid
from vmhost.jobs.record import Record
from vmhost.jobs.report import ABORTED, DONE as DONE_, FAILED, RUNNING, HostJobs
from vmhost.jobs.runner import run_steps
from vmhost.jobs.store import DomainJobStore
from vmhost.scheduler import DONE, Blocked, Outcome, Requirement, Retry, Scheduler, Wait
from vmhost.storage import executor, qemu_img
from vmhost.storage.domain import StorageDomain
from vmhost.storage.image import Image
from vmhost.storage.metadata import Legality, VolType, VolumeMetadata

log = logging.getLogger(__name__)

JOB_TYPE = "storage"


class Phase(str, enum.Enum):
    PREPARE = "PREPARE"
    COMMIT = "COMMIT"
    REBASE = "REBASE"
    FINALIZE = "FINALIZE"


ABORTABLE = {Phase.PREPARE, Phase.COMMIT}     # before the commit completed


class Fenced(Exception):
    """The base's GEN moved under the job: someone else owns the outcome."""


class FinishedElsewhere(Exception):
    """The job's record left the domain: another host ended the job."""
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


@dataclasses.dataclass
class ColdMergeJob(Record):
    KIND = "coldmerge"
    VERSION = 1
    STATES = Phase
    STATE_FIELD = "phase"
    OWNER_FIELD = "host"
    UUID_FIELDS = ("id", "domain", "image", "base", "top")

    id: str
    domain: str
    image: str
    base: str
    top: str
    child: str                 # top's child; "" when top is the leaf
    generation: int            # the base's GEN when the job was created
    top_capacity: int
    host: str                  # the agent that created the job
    phase: Phase = Phase.PREPARE
    created: float = dataclasses.field(default_factory=time.time)

    @property
    def leaf_merge(self) -> bool:
        return not self.child

    def check(self) -> None:
        if self.child:
            check_uuid(self.child, "job record child")
        if not isinstance(self.generation, int) or not isinstance(self.top_capacity, int):
            raise ValueError("job record: generation and top_capacity must be integers")


class ColdMergeStorage(Protocol):
    def domain(self, sd_uuid: str) -> StorageDomain: ...
    def is_shared(self, sd_uuid: str) -> bool: ...
    # The image's lease held by this agent (no-op on a local domain; 651
    # while another host holds it).
    def hold_image(self, sd_uuid: str, img_uuid: str) -> None: ...
    def release_image(self, sd_uuid: str, img_uuid: str) -> None: ...
    def domain_valid(self, sd_uuid: str) -> bool: ...
    def repo_stats(self, domains: list[str] | None = None) -> dict: ...
    def run_on_domain(self, sd_uuid: str, what: str, fn: Callable, timeout: float | None = None): ...
    def sync_volume_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                          actual: list[str]) -> str: ...
    def finish_merge(self, sd_uuid: str, img_uuid: str, base: str, merged: list[str],
                     capacity: int, base_is_leaf: bool) -> None: ...


VmInUse = Callable[[str, str, str], bool]


class ColdMerger:
    def __init__(self, storage: ColdMergeStorage, scheduler: Scheduler, host_id: str,
                 vm_in_use: VmInUse = lambda sd, img, vol: False,
                 commit_timeout: float = 6 * 3600.0, keep_seconds: float = 3600.0,
                 keep_max: int = 100, takeover_interval: float = 10.0):
        self._storage = storage
        self._scheduler = scheduler
        self._host_id = host_id
        self.vm_in_use = vm_in_use
        self._commit_timeout = commit_timeout
        # One lock for the reports and the image table: a new job's checks and
        # its report are one step.
        self._lock = threading.RLock()
        self._reports = HostJobs(JOB_TYPE, errors.MergeFailed.code, keep_seconds, keep_max,
                                 lock=self._lock)
        self._records = DomainJobStore(ColdMergeJob)
        self._takeover_interval = takeover_interval
        self._live: dict[str, ColdMergeJob] = {}             # job id -> running job
        self._images: dict[tuple[str, str], str] = {}        # (sd, img) -> job id holding it
        self._aborting: set[str] = set()

    # --- API ----------------------------------------------------------------

    def merge(self, job_id: str, subchain: dict) -> None:
        """SDM.merge: validate, write the record (the image is the job's from
        then on) and start the job. Returns at once; Host.getJobs follows it."""
        check_uuid(job_id, "job_id")
        sd, img = check_uuid(subchain["sd_id"], "sd_id"), check_uuid(subchain["img_id"], "img_id")
        base, top = check_uuid(subchain["base_id"], "base_id"), check_uuid(subchain["top_id"],
                                                                           "top_id")
        want_gen = subchain.get("base_generation")
        if base == top:
            raise errors.InvalidParameter("base_id and top_id are the same volume")
        with self._lock:
            self._reports.check_new(job_id)
            holder = self._images.get((sd, img))
            if holder is not None:
                raise errors.VolumeIsBusy(f"image {img} is held by job {holder}")
            # Reserved now, so a second call cannot pass the checks below meanwhile.
            self._images[(sd, img)] = job_id
            self._reports.add(job_id, f"cold merge of {top} into {base}")
        try:
            self._storage.hold_image(sd, img)      # before the record: see Ownership
            job = self._storage.run_on_domain(
                sd, f"cold merge {job_id}: create",
                lambda: self._create(job_id, sd, img, base, top, want_gen))
        except BaseException:
            with self._lock:
                del self._images[(sd, img)]
                self._reports.discard(job_id)
            self._storage.release_image(sd, img)
            raise
        with self._lock:
            self._live[job_id] = job
        log.info("cold merge %s: %s into %s on image %s (base GEN %d)", job_id, top, base, img,
                 job.generation)
        self._submit(job)

    def get_jobs(self, job_type: str | None = None, job_ids: list[str] | None = None) -> dict:
        """Host.getJobs: {job id: HostJobInfo}."""
        return self._reports.infos(job_type, job_ids)

    def abort(self, job_id: str) -> None:
        """Host.abortJob: a job in PREPARE or COMMIT stops (qemu-img is killed)
        and ends ABORTED with the chain as it was. Past the commit a job only
        goes forward: refused. Returns at once; Host.getJobs shows the end."""
        check_uuid(job_id, "job_id")
        with self._lock:
            job = self._live.get(job_id)
            if job is None:
                report = self._reports.get(job_id)
                if report is None:
                    raise errors.NoSuchJob(job_id)
                raise errors.JobInWrongState(f"job {job_id} has ended ({report.status})")
            if job.phase not in ABORTABLE:
                raise errors.JobInWrongState(f"job {job_id} is in {job.phase.value}: past the "
                                             "commit a cold merge only finishes")
            self._aborting.add(job_id)
        log.info("cold merge %s: abort requested", job_id)

    def delete(self, job_id: str) -> None:
        """Host.deleteJob: forget an ended job (it leaves Host.getJobs)."""
        check_uuid(job_id, "job_id")
        self._reports.delete(job_id)

    def image_job(self, sd_uuid: str, img_uuid: str) -> str | None:
        """The job holding the image, if any: one of ours, or a record on the
        domain (another host's, or ours before the start-up scan found it).
        Reads the domain: call it on the domain's executor."""
        with self._lock:
            job_id = self._images.get((sd_uuid, img_uuid))
        if job_id is not None:
            return job_id
        records = self._records.readable(self._storage.domain(sd_uuid))
        return next((job.id for job in records if job.image == img_uuid), None)

    def resume(self) -> None:
        """At agent start: jobs whose records are on a domain resume when
        their domain is VALID."""
        for sd in self._storage.repo_stats():
            self.watch(sd)

    def watch(self, sd: str) -> None:
        """Scan the domain's job records now (again): ours resume; on a shared domain
        another host's are taken over once this host gets their image's lease."""
        self._scheduler.submit(f"coldmerge-scan/{sd}", f"cold merges left on domain {sd}",
                               lambda: self._scan(sd))

    # --- creating a job (on the domain's executor) ----------------------------

    def _create(self, job_id: str, sd: str, img: str, base: str, top: str,
                want_gen: int | None) -> ColdMergeJob:
        dom = self._storage.domain(sd)
        image = Image(dom, img)
        base_md, top_md = image.volume(base), image.volume(top)
        if top_md.parent != base:
            raise errors.InvalidParameter(f"volume {base} is not the parent of {top} "
                                          f"(its parent is {top_md.parent})")
        # A merged-away volume is garbage of no chain; any other ILLEGAL one
        # (a pivot marker, a half-created volume) needs a reconcile first.
        bad = [md.volume for md in image.all_volumes()
               if md.legality is not Legality.LEGAL
               and (md.volume in (base, top) or not md.merged_away)]
        if bad:
            raise errors.InvalidParameter(
                f"image {img} has ILLEGAL volume(s) {', '.join(bad)}: reconcile it first "
                "(Image.reconcileVolumeChain)")
        if want_gen is not None and want_gen != base_md.generation:
            raise errors.GenerationMismatch(f"base volume {base} has GEN {base_md.generation}, "
                                            f"the request expects {want_gen}")
        busy = [v for v in dom.volumes(img) if self.vm_in_use(sd, img, v)]
        if busy:
            raise errors.VolumeIsBusy(f"image {img} is used by a running VM (volume {busy[0]})")
        for other in self._records.readable(dom):
            if other.id == job_id:
                raise errors.JobExists(f"{job_id} (a record on domain {sd})")
            if other.image == img:
                raise errors.VolumeIsBusy(f"image {img} is held by job {other.id} of host "
                                          f"{other.host}")
        kids = image.children(top)
        if len(kids) > 1:
            raise errors.InvalidParameter(f"volume {top} has several children: {kids}")
        # (On a shared domain the caller holds the image's lease now.)
        if executor.remaining(1.0) <= 0:
            # The caller was told this failed (a slow domain): no record now,
            # or a job it believes refused would run after the next start.
            raise errors.StorageDomainUnavailable(f"storage domain {sd} answered too late")
        job = ColdMergeJob(id=job_id, domain=sd, image=img, base=base, top=top,
                           child=kids[0] if kids else "", generation=base_md.generation,
                           top_capacity=top_md.capacity, host=self._host_id)
        self._records.save(dom, job)
        return job

    # --- resuming ---------------------------------------------------------

    def _scan(self, sd: str) -> Outcome:
        if not self._storage.domain_valid(sd):
            return self._blocked(sd)
        try:
            found = self._storage.run_on_domain(sd, "list storage job records",
                                                lambda: self._records.readable(
                                                    self._storage.domain(sd)))
        except errors.StorageDomainDoesNotExist:
            return DONE
        except Exception as e:
            return Retry(f"listing job records on domain {sd} failed: {e}")
        for job in found:
            with self._lock:
                if job.id in self._live:
                    continue
            if not self._may_take_over(job):
                continue
            with self._lock:
                self._live[job.id] = job
                self._images[(job.domain, job.image)] = job.id
                self._reports.discard(job.id)     # (an ended run of it, if listed)
                self._reports.add(job.id, f"cold merge of {job.top} into {job.base}",
                                  status=RUNNING)
            log.info("cold merge %s: resuming in phase %s", job.id, job.phase.value)
            self._submit(job)
        if self._storage.is_shared(sd):
            return Wait(self._takeover_interval)   # other hosts' jobs may need us later
        return DONE

    def _may_take_over(self, job: ColdMergeJob) -> bool:
        """Our own jobs resume. Another host's job is finished only on a shared
        domain and under the image's lease: until this host gets it (the other
        host's agent or the host itself died), it is left alone."""
        if job.owner == self._host_id:
            return True
        if not self._storage.is_shared(job.domain):
            log.warning("cold merge %s on image %s belongs to host %s; a local domain has "
                        "no lease to take it over with", job.id, job.image, job.host)
            return False
        try:
            self._storage.hold_image(job.domain, job.image)
        except errors.VmhostError as e:
            log.debug("cold merge %s of host %s: not taken over: %s", job.id, job.host, e)
            return False
        log.warning("cold merge %s on image %s: host %s left it; this host holds the image's "
                    "lease and finishes it", job.id, job.image, job.host)
        return True

    # --- running ------------------------------------------------------------

    def _submit(self, job: ColdMergeJob) -> None:
        self._scheduler.submit(f"coldmerge/{job.id}", f"cold merge {job.id} of image {job.image}",
                               lambda: self.advance(job.id))

    def _blocked(self, sd: str) -> Blocked:
        return Blocked(Requirement(f"storage domain {sd} is VALID", ("domain", sd),
                                   lambda: self._storage.domain_valid(sd)))

    def advance(self, job_id: str) -> Outcome:
        """The job's work item: runs its phases until it ends, is blocked or fails."""
        with self._lock:
            job = self._live.get(job_id)
            if job is None:
                return DONE
            self._reports.running(job_id)
        # No VM lock to leave: each phase runs whole on the domain's executor.
        return run_steps(lambda: (job.phase, self._run_phase(job)), None, lambda: job.phase,
                         f"cold merge {job_id}", poll=0.0, max_steps=len(Phase) + 1)

    def _run_phase(self, job: ColdMergeJob) -> Outcome | None:
        """One phase; None when the job went on to its next phase."""
        if not self._storage.domain_valid(job.domain):
            return self._blocked(job.domain)
        try:     # held since the record was written; again after an agent restart
            self._storage.hold_image(job.domain, job.image)
        except errors.VmhostError as e:
            return Retry(f"cold merge {job.id} waits for the lease of image {job.image}: {e}")
        if self._abort_requested(job):
            return self._aborted(job)
        try:
            finished = self._storage.run_on_domain(
                job.domain, f"cold merge {job.id}: {job.phase.value}",
                lambda: self._current_phase(job),
                timeout=self._commit_timeout if job.phase is Phase.COMMIT else None)
        except FinishedElsewhere as e:
            log.info("cold merge %s: %s", job.id, e)
            self._end(job, e.status, "" if e.status == DONE_ else str(e))
            return DONE
        except Fenced as e:
            # The fencer owns the image now: our record must not hold it.
            self._drop_record(job)
            self._end(job, FAILED, f"fenced: {e}")
            return DONE
        except qemu_img.Stop:
            return self._aborted(job)
        except errors.StorageDomainUnavailable as e:
            return Retry(str(e))
        except Exception as e:
            phase = job.phase
            if phase in (Phase.PREPARE, Phase.COMMIT) and not _transient(e):
                log.error("cold merge %s failed in %s: %s", job.id, phase.value, e)
                self._drop_record(job)
                self._end(job, FAILED, f"{phase.value.lower()}: {e}")
                return DONE
            log.warning("cold merge %s: %s failed, retrying: %s", job.id, phase.value, e)
            return Retry(f"{phase.value}: {e}")
        if finished:
            self._end(job, DONE_, "")
            return DONE
        return None

    def _abort_requested(self, job: ColdMergeJob) -> bool:
        with self._lock:
            return job.id in self._aborting and job.phase in ABORTABLE

    def _aborted(self, job: ColdMergeJob) -> Outcome:
        """Before the commit completed: top still overlays base, nothing to undo."""
        self._drop_record(job)
        self._end(job, ABORTED, "")
        return DONE

    def _end(self, job: ColdMergeJob, status: str, error: str) -> None:
        self._storage.release_image(job.domain, job.image)
        with self._lock:
            self._aborting.discard(job.id)
            self._live.pop(job.id, None)
            if self._images.get((job.domain, job.image)) == job.id:
                del self._images[(job.domain, job.image)]
            self._reports.end(job.id, status, error)
        log.info("cold merge %s: %s%s", job.id, status, f": {error}" if error else "")

    def _drop_record(self, job: ColdMergeJob) -> None:
        try:
            self._storage.run_on_domain(job.domain, f"cold merge {job.id}: drop record",
                                        lambda: self._records.remove(
                                            self._storage.domain(job.domain), job.id))
        except Exception as e:   # the next start-up resumes it and fails it again
            log.warning("cold merge %s: could not remove its record: %s", job.id, e)

    def _progress(self, job_id: str, percent: float) -> None:
        """qemu-img's progress (from its reader thread); Stop ends the commit."""
        self._set_progress(job_id, percent)
        failpoints.hit("coldmerge.commit.running")
        with self._lock:
            if job_id in self._aborting:
                raise qemu_img.Stop(f"job {job_id} aborted")

    def _set_progress(self, job_id: str, percent: float) -> None:
        self._reports.progress(job_id, percent)

    # --- the phases (on the domain's executor); True when the job is done ---

    def _current_phase(self, job: ColdMergeJob) -> bool:
        """The job's current phase, as its record on the domain says now (read under
        the image's lease: another host may have advanced it, or ended the job)."""
        dom = self._storage.domain(job.domain)
        record = self._records.get(dom, job.id)
        if record is None:
            base = dom.read_metadata(job.image, job.base)
            if base.generation == job.generation + 1:
                raise FinishedElsewhere(DONE_, "done by another host (its record is gone, "
                                               "the base's GEN moved on)")
            raise FinishedElsewhere(FAILED, "ended by another host (its record is gone, the "
                                            "base unchanged)")
        job.phase = record.phase
        return self._STEPS[job.phase](self, job)

    def _step_prepare(self, job: ColdMergeJob) -> bool:
        dom, base = self._check_fence(job)
        failpoints.hit("coldmerge.prepare.before")
        path = dom.volume_path(job.image, job.base)
        size = qemu_img.info(path)["virtual-size"]
        if size < job.top_capacity:
            qemu_img.resize(path, job.top_capacity, base.format.qemu)
        if base.capacity < job.top_capacity:
            # GEN deliberately kept: only the job's last write moves it.
            dom.write_metadata(base.replace(capacity=job.top_capacity))
        failpoints.hit("coldmerge.prepare.after")
        self._advance_to(dom, job, Phase.COMMIT)
        return False

    def _step_commit(self, job: ColdMergeJob) -> bool:
        dom, _ = self._check_fence(job)
        failpoints.hit("coldmerge.commit.before")
        qemu_img.commit(dom.volume_path(job.image, job.top),
                        progress=lambda p: self._progress(job.id, p))
        self._set_progress(job.id, 100.0)
        failpoints.hit("coldmerge.commit.after")
        self._advance_to(dom, job, Phase.FINALIZE if job.leaf_merge else Phase.REBASE)
        return False

    def _step_rebase(self, job: ColdMergeJob) -> bool:
        dom, base = self._check_fence(job)
        failpoints.hit("coldmerge.rebase.before")
        # The backing name stays relative: just the base's UUID (see FileStorageDomain).
        qemu_img.rebase(dom.volume_path(job.image, job.child), job.base,
                        backing_fmt=base.format.qemu, unsafe=True)
        failpoints.hit("coldmerge.rebase.after")
        self._advance_to(dom, job, Phase.FINALIZE)
        return False

    def _step_finalize(self, job: ColdMergeJob) -> bool:
        dom, base = self._check_fence(job, done_ok=True)
        if base.generation != job.generation + 1:
            failpoints.hit("coldmerge.finalize.before")
            image = Image(dom, job.image)
            if job.child:
                leaf = self._leaf_above(image, job.child)
                actual = [v.volume for v in image.chain(leaf) if v.volume != job.top]
                self._storage.sync_volume_chain(job.domain, job.image, leaf, actual)
            failpoints.hit("coldmerge.finalize.synced")
            # Marks top only: the base is the job's own last write, below.
            self._storage.finish_merge(job.domain, job.image, job.base, [job.top],
                                       capacity=0, base_is_leaf=False)
            failpoints.hit("coldmerge.finalize.marked")
            base = dom.read_metadata(job.image, job.base)
            voltype = base.voltype
            if job.leaf_merge and voltype is not VolType.SHARED:
                voltype = VolType.LEAF
            dom.write_metadata(base.replace(capacity=max(base.capacity, job.top_capacity),
                                            voltype=voltype, generation=job.generation + 1))
            failpoints.hit("coldmerge.finalize.after")
        self._records.remove(dom, job.id)
        return True

    _STEPS = {Phase.PREPARE: _step_prepare, Phase.COMMIT: _step_commit,
              Phase.REBASE: _step_rebase, Phase.FINALIZE: _step_finalize}

    def _advance_to(self, dom: StorageDomain, job: ColdMergeJob, phase: Phase) -> None:
        """Write-ahead: the next phase is on the domain before its side effect."""
        job.phase = phase
        self._records.save(dom, job)

    def _check_fence(self, job: ColdMergeJob,
                     done_ok: bool = False) -> tuple[StorageDomain, VolumeMetadata]:
        dom = self._storage.domain(job.domain)
        base = dom.read_metadata(job.image, job.base)
        allowed = {job.generation, job.generation + 1} if done_ok else {job.generation}
        if base.generation not in allowed:
            raise Fenced(f"base volume {job.base} has GEN {base.generation}, the job "
                         f"expects {job.generation}")
        return dom, base

    @staticmethod
    def _leaf_above(image: Image, vol: str) -> str:
        seen = {vol}
        while kids := image.children(vol):
            vol = kids[0]
            if vol in seen:
                raise errors.VolumeMetadataReadError(f"image {image.uuid}: children loop at {vol}")
            seen.add(vol)
        return vol


def _transient(e: Exception) -> bool:
    """qemu-img refused to lock an image another process still holds (e.g. a
    commit of a previous agent that is still exiting): try again later."""
    return isinstance(e, qemu_img.QemuImgError) and "lock" in e.err.lower()
