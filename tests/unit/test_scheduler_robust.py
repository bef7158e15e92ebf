"""The scheduler survives a pool that cannot start a thread, items that raise or
return nonsense, errors in its own loop, and keeps a resubmission that arrives
while its item runs."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from vmhost.backoff import thread_errors
from vmhost.scheduler import DONE, Retry, Scheduler
from vmhost.testing.waiting import wait_for

DEADLINE = 10.0


class FlakyPool(ThreadPoolExecutor):
    """A pool whose first `failures` submits raise like a process out of threads.
    With queue_first, the run is queued before the error, as
    ThreadPoolExecutor.submit does when starting its thread fails."""

    def __init__(self, failures: int = 1, queue_first: bool = False):
        super().__init__(max_workers=2)
        self.failures = failures
        self.queue_first = queue_first
        self.refused = 0
        self.orphans: list[Future] = []

    def submit(self, fn, /, *args, **kwargs):
        if self.refused < self.failures:
            self.refused += 1
            if self.queue_first:
                self.orphans.append(super().submit(fn, *args, **kwargs))
            raise RuntimeError("can't start new thread")
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def scheduler():
    """A factory of schedulers with a short backoff, stopped after the test."""
    made: list[Scheduler] = []

    def make(start: bool = True, **kwargs) -> Scheduler:
        kwargs.setdefault("backoff_base", 0.01)
        sched = Scheduler(**kwargs)
        made.append(sched)
        if start:
            sched.start()
        return sched
    yield make
    for sched in made:
        sched.stop()


class Counter:
    """An item function that counts its runs and fails if two overlap."""

    def __init__(self, outcomes=()):
        self.runs = 0
        self.overlaps = 0
        self._outcomes = list(outcomes)
        self._inside = 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self._inside += 1
            self.overlaps += self._inside > 1
            self.runs += 1
            outcome = self._outcomes.pop(0) if self._outcomes else DONE
        with self._lock:
            self._inside -= 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_failed_pool_submit_retries_and_later_items_run(scheduler):
    pool = FlakyPool(failures=1)
    sched = scheduler(pool=pool)
    errors_before = thread_errors.get("scheduler")
    first, later = Counter(), Counter()
    sched.submit("first", "refused once by the pool", first)
    sched.submit("later", "submitted after", later)
    assert sched.wait_idle("first", DEADLINE) and sched.wait_idle("later", DEADLINE)
    assert pool.refused == 1
    assert (first.runs, later.runs) == (1, 1)
    assert thread_errors.get("scheduler") == errors_before + 1
    assert sched._thread.is_alive()


def test_pool_that_queues_then_fails_never_runs_an_item_twice(scheduler):
    pool = FlakyPool(failures=1, queue_first=True)
    sched = scheduler(pool=pool)
    item = Counter()
    sched.submit("k", "queued by a failing submit", item)
    assert sched.wait_idle("k", DEADLINE)
    pool.orphans[0].result(DEADLINE)   # the orphan run has finished too
    assert item.runs == 1 and item.overlaps == 0


def test_failed_submit_is_shown_as_a_retry(scheduler):
    pool = FlakyPool(failures=1)
    sched = scheduler(pool=pool, backoff_base=60.0)
    sched.submit("k", "refused", Counter())
    wait_for(lambda: sched.has("k") and _entry(sched, "k")["attempts"] == 1, what="a retry")
    entry = _entry(sched, "k")
    assert "could not start: RuntimeError: can't start new thread" in entry["reason"]
    assert entry["running"] is False and entry["nextRunIn"] > 10


def test_item_raising_is_logged_retried_and_other_items_run(scheduler, caplog):
    sched = scheduler()
    boom = Counter([ValueError("disk on fire"), ValueError("still on fire")])
    other = Counter()
    sched.submit("boom", "raises twice", boom)
    sched.submit("other", "fine", other)
    assert sched.wait_idle("boom", DEADLINE) and sched.wait_idle("other", DEADLINE)
    assert (boom.runs, other.runs) == (3, 1)
    assert sum("work item boom failed" in r.getMessage() for r in caplog.records) == 2
    assert sched._thread.is_alive()


def test_item_raising_base_exception_is_not_left_running(scheduler):
    sched = scheduler()
    item = Counter([SystemExit(3)])
    sched.submit("k", "raises SystemExit once", item)
    assert sched.wait_idle("k", DEADLINE)
    assert item.runs == 2


def test_a_value_that_is_not_an_outcome_is_retried(scheduler):
    sched = scheduler()
    item = Counter([None, "done?"])
    sched.submit("k", "returns nonsense twice", item)
    assert sched.wait_idle("k", DEADLINE)
    assert item.runs == 3


def test_item_popped_before_a_loop_error_is_not_lost(scheduler, monkeypatch):
    sched = scheduler(start=False)
    real, failed = sched._start, []

    def broken_once(item):   # the item has left the heap when this raises
        if not failed:
            failed.append(item.key)
            raise AttributeError("bug after the pop")
        real(item)
    monkeypatch.setattr(sched, "_start", broken_once)
    item = Counter()
    sched.submit("k", "popped, then the loop failed", item)
    sched.start()
    assert sched.wait_idle("k", DEADLINE)
    assert failed == ["k"] and item.runs == 1


def test_error_in_the_loop_itself_is_survived(scheduler, monkeypatch):
    sched = scheduler(start=False)
    real = sched._dispatch_due
    calls = {"n": 0}

    def broken_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("bug in the loop")
        return real()
    monkeypatch.setattr(sched, "_dispatch_due", broken_once)
    errors_before = thread_errors.get("scheduler")
    item = Counter()
    sched.submit("k", "after a loop error", item)
    sched.start()
    assert sched.wait_idle("k", DEADLINE)
    assert item.runs == 1 and sched._thread.is_alive()
    assert thread_errors.get("scheduler") == errors_before + 1


class Gate:
    """An item function that blocks its first run until released."""

    def __init__(self, outcome=DONE):
        self.started = threading.Event()
        self.release = threading.Event()
        self.outcome = outcome

    def __call__(self):
        self.started.set()
        assert self.release.wait(DEADLINE)
        return self.outcome


@pytest.mark.parametrize("first, backoff", [(DONE, 0.01), (Retry("storage hiccup"), 60.0)],
                         ids=["done", "retry-skips-the-backoff"])
def test_resubmission_during_a_run_is_kept(scheduler, first, backoff):
    sched = scheduler(backoff_base=backoff)
    gate, again = Gate(first), Counter()
    sched.submit("resume-eio/sd", "first VALID event", gate)
    assert gate.started.wait(DEADLINE)
    sched.submit("resume-eio/sd", "second VALID event", again)
    assert _entry(sched, "resume-eio/sd")["running"] is True
    gate.release.set()
    assert sched.wait_idle("resume-eio/sd", DEADLINE)   # well before a 60 s backoff
    assert again.runs == 1


def test_notify_during_a_done_run_does_not_revive_it(scheduler):
    sched = scheduler()
    gate = Gate(DONE)
    sched.submit("k", "done after the notify", gate, topics=(("vm", "x"),))
    assert gate.started.wait(DEADLINE)
    sched.notify(("vm", "x"))
    gate.release.set()
    assert sched.wait_idle("k", DEADLINE)
    assert not sched.has("k")


def test_resubmit_after_cancel_waits_for_the_cancelled_run(scheduler):
    sched = scheduler()
    gate, second = Gate(DONE), Counter()
    sched.submit("k", "cancelled while running", gate)
    assert gate.started.wait(DEADLINE)
    sched.cancel("k")
    running_alone = threading.Event()

    def observe():   # the new item must not start while the old run goes on
        running_alone.set()
        return second()
    sched.submit("k", "new item, same key", observe)
    assert not running_alone.wait(0.2)   # bounded negative check, not a wait for an event
    gate.release.set()
    assert sched.wait_idle("k", DEADLINE)
    assert second.runs == 1


def _entry(sched: Scheduler, key: str) -> dict:
    return next(e for e in sched.pending() if e["key"] == key)


def test_survived_errors_are_exported_by_thread(scheduler):
    import types

    from vmhost.metrics import Metrics
    sched = scheduler(pool=FlakyPool(failures=1))
    sched.submit("k", "refused once", Counter())
    assert sched.wait_idle("k", DEADLINE)
    storage = types.SimpleNamespace(repo_stats=dict)
    text = Metrics(types.SimpleNamespace(vms=list), sched, storage).render().decode()
    line = next(ln for ln in text.splitlines()
                if ln.startswith('vmhost_thread_errors_total{thread="scheduler"}'))
    assert float(line.split()[-1]) == thread_errors.get("scheduler") >= 1
