"""Waiting on a condition with a deadline (never a bare sleep)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """The condition did not hold in time: a failed assertion for pytest, a
    TimeoutError for scripts (the benchmarks catch that)."""


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.02) -> T:
    """Poll `predicate` until it returns a truthy value (returned) or the
    deadline passes (WaitTimeout naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
