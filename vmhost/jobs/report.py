"""How jobs are shown: the one place for vmJobs entries (with the one-time
final entries), Host.getJobs' host jobs, the job history and the state
counts of the metrics. Job kinds build their own entry (its fields are the
kind's); when and how long it is shown is decided here."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from vmhost import errors

log = logging.getLogger(__name__)

T = TypeVar("T")
PENDING, RUNNING, DONE, FAILED, ABORTED = "pending", "running", "done", "failed", "aborted"


class VmJobsReport:
    """The vmJobs of each VM. A live job is shown by its record. Jobs that
    finished before any stats call showed them are shown in their final
    state until a stats call saw them and `ttl()` seconds passed, so a job
    is always seen by the next stats call, and a fast monitoring poller
    cannot take the engine's one look at it."""

    def __init__(self, ttl: Callable[[], float]):
        self._ttl = ttl
        self._lock = threading.Lock()
        self._unreported: set[str] = set()
        self._finals: dict[str, dict[str, dict]] = {}    # vm -> job -> entry
        self._meta: dict[str, list[float]] = {}          # job -> [finished, first seen]

    def started(self, job_id: str) -> None:
        """A new job: kept as a final entry if it ends before a stats call shows it."""
        with self._lock:
            self._unreported.add(job_id)

    def unstarted(self, job_id: str) -> None:
        """A job refused at its start leaves no trace."""
        with self._lock:
            self._unreported.discard(job_id)

    def unreported(self) -> set[str]:
        with self._lock:
            return set(self._unreported)

    def finish(self, vm_id: str, job_id: str, entry: dict,
               leave: Callable[[], T]) -> tuple[T, Callable[[Callable[[T], None]], None]]:
        """The job leaves the live records (`leave`, run under the report's
        lock, so a stats call finds the job in exactly one of the two places)
        and, unless a stats call showed it, becomes a final entry. Returns
        what `leave` returned and an undo(restore) for a failed persist."""
        with self._lock:
            left = leave()
            shown_final = job_id in self._unreported
            if shown_final:
                self._unreported.discard(job_id)
                self._finals.setdefault(vm_id, {})[job_id] = entry
                self._meta[job_id] = [time.monotonic(), 0.0]

        def undo(restore: Callable[[T], None]) -> None:
            with self._lock:
                restore(left)
                self._drop(vm_id, job_id)
                if shown_final:
                    self._unreported.add(job_id)
        return left, undo

    def entries(self, vm_id: str, records: Callable[[], list[dict]],
                entry: Callable[[dict], dict]) -> dict:
        """vmJobs: the final entries still due, then one entry per live record."""
        now = time.monotonic()
        with self._lock:
            for job_id in list(self._finals.get(vm_id, {})):
                finished, seen = self._meta[job_id]
                if seen and now - finished >= self._ttl():
                    self._drop(vm_id, job_id)     # shown, and old enough
            out = dict(self._finals.get(vm_id, {}))
            for job_id in out:
                self._meta[job_id][1] = self._meta[job_id][1] or now
            live = records()
            self._unreported.difference_update(rec.get("id") for rec in live)
        for rec in live:
            out[rec.get("id")] = entry(rec)
        return out

    def drop(self, vm_id: str, job_id: str) -> None:
        with self._lock:
            self._drop(vm_id, job_id)

    def forget(self, vm_id: str) -> None:
        """The VM left this host."""
        with self._lock:
            for job_id in self._finals.pop(vm_id, {}):
                self._meta.pop(job_id, None)

    def _drop(self, vm_id: str, job_id: str) -> None:
        finals = self._finals.get(vm_id, {})
        finals.pop(job_id, None)
        if not finals:
            self._finals.pop(vm_id, None)
        self._meta.pop(job_id, None)


@dataclasses.dataclass
class HostJob:
    """What Host.getJobs reports of one job (VDSM's HostJobInfo)."""
    id: str
    description: str
    status: str = PENDING
    progress: float = 0.0
    error: str = ""
    ended: float | None = None          # time.monotonic() when it finished


class HostJobs:
    """Host.getJobs' table. Ended jobs stay listed for `keep_seconds` (at
    most `keep_max` of them), in memory. `lock` may be the owner's (an
    RLock), so that its own checks and an add are one step."""

    def __init__(self, job_type: str, error_code: int, keep_seconds: float, keep_max: int,
                 lock: Any = None):
        self.job_type = job_type
        self._code = error_code
        self._keep_seconds, self._keep_max = keep_seconds, keep_max
        self._lock = lock or threading.RLock()
        self._jobs: dict[str, HostJob] = {}

    def add(self, job_id: str, description: str, status: str = PENDING) -> None:
        with self._lock:
            self.check_new(job_id)
            self._jobs[job_id] = HostJob(job_id, description, status=status)

    def check_new(self, job_id: str) -> None:
        """JobExists if the id is listed (ended jobs included)."""
        with self._lock:
            self._prune()
            if job_id in self._jobs:
                raise errors.JobExists(job_id)

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def get(self, job_id: str) -> HostJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def running(self, job_id: str) -> None:
        with self._lock:
            self._jobs[job_id].status = RUNNING

    def progress(self, job_id: str, percent: float) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.progress = max(0.0, min(100.0, percent))

    def end(self, job_id: str, status: str, error: str = "") -> None:
        with self._lock:
            job = self._jobs[job_id]
            job.status, job.error, job.ended = status, error, time.monotonic()
            if status == DONE:
                job.progress = 100

    def delete(self, job_id: str) -> None:
        """Host.deleteJob: forget an ended job."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise errors.NoSuchJob(job_id)
            if job.ended is None:
                raise errors.JobInWrongState(f"job {job_id} is {job.status}; abort it first")
            del self._jobs[job_id]

    def infos(self, job_type: str | None = None, job_ids: Iterable[str] | None = None) -> dict:
        """Host.getJobs: {job id: HostJobInfo}."""
        if job_type not in (None, self.job_type):
            return {}
        wanted = None if job_ids is None else set(job_ids)
        with self._lock:
            self._prune()
            return {j.id: self._info(j) for j in self._jobs.values()
                    if wanted is None or j.id in wanted}

    def _info(self, job: HostJob) -> dict:
        d = {"id": job.id, "status": job.status, "progress": int(job.progress),
             "description": job.description, "job_type": self.job_type}
        if job.error:
            d["error"] = {"code": self._code, "message": job.error}
        return d

    def _prune(self) -> None:
        """Ended jobs older than keep_seconds go, and the oldest beyond keep_max."""
        now = time.monotonic()
        ended = sorted((j for j in self._jobs.values() if j.ended is not None),
                       key=lambda j: j.ended or 0.0)
        excess = len(ended) - self._keep_max
        for i, j in enumerate(ended):
            if i < excess or now - (j.ended or now) > self._keep_seconds:
                del self._jobs[j.id]


def record_history(history: Any, entry: dict) -> None:
    """Append a finished job to the history; a convenience, so a failure to
    write it never fails the job."""
    try:
        history.append(entry)
    except OSError as e:
        log.error("cannot record job %s in the history: %s", entry.get("id"), e)


def state_counts(records: Iterable[dict]) -> dict[str, int]:
    """Jobs by the state their records show (for the metrics' gauges)."""
    counts: dict[str, int] = {}
    for rec in records:
        state = rec.get("state") if isinstance(rec, dict) else None
        if isinstance(state, str):
            counts[state] = counts.get(state, 0) + 1
    return counts
