"""Domain monitor: one thread per storage domain checks that it answers.

The check reads the domain's metadata with O_DIRECT in a child process (dd)
under a timeout. A hung mount can then block only that child, never the
agent: on timeout the child is killed and reaped by a throw-away thread.
"""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

StatusCallback = Callable[[str, bool, str], None]


@dataclasses.dataclass(frozen=True)
class DomainStatus:
    valid: bool | None          # None until the first check finished
    reason: str = ""
    checked_at: float = 0.0     # time.monotonic() of the last finished check
    delay: float = 0.0          # seconds the read took

    def to_api(self, now: float) -> dict:
        return {
            "code": 0 if self.valid else 358,
            "valid": bool(self.valid),
            "reason": self.reason,
            "lastCheck": f"{now - self.checked_at:.1f}" if self.checked_at else "-1",
            "delay": f"{self.delay:.6f}",
            "acquired": True,
            "version": 1,
        }


class Prober:
    """Reads one block of a path with O_DIRECT in a child process.

    A read stuck on a hung mount cannot be killed (the child sleeps in D
    state); the prober then remembers the stuck child and starts no other
    until it is gone, so a dead mount costs one process, not one per check.
    """

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self._stuck: subprocess.Popen | None = None

    def __call__(self) -> tuple[bool, str, float]:
        if self._stuck is not None:
            if self._stuck.poll() is None:
                return False, f"an earlier read of {self.path} is still hung", 0.0
            self._stuck = None
        return self._read()

    def _read(self) -> tuple[bool, str, float]:
        start = time.monotonic()
        proc = subprocess.Popen(
            ["dd", f"if={self.path}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            self._stuck = proc
            return (False, f"read of {self.path} timed out after {self.timeout}s",
                    time.monotonic() - start)
        return _result(proc, err, time.monotonic() - start)


def _result(proc: subprocess.Popen, err: str, elapsed: float) -> tuple[bool, str, float]:
    if proc.returncode != 0:
        lines = (err or "").strip().splitlines()
        return False, lines[0] if lines else f"dd exited {proc.returncode}", elapsed
    return True, "", elapsed


class DomainMonitor:
    def __init__(self, sd_uuid: str, probe_path: str, interval: float, timeout: float,
                 on_change: StatusCallback):
        self.sd_uuid = sd_uuid
        self._probe = Prober(probe_path, timeout)
        self._interval = interval
        self._on_change = on_change
        self._status = DomainStatus(valid=None)
        self._lock = threading.Lock()       # one status change at a time, notified in order
        self._hold: tuple[str, Callable[[], bool]] | None = None   # see mark_invalid
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"monitor/{sd_uuid[:8]}")

    @property
    def status(self) -> DomainStatus:
        return self._status

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def check_now(self) -> None:
        """Ask for a check without waiting for the interval (e.g. after an I/O error)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._check()
            self._wake.wait(self._interval)
            self._wake.clear()

    def mark_invalid(self, reason: str, until: Callable[[], bool]) -> None:
        """INVALID now, without waiting for a probe: an operation on the domain
        hung past its deadline. The domain stays INVALID until `until()` is
        true (the hung operations returned) and then a probe succeeds."""
        with self._lock:
            self._hold = (reason, until)
            self._set(False, reason, self._status.delay)

    def _check(self) -> None:
        ok, reason, delay = self._probe()
        with self._lock:
            ok, reason = self._apply_hold(ok, reason)
            self._set(ok, reason, delay)

    def _apply_hold(self, ok: bool, reason: str) -> tuple[bool, str]:
        if ok and self._hold is not None:
            held, until = self._hold
            if not until():
                return False, held
            self._hold = None
        return ok, reason

    def _set(self, ok: bool, reason: str, delay: float) -> None:
        """Under self._lock: listeners see the changes in the order they happened."""
        old = self._status
        self._status = DomainStatus(valid=ok, reason=reason, checked_at=time.monotonic(),
                                    delay=delay)
        if old.valid is not ok:
            log.info("domain %s became %s%s", self.sd_uuid, "VALID" if ok else "INVALID",
                     f": {reason}" if reason else "")
            try:
                self._on_change(self.sd_uuid, ok, reason)
            except Exception:
                log.exception("domain status callback failed")
