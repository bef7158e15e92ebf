"""A bound on the active merges that hold their VM paused for a pivot at once.

A pivot pauses the guest (merge.py's PIVOT and CLEANUP states: pause, pivot,
write the pivot marker, resume). libvirt and QEMU run the pivots of many VMs
one after the other (~45 ms each on the lab host), so when twenty active
merges become READY together, pausing them all first leaves each guest paused
for the pivots of the others too (0.6-0.8 s each in a storm of twenty). A job
takes a slot BEFORE its VM is paused and gives it back once the VM runs again:
a VM waits for its slot running, and is paused only for its own pivot.

Waiters are woken oldest first through `wake` (the scheduler's notify of the
job's topic); a waiter that missed its wake-up polls again at the job's poll
interval, so a lost wake-up costs time, never a stuck job. Slots live in
memory only: after a restart a job found in PIVOT goes on without one (its VM
may be paused already).
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 2


class PivotSlots:
    def __init__(self, size: int = DEFAULT_SLOTS):
        if size < 1:
            raise ValueError(f"pivot slots must be at least 1, got {size}")
        self.size = size
        self._lock = threading.Lock()
        self._holders: set[str] = set()
        # job id -> its wake-up, oldest waiter first
        self._waiters: collections.OrderedDict[str, Callable[[], None]] = \
            collections.OrderedDict()

    def take(self, job_id: str, wake: Callable[[], None]) -> bool:
        """True if the job holds a slot now (again: taking twice is one slot);
        False puts it in line, and `wake` is called when a slot frees up."""
        with self._lock:
            if job_id in self._holders:
                return True
            if len(self._holders) < self.size:
                self._holders.add(job_id)
                self._waiters.pop(job_id, None)
                return True
            self._waiters.setdefault(job_id, wake)
            return False

    def release(self, job_id: str) -> None:
        """The job's VM runs again (or the job ended): give its slot, or its
        place in line, back. A no-op for a job that has neither."""
        with self._lock:
            self._waiters.pop(job_id, None)
            if job_id not in self._holders:
                return
            self._holders.discard(job_id)
            wake = self._waiters.popitem(last=False)[1] if self._waiters else None
        if wake is not None:
            try:
                wake()
            except Exception:   # the waiter then polls: late, never stuck
                log.exception("pivot slot: cannot wake the next waiter")

    def holders(self) -> set[str]:
        with self._lock:
            return set(self._holders)

    def waiting(self) -> list[str]:
        with self._lock:
            return list(self._waiters)
