"""Shared fixtures of the unit tests."""
from __future__ import annotations

import threading

import pytest

from vmhost.events import EventBus, Subscription


class CountingBus(EventBus):
    """An EventBus that lets a test wait until the server opened or closed its
    subscriptions."""

    def __init__(self):
        super().__init__()
        self.open = 0
        self._changed = threading.Condition()

    def subscribe(self) -> Subscription:
        sub = super().subscribe()
        with self._changed:
            self.open += 1
            self._changed.notify_all()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        super().unsubscribe(sub)
        with self._changed:
            self.open -= 1
            self._changed.notify_all()

    def wait_open(self, count: int, timeout: float = 5) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.open == count, timeout)


@pytest.fixture
def bus() -> CountingBus:
    return CountingBus()
