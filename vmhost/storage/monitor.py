"""Domain monitor: one thread per storage domain checks that it answers.

The check reads the domain's metadata with O_DIRECT in a child process (dd)
under a timeout. A hung mount can then block only that child, never the
agent: on timeout the child is killed and reaped by a throw-away thread.

When the prober itself fails (``Popen`` raising EMFILE or ENOMEM, any
unexpected exception) nothing was learnt about the storage: the agent, not the
domain, is in trouble. Such an error keeps the last verdict and re-checks
after a short backoff; if no check gets through for ``timeout`` seconds, the
domain turns INVALID ("cannot check ..."), as it would after a read hung for
``timeout`` seconds. A transient prober failure thus never flaps a healthy
domain, and a persistent one never leaves a stale VALID: VALID always means a
read succeeded less than ``interval + timeout`` ago. The thread never dies: an
error anywhere in its loop is logged, counted and backed off (vmhost.backoff).
"""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import threading
import time
from typing import Callable

from vmhost.backoff import Backoff, survived

log = logging.getLogger(__name__)

StatusCallback = Callable[[str, bool, str], None]
Probe = Callable[[], tuple[bool, str, float]]   # () -> (ok, reason, seconds the read took)

PROBER_RETRY_BASE = 0.5   # first re-check after the prober itself failed, seconds


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
        except BaseException:
            proc.kill()          # never leak the child; it is reaped by the next call
            self._stuck = proc
            raise
        return _result(proc, err, time.monotonic() - start)


def _result(proc: subprocess.Popen, err: str, elapsed: float) -> tuple[bool, str, float]:
    if proc.returncode != 0:
        lines = (err or "").strip().splitlines()
        return False, lines[0] if lines else f"dd exited {proc.returncode}", elapsed
    return True, "", elapsed


class DomainMonitor:
    def __init__(self, sd_uuid: str, probe_path: str, interval: float, timeout: float,
                 on_change: StatusCallback, prober: Probe | None = None):
        self.sd_uuid = sd_uuid
        self._probe = prober or Prober(probe_path, timeout)
        self._interval = interval
        self._timeout = timeout
        self._on_change = on_change
        self._status = DomainStatus(valid=None)
        self._unchecked_since: float | None = None   # first prober error of the current run
        self._trouble = Backoff(min(PROBER_RETRY_BASE, interval), interval)
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
            try:
                delay = self._check()
            except Exception:  # a bug outside the probe: the status must not freeze
                delay = self._trouble.next()
                survived(self._thread.name, f"checking domain {self.sd_uuid} failed", delay)
            self._wake.wait(delay)
            self._wake.clear()

    def mark_invalid(self, reason: str, until: Callable[[], bool]) -> None:
        """INVALID now, without waiting for a probe: an operation on the domain
        hung past its deadline. The domain stays INVALID until `until()` is
        true (the hung operations returned) and then a probe succeeds."""
        with self._lock:
            self._hold = (reason, until)
            self._set(DomainStatus(valid=False, reason=reason, checked_at=time.monotonic(),
                                   delay=self._status.delay))

    def _check(self) -> float:
        """Run one check; the seconds until the next one."""
        try:
            ok, reason, delay = self._probe()
        except Exception as e:
            return self._prober_failed(e)
        self._unchecked_since = None
        self._trouble.reset()
        with self._lock:
            ok, reason = self._apply_hold(ok, reason)
            self._set(DomainStatus(valid=ok, reason=reason, checked_at=time.monotonic(),
                                   delay=delay))
        return self._interval

    def _prober_failed(self, error: Exception) -> float:
        now = time.monotonic()
        if self._unchecked_since is None:
            self._unchecked_since = now
        unchecked = now - self._unchecked_since
        left = self._timeout - unchecked
        retry = min(self._trouble.next(), self._interval)
        if left > 0:
            retry = min(retry, left)   # at the latest when the grace ends: the verdict is on time
        survived(self._thread.name, f"cannot check domain {self.sd_uuid}", retry)
        if left <= 0:
            with self._lock:
                self._set(DomainStatus(
                    valid=False, checked_at=now,
                    reason=f"cannot check the domain for {unchecked:.1f}s: "
                           f"{type(error).__name__}: {error}"))
        return retry

    def _apply_hold(self, ok: bool, reason: str) -> tuple[bool, str]:
        if ok and self._hold is not None:
            held, until = self._hold
            if not until():
                return False, held
            self._hold = None
        return ok, reason

    def _set(self, status: DomainStatus) -> None:
        """Under self._lock: listeners see the changes in the order they happened."""
        old, self._status = self._status, status
        if old.valid is not status.valid:
            log.info("domain %s became %s%s", self.sd_uuid,
                     "VALID" if status.valid else "INVALID",
                     f": {status.reason}" if status.reason else "")
            try:
                self._on_change(self.sd_uuid, bool(status.valid), status.reason)
            except Exception:
                log.exception("domain status callback failed")
