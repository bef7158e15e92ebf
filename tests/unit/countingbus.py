"""An EventBus for the SSE and TLS tests. (Not a conftest.py: a second
module named conftest would shadow tests/integration/conftest.py.)"""
from __future__ import annotations

import threading

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
