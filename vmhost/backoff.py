"""Log, back off, carry on: the rule every background thread follows.

A background thread (the scheduler loop, a domain monitor, the libvirt event
loop) must never die of an error it did not expect: a dead thread fails
silently, freezes what it was maintaining (a domain's status, the pending
work, the event stream) and nothing restarts it. Each one therefore catches
every ``Exception`` at its top, logs it with its traceback, counts it by
thread (``thread_errors``, exported as ``vmhost_thread_errors``), waits an
exponentially growing delay so a persistent error cannot turn into a busy loop
or a flood of logs, and carries on.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


def exponential(base: float, ceiling: float, failures: int) -> float:
    """The delay after `failures` failures in a row (1 -> base, doubling, capped)."""
    return min(ceiling, base * 2 ** max(0, failures - 1))


class Backoff:
    """Exponential delays from `base` up to `ceiling`, back to `base` after a success."""

    def __init__(self, base: float, ceiling: float):
        if base <= 0 or ceiling < base:
            raise ValueError(f"backoff needs 0 < base <= ceiling, got {base}, {ceiling}")
        self.base = base
        self.ceiling = ceiling
        self.failures = 0

    def next(self) -> float:
        """Count one failure; the delay to wait before trying again."""
        self.failures += 1
        return exponential(self.base, self.ceiling, self.failures)

    def reset(self) -> None:
        self.failures = 0


class ErrorCounts:
    """How many unexpected errors each background thread survived."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def record(self, thread: str) -> int:
        with self._lock:
            self._counts[thread] = self._counts.get(thread, 0) + 1
            return self._counts[thread]

    def get(self, thread: str) -> int:
        with self._lock:
            return self._counts.get(thread, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# Process-wide like the threads themselves; read at scrape time by /metrics.
thread_errors = ErrorCounts()


def survived(thread: str, what: str, delay: float | None = None) -> None:
    """Log the exception being handled and count it; call from an ``except`` block."""
    n = thread_errors.record(thread)
    then = f"; carrying on in {delay:.1f}s" if delay is not None else "; carrying on"
    log.exception("%s: %s (error #%d of this thread)%s", thread, what, n, then)


def run_forever(thread: str, step: Callable[[], None], stop: threading.Event,
                backoff: Backoff) -> None:
    """Call `step` until `stop` is set; an error in it is logged, counted and
    followed by the backoff's delay; a success resets the backoff."""
    while not stop.is_set():
        try:
            step()
        except Exception:
            delay = backoff.next()
            survived(thread, "unexpected error", delay)
            stop.wait(delay)
        else:
            backoff.reset()
