"""What the demo prints: one short line per step, the checks it makes, and
the PASS/FAIL line at the end."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Report:
    def __init__(self, out: TextIO = sys.stdout):
        self.out = out
        self.started = time.monotonic()
        self.passed = 0
        self.failed: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, line: str) -> None:
        print(f"[{self.elapsed():5.1f}s] {line}", file=self.out, flush=True)

    def section(self, title: str) -> None:
        print(f"\n== {title}", file=self.out, flush=True)

    def check(self, ok: bool, line: str, why: str = "") -> bool:
        """A claim the demo makes: printed with ok, or FAIL and the reason."""
        if ok:
            self.passed += 1
            self.say(f"ok    {line}")
        else:
            self.failed.append(line)
            self.say(f"FAIL  {line}" + (f" ({why})" if why else ""))
        return ok

    def error(self, step: str, exc: BaseException) -> None:
        self.failed.append(f"{step}: {exc}")
        self.say(f"FAIL  {step} stopped: {type(exc).__name__}: {exc}")

    def summary(self, log_hint: str = "") -> int:
        """Prints the last line; returns the exit status (0 = every check passed)."""
        took = f"in {self.elapsed():.0f}s"
        if self.failed:
            print(f"\nFAIL: {len(self.failed)} of {self.passed + len(self.failed)} checks failed "
                  f"{took}: {'; '.join(self.failed)}{log_hint}", file=self.out, flush=True)
            return 1
        print(f"\nPASS: all {self.passed} checks passed {took}", file=self.out, flush=True)
        return 0
