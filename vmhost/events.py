"""Notifications: an in-process bus that fans events out to subscribers
(the server-sent-events endpoint, the scheduler, tests)."""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time

QUEUE_LIMIT = 10000


class Subscription:
    def __init__(self, bus: "EventBus"):
        self._bus = bus
        self.queue: queue.Queue[dict] = queue.Queue(QUEUE_LIMIT)
        self.dropped = 0

    def get(self, timeout: float | None = None) -> dict | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self):
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._listeners: list = []
        self._seq = itertools.count(1)

    def listen(self, callback) -> None:
        """callback(event) synchronously on the publisher's thread (keep it cheap)."""
        self._listeners.append(callback)

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, event: dict) -> None:
        event = {**event, "seq": next(self._seq), "time": time.time()}
        with self._lock:
            subs = list(self._subs)
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:
                logging.getLogger(__name__).exception("event listener failed")
        for sub in subs:
            try:
                sub.queue.put_nowait(event)
            except queue.Full:
                # A subscriber that stopped reading loses events, never the agent.
                sub.dropped += 1
