"""The bound on VMs paused for a pivot at once (vmhost/virt/pivotslots.py),
alone and inside the merge state machine (the fake domain of test_merge)."""
from __future__ import annotations

import pytest
from test_merge import world  # noqa: F401  (the fixture)

from vmhost.scheduler import DONE, Wait
from vmhost.virt.pivotslots import PivotSlots


def test_slots_bound_and_wake_the_oldest_waiter_first():
    slots, woken = PivotSlots(2), []
    assert slots.take("a", lambda: woken.append("a"))
    assert slots.take("a", lambda: woken.append("a"))          # again: still one slot
    assert slots.take("b", lambda: woken.append("b"))
    assert not slots.take("c", lambda: woken.append("c"))
    assert not slots.take("d", lambda: woken.append("d"))
    assert slots.holders() == {"a", "b"} and slots.waiting() == ["c", "d"]
    slots.release("a")
    assert woken == ["c"]                                     # one slot: one wake-up
    assert slots.take("c", lambda: None) and slots.waiting() == ["d"]
    assert not slots.take("e", lambda: woken.append("e"))     # full again
    slots.release("d")                                        # gave up its place: no wake-up
    slots.release("zzz")                                      # neither holder nor waiter
    assert woken == ["c"] and slots.waiting() == ["e"]
    slots.release("b")
    assert woken == ["c", "e"] and slots.holders() == {"c"}


def test_a_failing_wake_up_does_not_keep_the_slot():
    slots = PivotSlots(1)
    assert slots.take("a", lambda: None)
    assert not slots.take("b", lambda: 1 / 0)
    slots.release("a")                                        # logged, not raised
    assert slots.holders() == set()
    assert slots.take("c", lambda: None)


def test_at_least_one_slot():
    with pytest.raises(ValueError):
        PivotSlots(0)


def test_ready_job_waits_for_a_slot_with_the_guest_running(world):  # noqa: F811
    """A job READY while the slots are taken neither pauses its VM nor leaves
    READY; the release wakes it, and it gives the slot back once the VM runs."""
    c = world.chain
    notified = []
    world.scheduler.notify = notified.append
    world.merger.pivot_slots = slots = PivotSlots(1)
    assert slots.take("another-job", lambda: None)
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3])
    world.dom.progress(100, ready=True)
    assert isinstance(world.step(job), Wait)
    assert world.state(job) == "READY" and world.dom.running
    assert ("suspend",) not in world.log and slots.waiting() == [job]
    slots.release("another-job")
    assert notified == [("vm", world.vm.id)]
    assert world.step(job) is DONE
    assert [e for e in world.log if e[0] in ("suspend", "resume")] == [("suspend",), ("resume",)]
    assert slots.holders() == set() and slots.waiting() == []


def test_failed_pivot_gives_the_slot_back(world):  # noqa: F811
    c = world.chain
    world.merger.pivot_slots = slots = PivotSlots(1)
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3])
    world.dom.progress(100, ready=True)
    world.dom.pivot_failures = 1
    world.step(job)
    assert world.state(job) == "READY" and world.dom.running
    assert slots.holders() == set()


def test_the_setting_wants_at_least_one_slot():
    from vmhost import config
    assert config.from_dict({"pivot_slots": 3}).validate().pivot_slots == 3
    with pytest.raises(config.ConfigError, match="pivot_slots"):
        config.from_dict({"pivot_slots": 0}).validate()
