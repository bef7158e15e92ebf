"""Image repairs: written ahead, started when the VM is gone, kept across
restarts, run when the domain is VALID, dropped when handed over."""
from __future__ import annotations

import json
import uuid

from vmhost import errors
from vmhost.scheduler import DONE, Blocked, Retry
from vmhost.storage.repairs import ImageRepair, ImageRepairs

U = lambda: str(uuid.uuid4())  # noqa: E731


class Sched:
    def __init__(self):
        self.items = {}

    def submit(self, key, description, fn, topics=(), delay=0.0):
        self.items[key] = fn


class Storage:
    def __init__(self):
        self.valid, self.calls, self.error = True, [], None

    def domain_valid(self, sd):
        return self.valid

    def repair_after_merge(self, *args):
        self.calls.append(args)
        if self.error:
            raise self.error
        return ["a"]

    def repair_chain_sync(self, *args):
        return self.repair_after_merge("sync", *args)


def repair() -> ImageRepair:
    return ImageRepair(key=U(), vm_id=U(), domain=U(), image=U(), walk_from=U(), base=U(),
                       merged=[U()], capacity=1)


def test_intent_survives_a_restart_and_runs_when_the_vm_is_gone(tmp_path):
    storage, sched = Storage(), Sched()
    r = repair()
    ImageRepairs(str(tmp_path), storage, sched).intend(r)
    again = ImageRepairs(str(tmp_path), storage, Sched())      # an agent restart
    sched2 = again._scheduler
    again.resume(owned=set(), running_vms=set())
    storage.valid = False
    assert isinstance(sched2.items[f"repair/{r.key}"](), Blocked)
    storage.valid, storage.error = True, OSError("EIO")
    assert isinstance(sched2.items[f"repair/{r.key}"](), Retry)
    storage.error = None
    assert sched2.items[f"repair/{r.key}"]() is DONE
    assert storage.calls[-1] == (r.domain, r.image, r.walk_from, r.base, r.merged, r.capacity)
    assert not list((tmp_path / "repairs").glob("*.json"))


def test_owned_or_running_vm_intents_are_not_run(tmp_path):
    storage, sched = Storage(), Sched()
    repairs = ImageRepairs(str(tmp_path), storage, sched)
    owned, finished = repair(), repair()
    repairs.intend(owned)
    repairs.intend(finished)
    repairs.resume(owned={owned.key}, running_vms={finished.vm_id})
    assert sched.items == {}
    assert repairs.has(owned.key) and not repairs.has(finished.key)


def test_handed_over_or_gone_images_end_the_repair(tmp_path):
    storage, sched = Storage(), Sched()
    repairs = ImageRepairs(str(tmp_path), storage, sched)
    for error in (errors.VolumeIsBusy("used"), errors.ImageFileNotFound("gone")):
        r = repair()
        repairs.intend(r)
        repairs.start(r.key, "VM down")
        storage.error = error
        assert sched.items[f"repair/{r.key}"]() is DONE
        assert not repairs.has(r.key)


def test_an_unreadable_intent_never_stops_the_agent(tmp_path):
    (tmp_path / "repairs").mkdir()
    (tmp_path / "repairs" / f"{U()}.json").write_text("{not json")
    r = repair()
    (tmp_path / "repairs" / f"{r.key}.json").write_text(
        '{"version": 1, "key": "%s", "vm_id": "../x"}' % r.key)
    repairs = ImageRepairs(str(tmp_path), Storage(), Sched())
    assert repairs.pending() == [] and not repairs.has(r.key)


def test_a_chain_sync_repair_round_trips_and_runs_as_a_sync(tmp_path):
    storage, sched = Storage(), Sched()
    chain = [U(), U()]
    r = ImageRepair.chain_sync(U(), U(), U(), U(), walk_from=U(), chain=chain)
    ImageRepairs(str(tmp_path), storage, Sched()).intend(r)
    on_disk = json.loads((tmp_path / "repairs" / f"{r.key}.json").read_text())
    # Version 2: an older agent (version 1 only) leaves it alone rather than
    # taking it for a merge's repair.
    assert on_disk["version"] == 2 and on_disk["kind"] == "sync"
    again = ImageRepairs(str(tmp_path), storage, sched)
    again.resume(owned=set(), running_vms=set())
    assert sched.items[f"repair/{r.key}"]() is DONE
    assert storage.calls[-1] == ("sync", r.domain, r.image, r.walk_from, chain[-1])


def test_a_sync_the_metadata_no_longer_leads_to_is_dropped_not_retried(tmp_path):
    storage, sched = Storage(), Sched()
    repairs = ImageRepairs(str(tmp_path), storage, sched)
    r = ImageRepair.chain_sync(U(), U(), U(), U(), walk_from=U(), chain=[U()])
    repairs.intend(r)
    repairs.start(r.key, "VM down")
    storage.error = errors.InvalidParameter("live chain is not part of the storage chain")
    assert sched.items[f"repair/{r.key}"]() is DONE
    assert not repairs.has(r.key)


def test_a_repair_of_an_unknown_kind_is_left_alone(tmp_path):
    r = repair()
    (tmp_path / "repairs").mkdir()
    (tmp_path / "repairs" / f"{r.key}.json").write_text(
        json.dumps({**r.to_dict(), "version": 2, "kind": "defrag"}))
    repairs = ImageRepairs(str(tmp_path), Storage(), Sched())
    assert not repairs.has(r.key)
