"""Named crash points for fault tests.

`VMHOST_FAILPOINT=<name>` (or `<name>:<n>`, dying on the n-th hit) in the
agent's environment makes it die with SIGKILL, abruptly, exactly where
`hit(<name>)` is called: no clean-up, no flush, like a power cut of the
agent. `<name>:<n>:stop` freezes it there instead (SIGSTOP to itself: it
holds whatever it holds, sanlock leases included, until a SIGCONT), to look
at the world at that point. Unset (production), `hit` is a function that
returns at once.

Every point is listed in POINTS; a test checks that each is placed in the
code, so the crash matrix always covers all of them.
"""
from __future__ import annotations

import os
import signal
import threading

ENV = "VMHOST_FAILPOINT"

# The merge flow: before and after every persisted state change and every
# side effect (libvirt calls, storage metadata writes). The crash matrix runs
# each of these x {internal, active}.
MERGE_POINTS: tuple[str, ...] = (
    "merge.intent.written",
    "merge.save.STARTING.before", "merge.save.STARTING.after",
    "merge.blockcommit.before", "merge.blockcommit.after",
    "merge.save.COMMIT.before", "merge.save.COMMIT.after",
    "merge.save.READY.before", "merge.save.READY.after",
    "merge.save.PIVOT.before", "merge.save.PIVOT.after",
    "merge.pivot.paused", "merge.pivot.before", "merge.pivot.after",
    "merge.save.CLEANUP.before", "merge.save.CLEANUP.after",
    "merge.cleanup.vm_synced",
    "merge.cleanup.storage_sync.before", "merge.cleanup.storage_sync.after",
    "merge.cleanup.resumed",
    "merge.cleanup.finish_merge.before", "merge.cleanup.finish_merge.after",
    "merge.finish.before", "merge.finish.after",
    "storage.metadata.temp_written",
)
# Edges that need their own scenario: a failed pivot, the VM going down
# mid-merge (its storage work becomes an image repair), a snapshot.
EDGE_POINTS: tuple[str, ...] = (
    "merge.pivot_failed.resumed",
    "merge.down.repair_queued", "repair.queued", "repair.done.before_forget",
    "vm.snapshot.before", "vm.snapshot.after",
    "storage.delete.files_removed",
)
# The cold merge (vmhost.storage.coldmerge): each phase's side effect, before
# (the phase is persisted) and after (the next one is not yet); `running`
# dies on qemu-img's first progress report, mid-commit.
COLD_POINTS: tuple[str, ...] = (
    "coldmerge.prepare.before", "coldmerge.prepare.after",
    "coldmerge.commit.before", "coldmerge.commit.running", "coldmerge.commit.after",
    "coldmerge.rebase.before", "coldmerge.rebase.after",
    "coldmerge.finalize.before", "coldmerge.finalize.synced", "coldmerge.finalize.marked",
    "coldmerge.finalize.after",
)
POINTS: tuple[str, ...] = MERGE_POINTS + EDGE_POINTS + COLD_POINTS


def _parse(spec: str) -> tuple[str, int, signal.Signals] | None:
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    count, _, action = rest.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown failpoint {name!r}")
    if action not in ("", "stop"):
        raise ValueError(f"{ENV}={spec!r}: unknown action {action!r} (only 'stop')")
    return name, int(count or 1), signal.SIGSTOP if action else signal.SIGKILL


_armed = _parse(os.environ.get(ENV, ""))
_hits = 0
_lock = threading.Lock()


def _noop(name: str) -> None:
    return None


def _maybe_die(name: str) -> None:
    global _hits
    if _armed is None or name != _armed[0]:
        return
    with _lock:
        _hits += 1
        if _hits == _armed[1] or (_hits > _armed[1] and _armed[2] is signal.SIGKILL):
            os.kill(os.getpid(), _armed[2])


hit = _maybe_die if _armed else _noop


# Injected errors: `VMHOST_INJECT_ERROR=<name>[:<n>]` makes the first n calls
# of `error(<name>)` raise InjectedError, standing in for a libvirt call that
# fails (a pivot refused) where real QEMU cannot be made to fail on demand.
INJECT_ENV = "VMHOST_INJECT_ERROR"
ERROR_POINTS: tuple[str, ...] = ("merge.pivot",)


class InjectedError(Exception):
    pass


def _parse_inject(spec: str) -> list:
    if not spec:
        return []
    name, _, count = spec.partition(":")
    if name not in ERROR_POINTS:
        raise ValueError(f"{INJECT_ENV}={spec!r}: unknown error point {name!r}")
    return [name, int(count or 1)]


_inject = _parse_inject(os.environ.get(INJECT_ENV, ""))


def _maybe_raise(name: str) -> None:
    with _lock:
        if not _inject or name != _inject[0] or _inject[1] <= 0:
            return
        _inject[1] -= 1
    raise InjectedError(f"injected error at {name}")


error = _maybe_raise if _inject else _noop
