"""Per-domain bounded executors: a hung storage domain costs a bounded resource.

A read or an fsync on a hard-mounted NFS or a dead iSCSI path sleeps in the
kernel for minutes and no signal wakes it. So every storage operation on a
domain runs on one of that domain's few worker threads, never on the
caller's own thread:

- the caller waits at most the operation's deadline, then gets `Timeout` and
  goes on (the storage service turns that into an error naming the domain and
  makes the domain INVALID);
- a worker stuck in the kernel stays parked until the storage answers; it
  costs one of the domain's `workers` threads and nothing else;
- when every worker of the domain is parked past its deadline, or the queue
  is full, a new operation is refused at once (`Exhausted`): nothing waits
  for ever behind a hung domain;
- other domains have workers of their own and never notice.

An operation that has not started by its deadline is dropped, so a caller
told "failed" is not surprised by the operation happening later; one that
started cannot be stopped: it finishes whenever the storage answers, and its
late result is logged and dropped (the write-ahead records and idempotent
repairs of the callers make that safe). `on_drained` is called when the last
operation running past its deadline has returned.

Code running on a worker can ask `remaining()` for the time its operation
has left: child processes (qemu-img) and lock waits use it, so they end with
the operation instead of outliving it.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_local = threading.local()


class Timeout(Exception):
    """The operation did not finish by its deadline."""


class Exhausted(Exception):
    """Refused at once: every worker is parked past its deadline, or the queue is full."""


def remaining(default: float | None = None) -> float | None:
    """Seconds left to the storage operation running on this thread (never
    negative), or `default` outside of one."""
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return default
    return max(0.0, deadline - time.monotonic())


@dataclasses.dataclass(eq=False)
class _Task:
    what: str
    fn: Callable[[], Any]
    deadline: float
    started: float = 0.0
    abandoned: bool = False              # the caller gave up waiting
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class DomainExecutor:
    def __init__(self, name: str, workers: int = 4, queue_size: int = 16,
                 on_drained: Callable[[], None] = lambda: None):
        if workers < 1 or queue_size < 0:
            raise ValueError(f"workers must be >= 1 and queue_size >= 0, "
                             f"got {workers} and {queue_size}")
        self.name = name
        self._workers = workers
        self._queue_size = queue_size
        self._on_drained = on_drained
        self._cond = threading.Condition()
        self._queue: collections.deque[_Task] = collections.deque()
        self._running: set[_Task] = set()
        self._threads = 0
        self._idle = 0
        self._closed = False

    # --- callers ------------------------------------------------------------

    def run(self, what: str, fn: Callable[[], T], timeout: float) -> T:
        """fn() on a worker; its result or its exception, within `timeout` seconds.

        Raises Timeout past the deadline and Exhausted when refused at once.
        A call made from one of this executor's own workers (an operation
        using another) runs inline, under the outer operation's deadline.
        """
        if getattr(_local, "executor", None) is self:
            return fn()
        task = _Task(what, fn, time.monotonic() + timeout)
        with self._cond:
            self._admit(task)
        task.done.wait(timeout)
        with self._cond:
            if not task.done.is_set():
                task.abandoned = True
                if task in self._queue:
                    self._queue.remove(task)
                    raise Timeout(f"{what} did not start within {timeout:g}s: "
                                  f"{self._busy_text()}")
                raise Timeout(f"{what} did not finish within {timeout:g}s")
        if task.error is not None:
            raise task.error
        return task.result

    def stuck(self) -> list[str]:
        """Operations still running past their deadline (oldest first)."""
        with self._cond:
            return [t.what for t in self._stuck_locked()]

    def close(self) -> None:
        """Idle workers exit; parked ones exit when they return."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()

    def _admit(self, task: _Task) -> None:
        if self._closed:
            raise Exhausted(f"{self.name}: executor is closed")
        stuck = self._stuck_locked()
        if len(stuck) >= self._workers:
            oldest = stuck[0]
            raise Exhausted(f"all {self._workers} storage workers are blocked; the oldest, "
                            f"{oldest.what}, for {time.monotonic() - oldest.started:.0f}s")
        free_workers = self._workers - len(self._running)
        if len(self._queue) >= self._queue_size + free_workers:
            raise Exhausted(f"{len(self._queue)} operations are already waiting: "
                            f"{self._busy_text()}")
        self._queue.append(task)
        if len(self._queue) > self._idle and self._threads < self._workers:
            self._threads += 1
            threading.Thread(target=self._work, daemon=True,
                             name=f"storage/{self.name[:8]}").start()
        else:
            self._cond.notify()

    def _stuck_locked(self) -> list[_Task]:
        now = time.monotonic()
        return sorted((t for t in self._running if t.deadline < now), key=lambda t: t.started)

    def _busy_text(self) -> str:
        return f"{len(self._running)} of {self._workers} workers busy ({len(self._stuck_locked())} " \
               "past their deadline)"

    # --- workers ------------------------------------------------------------

    def _work(self) -> None:
        _local.executor = self
        while True:
            task = self._next()
            if task is None:
                return
            _local.deadline = task.deadline
            try:
                task.result = task.fn()
            except BaseException as e:     # handed to the caller, who raises it
                task.error = e
            finally:
                _local.deadline = None
            self._finish(task)

    def _next(self) -> _Task | None:
        with self._cond:
            self._idle += 1
            try:
                while not self._queue:
                    if self._closed:
                        self._threads -= 1
                        return None
                    self._cond.wait()
            finally:
                self._idle -= 1
            task = self._queue.popleft()
            task.started = time.monotonic()
            self._running.add(task)
            return task

    def _finish(self, task: _Task) -> None:
        with self._cond:
            self._running.discard(task)
            late = task.abandoned
            drained = late and not self._stuck_locked()
            task.done.set()
        if late:
            log.warning("%s: %s returned %.1fs after its deadline (its caller got an error)%s",
                        self.name, task.what, time.monotonic() - task.deadline,
                        f": {task.error}" if task.error else "")
        if drained:
            log.info("%s: no storage operation is blocked any more", self.name)
            try:
                self._on_drained()
            except Exception:
                log.exception("%s: on_drained failed", self.name)
