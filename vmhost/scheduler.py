"""The retry scheduler: one mechanism for all work that cannot always run now.

A work item is a function run again and again until it says it is done. Each
run answers with what should happen next:

- ``DONE``                  the item is finished and forgotten;
- ``Wait(seconds)``         nothing wrong, look again later (a running block
                            job being polled); attempts are not counted;
- ``Retry(reason)``         it failed; run again after an exponential backoff
                            (attempts are counted, the reason is kept);
- ``Blocked(requirement)``  it needs a resource that is not there (e.g. a
                            storage domain that is not VALID); it sleeps until
                            the requirement's topic is notified, with a slow
                            timer as a safety net in case a notification is lost.

An exception escaping the function counts as ``Retry``; so does a value that
is not an outcome, and a run the pool could not start (e.g. "can't start new
thread"): the item backs off and the loop goes on with the other items. Items
are never dropped and never busy-loop: every path back to running goes through
a timer with a floor, or an event. The loop itself follows vmhost.backoff's
rule: an error in it is logged, counted and backed off, never fatal.

A ``submit`` for a key whose item is running is never lost: the running pass
may have read its inputs before the call, so the item runs once more after it,
even if that pass returns ``DONE`` (a second VALID event during a long
EIO-resume pass, a second synchronizeDisks). A ``notify`` during a run only
hastens the next run of an item that is not ``DONE``.

One key never runs twice at once: a run is tied to its dispatch by a token
(a pool may queue a run and still report a failure), and an item submitted
again after a ``cancel`` waits for the cancelled run to end.

Persistence: items are not written anywhere. They are re-derived at start-up
from what is persisted: block job records and pending disk syncs live in each
VM's libvirt metadata, and recovery re-submits one item per record.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, Hashable

from vmhost.backoff import Backoff, exponential, survived

log = logging.getLogger(__name__)

Topic = Hashable


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A named precondition: `topic` is notified when it may have become true."""
    description: str           # e.g. "storage domain 1234... is VALID"
    topic: Topic               # e.g. ("domain", sd_uuid)
    check: Callable[[], bool] = lambda: False


class _Done:
    def __repr__(self) -> str:
        return "DONE"


DONE = _Done()


@dataclasses.dataclass(frozen=True)
class Wait:
    seconds: float


@dataclasses.dataclass(frozen=True)
class Retry:
    reason: str


@dataclasses.dataclass(frozen=True)
class Blocked:
    requirement: Requirement


Outcome = _Done | Wait | Retry | Blocked


@dataclasses.dataclass
class WorkItem:
    key: str                                   # unique; resubmitting a key replaces the function
    description: str
    fn: Callable[[], Outcome]
    topics: tuple[Topic, ...] = ()             # notifications that should run it at once
    attempts: int = 0                          # failed runs since the last success/wait
    reason: str = ""                           # why it is pending now
    blocked_on: Requirement | None = None
    created: float = dataclasses.field(default_factory=time.time)
    next_run: float = 0.0                      # time.monotonic(); 0 = as soon as possible
    running: bool = False
    rerun: bool = False                        # notified while running: run again right after
    resubmit_at: float | None = None           # submitted while running: run again at this time
    generation: int = 0                        # bumps whenever the item is rescheduled
    dispatch: int | None = None                # token of the run in flight

    def to_api(self, now: float) -> dict:
        return {
            "key": self.key, "description": self.description, "reason": self.reason,
            "attempts": self.attempts,
            "requires": self.blocked_on.description if self.blocked_on else None,
            "nextRunIn": None if self.running else round(max(0.0, self.next_run - now), 3),
            "running": self.running,
            "created": self.created,
        }


class Scheduler:
    def __init__(self, workers: int = 4, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 blocked_recheck: float = 30.0, pool: Executor | None = None):
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._blocked_recheck = blocked_recheck
        self._lock = threading.Condition()
        self._items: dict[str, WorkItem] = {}
        self._active: set[str] = set()            # keys with a run in flight
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = itertools.count()
        self._tokens = itertools.count(1)
        self._pool = pool or ThreadPoolExecutor(max_workers=workers, thread_name_prefix="work")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- public API -------------------------------------------------------

    def submit(self, key: str, description: str, fn: Callable[[], Outcome],
               topics: tuple[Topic, ...] = (), delay: float = 0.0) -> None:
        """Add an item, or replace the function of the item with that key.
        If that item is running, it runs again (with `fn`) after this run."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = WorkItem(key=key, description=description, fn=fn, topics=topics)
                self._items[key] = item
            else:
                item.fn, item.description, item.topics = fn, description, topics
            if item.running:
                at = time.monotonic() + delay
                item.resubmit_at = at if item.resubmit_at is None else min(item.resubmit_at, at)
            else:
                self._schedule(item, delay)

    def notify(self, topic: Topic) -> None:
        """Something changed (a domain became VALID, a block job event): run the
        items that wait for it now."""
        with self._lock:
            for item in self._items.values():
                wanted = item.topics + ((item.blocked_on.topic,) if item.blocked_on else ())
                if topic in wanted:
                    if item.running:
                        item.rerun = True
                    else:
                        self._schedule(item, 0.0)

    def pending(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [item.to_api(now) for item in self._items.values()]

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def cancel(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def wait_idle(self, key: str, timeout: float) -> bool:
        """Block until the item `key` is gone (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while key in self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    # --- internals (the caller holds self._lock unless said otherwise) -----

    def _schedule(self, item: WorkItem, delay: float) -> None:
        self._schedule_at(item, time.monotonic() + delay)

    def _schedule_at(self, item: WorkItem, when: float) -> None:
        item.generation += 1
        item.next_run = when
        heapq.heappush(self._heap, (item.next_run, next(self._seq), item.key, item.generation))
        self._lock.notify_all()

    def _loop(self) -> None:
        trouble = Backoff(0.05, 5.0)   # errors of the loop itself, not of the items
        with self._lock:
            while not self._stopping:
                try:
                    timeout = self._dispatch_due()
                    trouble.reset()
                except Exception:
                    timeout = trouble.next()
                    survived("scheduler", "dispatching work failed", timeout)
                    self._resync()
                self._lock.wait(timeout)

    def _resync(self) -> None:
        """After an error in the loop, an item may have left the heap without
        starting: give every idle item an entry again (stale ones are skipped)."""
        for item in self._items.values():
            if not item.running:
                self._schedule_at(item, item.next_run)

    def _dispatch_due(self) -> float | None:
        """Start every item that is due; the seconds until the next one is."""
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now:
            _, _, key, gen = heapq.heappop(self._heap)
            item = self._items.get(key)
            if item is None or item.generation != gen or item.running:
                continue  # stale entry: superseded by a later schedule
            if key in self._active:
                continue  # a cancelled run of this key is still going: _finish reschedules
            self._start(item)
        return (self._heap[0][0] - now) if self._heap else None

    def _start(self, item: WorkItem) -> None:
        item.running, item.dispatch = True, next(self._tokens)
        self._active.add(item.key)
        try:
            self._pool.submit(self._run, item, item.dispatch)
        except Exception as e:
            # E.g. RuntimeError "can't start new thread". ThreadPoolExecutor may
            # have queued the run before failing: the token voids that run.
            item.running, item.dispatch = False, None
            self._active.discard(item.key)
            if self._stopping:
                return
            survived("scheduler", f"could not start work item {item.key}")
            self._apply(item, Retry(f"could not start: {type(e).__name__}: {e}"))

    def _run(self, item: WorkItem, token: int) -> None:
        """On a pool thread, without the lock."""
        with self._lock:
            if item.dispatch != token:
                return  # a start the loop gave up on; it was rescheduled
        outcome: Outcome = Retry("the run ended without an outcome")
        try:
            outcome = _call(item)
        finally:
            self._finish(item, outcome)

    def _finish(self, item: WorkItem, outcome: Outcome) -> None:
        with self._lock:
            item.running, item.dispatch = False, None
            self._active.discard(item.key)
            current = self._items.get(item.key)
            if current is item:
                try:
                    self._apply(item, outcome)
                except Exception:  # a bug here must not lose the item
                    survived("scheduler", f"could not reschedule work item {item.key}")
                    self._schedule(item, self._backoff_max)
            elif current is not None and not current.running:
                self._schedule(current, 0.0)  # it waited for this cancelled run to end
            self._lock.notify_all()

    def _apply(self, item: WorkItem, outcome: Outcome) -> None:
        rerun, item.rerun = item.rerun, False
        resubmit_at, item.resubmit_at = item.resubmit_at, None
        if not (outcome is DONE or isinstance(outcome, (Wait, Retry, Blocked))):
            log.error("work item %s returned %r, not an outcome", item.key, outcome)
            outcome = Retry(f"returned {outcome!r}, not an outcome")
        if outcome is DONE:
            if resubmit_at is None:
                del self._items[item.key]
                return
            # Submitted again during this run: that request is not served yet.
            item.attempts, item.blocked_on, item.reason = 0, None, ""
            self._schedule_at(item, resubmit_at)
            return
        if isinstance(outcome, Wait):
            item.attempts, item.blocked_on, item.reason = 0, None, ""
            self._schedule(item, 0.0 if rerun else outcome.seconds)
        elif isinstance(outcome, Blocked):
            item.blocked_on = outcome.requirement
            item.reason = f"waiting: {outcome.requirement.description}"
            ready = rerun or _safe_check(outcome.requirement)
            self._schedule(item, self._backoff_base if ready else self._blocked_recheck)
        else:
            item.attempts += 1
            item.blocked_on = None
            item.reason = outcome.reason
            delay = exponential(self._backoff_base, self._backoff_max, item.attempts)
            log.info("work item %s: retry #%d in %.1fs: %s", item.key, item.attempts, delay,
                     outcome.reason)
            self._schedule(item, delay)
        if resubmit_at is not None and resubmit_at < item.next_run:
            self._schedule_at(item, resubmit_at)


def _call(item: WorkItem) -> Outcome:
    try:
        return item.fn()
    except Exception as e:  # a bug or an unexpected error: never lose the item
        log.exception("work item %s failed", item.key)
        return Retry(f"{type(e).__name__}: {e}")


def _safe_check(req: Requirement) -> bool:
    try:
        return bool(req.check())
    except Exception:
        return False
