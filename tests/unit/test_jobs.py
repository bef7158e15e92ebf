"""The jobs layer (vmhost.jobs): one record type, the two stores, the reports."""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import uuid

import pytest

from vmhost import errors
from vmhost.jobs.record import Record
from vmhost.jobs.report import HostJobs, VmJobsReport, record_history, state_counts
from vmhost.jobs.store import DomainJobStore, VmJobStore

U = lambda: str(uuid.uuid4())  # noqa: E731


class Phase(str, enum.Enum):
    ONE = "ONE"
    TWO = "TWO"


def _v1_to_v2(d: dict) -> dict:
    return {**d, "target": d["old_target"], "phase": {"1": "ONE", "2": "TWO"}[d["step"]]}


@dataclasses.dataclass
class Toy(Record):
    KIND = "toy"
    VERSION = 2
    STATES = Phase
    STATE_FIELD = "phase"
    OWNER_FIELD = "host"
    UUID_FIELDS = ("id", "target")
    UPGRADES = {1: _v1_to_v2}

    id: str
    target: str
    host: str = ""
    phase: Phase = Phase.ONE

    def check(self) -> None:
        if self.target == self.id:
            raise ValueError("a toy cannot target itself")


def test_record_round_trip_and_accessors():
    job = Toy(U(), U(), host="h1", phase=Phase.TWO)
    rec = job.to_record()
    assert rec["version"] == 2 and rec["kind"] == "toy" and rec["phase"] == "TWO"
    assert json.loads(json.dumps(rec)) == rec
    back = Toy.from_record(rec)
    assert back == job and back.phase is Phase.TWO
    assert (back.job_state, back.owner) == (Phase.TWO, "h1")


def test_record_upgrades_an_older_version():
    job_id, target = U(), U()
    old = Toy.from_record({"version": 1, "kind": "toy", "id": job_id, "old_target": target,
                           "step": "2"})
    assert (old.target, old.phase) == (target, Phase.TWO)
    assert old.to_record()["version"] == 2     # written back in the current version


@pytest.mark.parametrize("rec, error, match", [
    ({"version": 3}, ValueError, "version 3"),
    ({"version": None}, ValueError, "version None"),
    ({"kind": "merge"}, ValueError, "kind 'merge'"),
    ({"target": "../etc"}, errors.InvalidParameter, "target"),
    ({"phase": "THREE"}, ValueError, "THREE"),
    ({"unknown_field": 1, "id": None}, errors.InvalidParameter, "id"),
])
def test_record_refuses_what_it_cannot_read(rec, error, match):
    good = Toy(U(), U()).to_record()
    with pytest.raises(error, match=match):
        Toy.from_record({**good, **rec})


def test_record_kind_checks_and_unversioned_records():
    job_id = U()
    with pytest.raises(ValueError, match="itself"):
        Toy.from_record(Toy(job_id, job_id).to_record())
    rec = Toy(U(), U()).to_record()
    del rec["version"]
    with pytest.raises(ValueError, match="version None"):   # UNVERSIONED is None here
        Toy.from_record(rec)
    with pytest.raises(ValueError, match="object"):
        Toy.from_record(["not", "a", "record"])


class FakeVm:
    def __init__(self):
        self.definition = type("D", (), {"jobs": {}})()
        self.bad_jobs: dict = {}


def test_vm_store_is_write_ahead_and_keeps_memory_on_a_failed_persist():
    vm, persisted, fail = FakeVm(), [], {"now": False}

    def persist(v):
        if fail["now"]:
            raise OSError("libvirt said no")
        persisted.append(json.dumps(v.definition.jobs, sort_keys=True))
    store = VmJobStore(Toy, persist)
    job = Toy(U(), U())
    store.save(vm, job)
    assert json.loads(persisted[-1]) == {job.id: job.to_record()}
    fail["now"] = True
    job.phase = Phase.TWO
    with pytest.raises(OSError):
        store.save(vm, job)
    assert store.get(vm, job.id).phase is Phase.ONE     # memory = what libvirt has
    with pytest.raises(OSError):
        store.remove(vm, job.id)
    assert job.id in vm.definition.jobs
    fail["now"] = False
    store.remove(vm, job.id)
    assert store.get(vm, job.id) is None and json.loads(persisted[-1]) == {}


def test_vm_store_reads_skip_unreadable_records():
    vm = FakeVm()
    store = VmJobStore(Toy, lambda v: None)
    good, bad = Toy(U(), U()), U()
    vm.definition.jobs = {good.id: good.to_record(), bad: {"version": 99, "id": bad},
                          "junk": "not a dict"}
    vm.bad_jobs = {bad: "version 99", "junk": "not an object"}
    assert store.readable(vm) == [good]
    assert [r["id"] for r in store.records(vm)] == [good.id, bad]


class FakeDomain:
    def __init__(self, root):
        self.root, self.uuid = root, U()

    def jobs_dir(self):
        return os.path.join(self.root, "jobs")


def test_domain_store_round_trip_and_unreadable_files(tmp_path):
    dom = FakeDomain(str(tmp_path))
    store = DomainJobStore(Toy)
    assert store.readable(dom) == []              # no jobs dir yet
    a, b = Toy(U(), U()), Toy(U(), U(), phase=Phase.TWO)
    store.save(dom, a)
    store.save(dom, b)
    with open(os.path.join(dom.jobs_dir(), f"{U()}.json"), "w") as f:
        f.write("{not json")
    with open(os.path.join(dom.jobs_dir(), "tmpXYZ.json"), "w") as f:
        f.write("{}")                              # not a job id: not a record
    assert sorted(store.readable(dom), key=lambda j: j.id) == sorted([a, b], key=lambda j: j.id)
    store.remove(dom, a.id)
    assert store.readable(dom) == [b]
    with pytest.raises(errors.InvalidParameter):
        store.path(dom, "../escape")


def test_vm_jobs_report_shows_a_job_that_ended_unseen_exactly_once():
    ttl = {"s": 0.0}
    report = VmJobsReport(ttl=lambda: ttl["s"])
    live: dict[str, dict] = {}
    entries = lambda: report.entries("vm", lambda: list(live.values()),  # noqa: E731
                                     lambda rec: {"state": rec["state"]})
    report.started("j1")
    live["j1"] = {"id": "j1", "state": "commit"}
    left, _ = report.finish("vm", "j1", {"state": "done"}, leave=lambda: live.pop("j1"))
    assert left == {"id": "j1", "state": "commit"}
    assert entries() == {"j1": {"state": "done"}}      # ended unseen: shown once
    assert entries() == {}
    # Seen while live: it leaves at once when it ends.
    report.started("j2")
    live["j2"] = {"id": "j2", "state": "commit"}
    assert entries() == {"j2": {"state": "commit"}}
    report.finish("vm", "j2", {"state": "done"}, leave=lambda: live.pop("j2"))
    assert entries() == {}


def test_vm_jobs_report_undo_and_forget():
    report = VmJobsReport(ttl=lambda: 3600.0)
    live = {"j": {"id": "j", "state": "commit"}}
    report.started("j")
    rec, undo = report.finish("vm", "j", {"state": "done"}, leave=lambda: live.pop("j"))
    undo(lambda r: live.__setitem__("j", r))         # the persist failed: as before
    assert live == {"j": rec} and report.unreported() == {"j"}
    report.finish("vm", "j", {"state": "done"}, leave=lambda: live.pop("j"))
    get = lambda: report.entries("vm", lambda: [], lambda r: r)  # noqa: E731
    assert get() == get() == {"j": {"state": "done"}}  # within the ttl: still shown
    report.forget("vm")
    assert get() == {}
    report.started("k")
    report.unstarted("k")
    assert report.unreported() == set()


def test_host_jobs_table():
    jobs = HostJobs("storage", 52, keep_seconds=3600, keep_max=2)
    jobs.add("a", "job a")
    with pytest.raises(errors.JobExists):
        jobs.add("a", "again")
    with pytest.raises(errors.JobInWrongState):
        jobs.delete("a")                       # still running
    jobs.running("a")
    jobs.progress("a", 140.0)
    assert jobs.infos()["a"] == {"id": "a", "status": "running", "progress": 100,
                                 "description": "job a", "job_type": "storage"}
    jobs.end("a", "failed", "no space")
    assert jobs.infos(job_ids=["a"])["a"]["error"] == {"code": 52, "message": "no space"}
    assert jobs.infos(job_type="virt") == {}
    for name in "bc":
        jobs.add(name, name)
        jobs.end(name, "done")
    assert sorted(jobs.infos()) == ["b", "c"]          # keep_max: the oldest ended went
    assert jobs.infos()["b"]["progress"] == 100
    jobs.delete("b")
    with pytest.raises(errors.NoSuchJob):
        jobs.delete("b")


def test_history_and_state_counts():
    class Broken:
        def append(self, entry):
            raise OSError("disk full")
    record_history(Broken(), {"id": "x"})          # logged, never raised
    assert state_counts([{"state": "COMMIT"}, {"state": "COMMIT"}, {"state": "READY"},
                         {"nostate": 1}, "junk"]) == {"COMMIT": 2, "READY": 1}


def test_runner_chains_steps_runs_io_outside_and_rechecks():
    from vmhost.jobs.runner import Outside, run_steps
    from vmhost.scheduler import DONE, Retry, Wait
    state = {"s": "A", "locked": False}
    seen = []

    def io():
        assert not state["locked"], "I/O ran under the lock"
        return 42

    def decide():
        state["locked"] = True
        try:
            before = state["s"]
            if before == "A":
                state["s"] = "B"                     # a transition: go on at once
                return before, None
            if before == "B":
                return before, Outside(io, lambda r: seen.append(r) or state.update(s="C"),
                                       expect="B", what="the I/O")
            return before, None                      # C: nothing changes -> poll
        finally:
            state["locked"] = False

    def reenter(work, result):
        if state["s"] != work.expect:
            return None
        return work.then(result)
    out = run_steps(decide, reenter, lambda: state["s"], "toy", poll=0.5, max_steps=10)
    assert isinstance(out, Wait) and out == Wait(0.5) and seen == [42] and state["s"] == "C"

    def failing():
        raise OSError("EIO")
    out = run_steps(lambda: ("X", Outside(failing, None, "X", "the write")), reenter,
                    lambda: "X", "toy", poll=1, max_steps=3)
    assert isinstance(out, Retry) and out.reason == "the write failed: EIO"
    assert run_steps(lambda: ("X", DONE), reenter, lambda: "X", "toy", 1, 3) is DONE
    with pytest.raises(TypeError, match="outside a lock"):   # a kind without a lock
        run_steps(lambda: ("X", Outside(io, None, "X", "io")), None, lambda: "X", "toy", 1, 3)


def test_the_kinds_keep_their_record_formats():
    """Records already in libvirt metadata and on domains stay what they were."""
    from vmhost.storage.coldmerge import ColdMergeJob
    from vmhost.virt.merge import MergeJob
    b, t = U(), U()
    merge = MergeJob(id=U(), drive="vda", domain=U(), image=U(), leaf=t, base=b, top=t,
                     chain=[b, t], bandwidth=0)
    rec = merge.to_record()
    assert "kind" not in rec and rec["version"] == 2 and rec["state"] == "STARTING"
    assert set(rec) == {f.name for f in dataclasses.fields(MergeJob)} | {"version"}
    cold = ColdMergeJob(id=U(), domain=U(), image=U(), base=b, top=t, child="", generation=3,
                        top_capacity=1, host="h")
    rec = cold.to_record()
    assert (rec["version"], rec["kind"], rec["phase"]) == (1, "coldmerge", "PREPARE")
    assert set(rec) == {f.name for f in dataclasses.fields(ColdMergeJob)} | {"version", "kind"}
    assert ColdMergeJob.from_record(rec) == cold and cold.owner == "h"
    with pytest.raises(ValueError, match="version"):
        ColdMergeJob.from_record({k: v for k, v in rec.items() if k != "version"})
