"""Finished block jobs, kept for a bounded time and count so that an engine
that missed the end of a job (or talks to a restarted agent) can still learn
its outcome. Persisted in the state dir, rewritten atomically on each change."""
from __future__ import annotations

import json
import logging
import threading
import time

from vmhost.fsutil import atomic_write

log = logging.getLogger(__name__)


class JobHistory:
    def __init__(self, path: str | None, max_entries: int = 1000, ttl: float = 7 * 86400.0):
        self._path = path
        self._max = max_entries
        self._ttl = ttl
        self._lock = threading.Lock()
        self._entries: list[dict] = self._load()

    def _load(self) -> list[dict]:
        if not self._path:
            return []
        try:
            with open(self._path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.error("job history %s unreadable, starting empty: %s", self._path, e)
            return []
        return self._trim([e for e in data.get("jobs", []) if isinstance(e, dict)])

    def _trim(self, entries: list[dict]) -> list[dict]:
        oldest = time.time() - self._ttl
        entries = [e for e in entries if e.get("finished", 0) >= oldest]
        return entries[-self._max:] if self._max else []

    def append(self, entry: dict) -> None:
        with self._lock:
            # A job finished again after a crash replaces its earlier entry.
            kept = [e for e in self._entries if e.get("id") != entry.get("id")]
            self._entries = self._trim(kept + [entry])
            if self._path:
                atomic_write(self._path, json.dumps({"version": 1, "jobs": self._entries},
                                                    separators=(",", ":")).encode())

    def find(self, job_id: str) -> dict | None:
        with self._lock:
            for e in reversed(self._entries):
                if e.get("id") == job_id:
                    return e
        return None

    def list(self) -> list[dict]:
        with self._lock:
            self._entries = self._trim(self._entries)
            return list(self._entries)
