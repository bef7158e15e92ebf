"""The step loop every job kind runs in its scheduler work item: decide
under the owner's lock (the VM's), act outside it (storage I/O, which may
hang until its deadline), and re-check under the lock before anything is
persisted, since the job may have changed meanwhile (an abort, the VM going
down)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Union

from vmhost.scheduler import Outcome, Retry, Wait

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outside:
    """I/O a step needs, run without the lock; `then` runs under the lock
    again, once the job was checked to still be in state `expect`."""
    io: Callable[[], Any]
    then: Callable[..., Any]
    expect: Any
    what: str


# What a step returns: an outcome (the work item ends this run), an Outside
# (run it, then carry on), or None (go on with the job's new state at once).
Step = Union[Outcome, Outside, None]


def run_steps(decide: Callable[[], tuple[Any, Step]],
              reenter: Callable[[Outside, Any], Step] | None,
              state: Callable[[], Any], name: str, poll: float, max_steps: int) -> Outcome:
    """One run of a job's work item: `decide()` runs one step under the lock
    and returns (the state it started from, its result); each Outside's I/O
    runs here, without the lock, and `reenter(work, result)` re-checks under
    the lock and goes on (a kind whose steps never leave a lock passes None).
    Steps chain within the run until one returns an outcome or the state
    stops changing (then: poll again in `poll` s)."""
    for _ in range(max_steps):
        before, outcome = decide()
        while isinstance(outcome, Outside):
            if reenter is None:
                raise TypeError(f"{name}: a step returned I/O to run outside a lock it has not")
            outcome = act_outside(outcome, reenter, name)
        if outcome is not None:
            return outcome
        if state() is before:
            return Wait(poll)
    return Wait(poll)


def act_outside(work: Outside, reenter: Callable[[Outside, Any], Step], name: str) -> Step:
    """Run the I/O (no lock held); a failure is retried by the scheduler."""
    try:
        result = work.io()
    except Exception as e:
        log.warning("%s: %s failed: %s", name, work.what, e)
        return Retry(f"{work.what} failed: {e}")
    return reenter(work, result)
