"""The merge state machine against a fake libvirt domain and fake storage:
the seams (DomainAdapter, MergeStorage) let us inject pivot failures, storage
outages and vanished jobs, and check the write-ahead order of every step.
Every behaviour here also has an end-to-end test on real libvirt."""
from __future__ import annotations

import uuid

import libvirt
import pytest

from vmhost import errors
from vmhost.refs import VolumeRef
from vmhost.scheduler import DONE, Blocked, Retry, Wait
from vmhost.virt.merge import MergeConfig, Merger, MergeJob, State
from vmhost.virt.vm import Vm
from vmhost.virt.vmdef import Drive, VmDefinition

U = lambda: str(uuid.uuid4())  # noqa: E731
SD, IMG = U(), U()


class FakeDomain:
    """Just enough of virDomain: a chain, one block job, a mirror flag."""

    def __init__(self, log: list, chain: list[str]):
        self.log = log
        self.chain = list(chain)          # base first
        self.job: dict | None = None      # {"base", "top", "active", "ready", "cur", "end"}
        self.pivot_failures = 0
        self.commit_error: str | None = None

    def _path(self, vol):
        return f"/sd/{SD}/images/{IMG}/{vol}"

    def XMLDesc(self, flags=0):
        nodes = list(reversed(self.chain))   # top first, indexes as libvirt numbers them
        inner = ""
        for i, vol in reversed(list(enumerate(nodes[1:], start=2))):
            inner = (f"<backingStore type='file' index='{i}'><format type='qcow2'/>"
                     f"<source file='{self._path(vol)}'/>{inner}</backingStore>")
        mirror = ""
        if self.job and self.job["active"]:
            ready = " ready='yes'" if self.job["ready"] else ""
            mirror = f"<mirror type='file' job='active-commit'{ready}/>"
        return (f"<domain><devices><disk type='file' device='disk'><driver type='qcow2'/>"
                f"<source file='{self._path(nodes[0])}' index='1'/>{inner}{mirror}"
                f"<target dev='vda'/></disk></devices></domain>")

    def _vol(self, ref: str) -> str:
        index = int(ref[ref.index("[") + 1:-1])
        return list(reversed(self.chain))[index - 1]

    def blockCommit(self, disk, base, top, bandwidth=0, flags=0):
        self.log.append(("blockCommit", base, top))
        if self.commit_error:
            raise libvirt.libvirtError(self.commit_error)
        active = bool(flags & libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
        assert flags & libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
        self.job = {"base": self._vol(base), "top": self._vol(top), "active": active,
                    "ready": False, "cur": 0, "end": 100}

    def blockJobInfo(self, disk, flags=0):
        if not self.job:
            return {}
        return {"type": 4 if self.job["active"] else 3, "cur": self.job["cur"],
                "end": self.job["end"], "bandwidth": 0}

    def blockJobAbort(self, disk, flags=0):
        self.log.append(("blockJobAbort", flags))
        if not self.job:
            raise libvirt.libvirtError("no active block job")
        if flags & libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT:
            if self.pivot_failures:
                self.pivot_failures -= 1
                raise libvirt.libvirtError("block copy still active: not ready for pivot")
            self.finish()
        else:
            self.job = None

    def finish(self):
        """QEMU completes the job: the chain loses base+1..top."""
        j, self.job = self.job, None
        b, t = self.chain.index(j["base"]), self.chain.index(j["top"])
        self.chain = self.chain[:b + 1] + self.chain[t + 1:]

    def progress(self, cur, ready=False):
        self.job["cur"] = cur
        self.job["ready"] = ready


class FakeStorage:
    def __init__(self, log: list, chain: list[str]):
        self.log = log
        self.valid = True
        self.fail = False
        self.capacity = {v: 1 << 20 for v in chain}
        self.shared: set[str] = set()

    def volume_info(self, sd, img, vol):
        return {"voltype": "SHARED" if vol in self.shared else "LEAF",
                "capacity": str(self.capacity[vol])}

    def domain_valid(self, sd):
        return self.valid

    def sync_volume_chain(self, sd, img, leaf, actual):
        self.log.append(("sync", leaf, list(actual)))
        if self.fail:
            raise OSError("storage unreachable")
        return "ok"

    def finish_merge(self, sd, img, base, merged, capacity, base_is_leaf):
        self.log.append(("finish", base, list(merged), capacity, base_is_leaf))


class FakeScheduler:
    def __init__(self):
        self.items = {}

    def submit(self, key, description, fn, topics=(), delay=0.0):
        self.items[key] = fn

    def notify(self, topic):
        pass

    def wait_idle(self, key, timeout):
        return True


@pytest.fixture
def world():
    log: list = []
    chain = [U() for _ in range(4)]
    dom = FakeDomain(log, chain)
    storage = FakeStorage(log, chain)
    vm = Vm(VmDefinition(vm_id=U(), name="t", mem_mib=64, drives=[Drive(
        name="vda", domain=SD, image=IMG,
        chain=[VolumeRef(SD, IMG, v, dom._path(v)) for v in chain])]))
    persisted: list[dict] = []

    def persist(v):
        log.append(("persist", {k: r["state"] for k, r in v.definition.jobs.items()}))
        persisted.append(dict(v.definition.jobs))
    merger = Merger(storage, FakeScheduler(), lambda vm_id: vm if vm_id == vm.id else None,
                    domain_of=lambda v: dom, persist=persist,
                    config=MergeConfig(poll_interval=0.01, pivot_retries=3, pivot_timeout=0.2))

    class W:
        pass
    w = W()
    w.log, w.chain, w.dom, w.storage, w.vm, w.merger, w.persisted = \
        log, chain, dom, storage, vm, merger, persisted
    w.spec = {"domainID": SD, "imageID": IMG, "volumeID": chain[-1]}
    w.state = lambda job_id: vm.definition.jobs[job_id]["state"] if job_id in vm.definition.jobs else None
    w.step = lambda job_id: merger.advance(vm.id, job_id)
    return w


def test_internal_merge_write_ahead_and_cleanup(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[0], top=c[1])
    # STARTING was persisted before blockCommit, COMMIT after it.
    kinds = [e[0] if e[0] != "persist" else ("persist", tuple(e[1].values())) for e in world.log]
    assert kinds == [("persist", ("STARTING",)), "blockCommit", ("persist", ("COMMIT",))]
    assert world.log[1] == ("blockCommit", "vda[4]", "vda[3]")
    # Visible in the very next stats, with progress from libvirt.
    world.dom.progress(40)
    assert isinstance(world.step(job), Wait)
    stats = world.merger.job_stats(world.vm)[job]
    assert (stats["cur"], stats["end"], stats["state"]) == ("40", "100", "commit")
    world.dom.finish()
    assert world.step(job) is DONE
    assert job not in world.vm.definition.jobs
    assert world.vm.definition.drives[0].volume_ids() == [c[0], c[2], c[3]]
    assert ("sync", c[3], [c[0], c[2], c[3]]) in world.log
    assert ("finish", c[0], [c[1]], 1 << 20, False) in world.log
    assert world.merger.history.list()[-1]["state"] == "DONE"


def test_active_merge_pivots_only_when_xml_says_ready(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3])
    world.dom.progress(100, ready=False)           # cur == end is not ready
    assert isinstance(world.step(job), Wait)
    assert world.state(job) == "COMMIT"
    world.dom.progress(100, ready=True)
    assert world.step(job) is DONE
    # Volumes above the base marked ILLEGAL (sync to the chain as it will be
    # after the pivot) strictly before the pivot.
    sync_at = world.log.index(("sync", c[3], [c[0], c[1]]))
    pivot_at = world.log.index(("blockJobAbort", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT))
    assert sync_at < pivot_at
    states = [tuple(e[1].values()) for e in world.log if e[0] == "persist"]
    assert states[1:5] == [("COMMIT",), ("READY",), ("PIVOT",), ("CLEANUP",)]
    assert world.vm.definition.drives[0].volume_ids() == [c[0], c[1]]
    assert ("finish", c[1], [c[2], c[3]], 1 << 20, True) in world.log


def test_no_pivot_while_storage_is_down(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[2], top=c[3])
    world.dom.progress(100, ready=True)
    world.storage.valid = False
    out = world.step(job)
    assert isinstance(out, Blocked) and SD in out.requirement.description
    assert world.state(job) == "READY"
    world.storage.valid, world.storage.fail = True, True
    assert isinstance(world.step(job), Retry)
    assert world.state(job) == "READY"
    assert not any(e[0] == "blockJobAbort" for e in world.log)
    world.storage.fail = False
    assert world.step(job) is DONE


def test_pivot_failure_marks_leaf_legal_and_retries(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[2], top=c[3])
    world.dom.progress(100, ready=True)
    world.dom.pivot_failures = 1
    out = world.step(job)
    assert isinstance(out, Retry) and "pivot failed" in out.reason
    assert world.state(job) == "READY"
    # ILLEGAL before the pivot, LEGAL again (full chain) after it failed.
    syncs = [e for e in world.log if e[0] == "sync"]
    assert syncs == [("sync", c[3], c[:3]), ("sync", c[3], c)]
    assert world.step(job) is DONE
    assert world.vm.definition.drives[0].volume_ids() == c[:3]


def test_pivot_retries_are_bounded_then_aborted_and_failed(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[2], top=c[3])
    world.dom.progress(100, ready=True)
    world.dom.pivot_failures = 99
    for _ in range(3):
        assert isinstance(world.step(job), Retry)
    assert world.state(job) == "ABORTING"
    assert world.step(job) is DONE
    rec = world.vm.definition.jobs[job]
    assert rec["state"] == "FAILED" and "pivot failed 3 times" in rec["error"]
    assert world.dom.job is None and world.dom.chain == c
    assert world.log[-2][0] == "sync" and world.log[-2][2] == c   # leaf LEGAL again
    assert world.merger.job_stats(world.vm)[job]["error"] == rec["error"]
    # A new merge on the drive acknowledges the FAILED job.
    job2 = world.merger.merge(world.vm, world.spec, base=c[0], top=c[1])
    assert job not in world.vm.definition.jobs and job2 in world.vm.definition.jobs


def test_external_cancel_is_failed_with_reason_and_chain_intact(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[0], top=c[2])
    world.dom.job = None                       # `virsh blockjob --abort` behind our back
    world.merger.on_block_job_event(world.vm.id, "vda", 3, libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED)
    assert world.step(job) is DONE
    rec = world.vm.definition.jobs[job]
    assert rec["state"] == "FAILED" and "cancelled outside vmhost" in rec["error"]
    assert world.vm.definition.drives[0].volume_ids() == c
    assert not any(e[0] == "finish" for e in world.log)


def test_libvirt_job_failure_is_reported(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[0], top=c[1])
    world.dom.job = None
    world.merger.on_block_job_event(world.vm.id, "vda", 3, libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED)
    world.step(job)
    assert "FAILED" in world.vm.definition.jobs[job]["error"]
    world.merger.dismiss(world.vm, job)
    assert world.merger.job_stats(world.vm) == {}


def test_abort_leaves_chain_and_ends_aborted(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3])
    world.dom.progress(100, ready=True)
    world.step(job)
    assert world.state(job) is None  # (it pivoted: the fake finishes instantly)
    job = world.merger.merge(world.vm, {**world.spec, "volumeID": c[1]}, base=c[0], top=c[1])
    world.merger.abort(world.vm, job)
    assert world.state(job) == "ABORTING"
    assert world.step(job) is DONE
    assert world.state(job) is None
    assert world.merger.history.list()[-1]["state"] == "ABORTED"
    assert world.dom.chain == [c[0], c[1]]


def test_recovery_in_starting_commits_again(world):
    """Crash between persisting STARTING and calling blockCommit."""
    c = world.chain
    rec = MergeJob(id=U(), drive="vda", domain=SD, image=IMG, leaf=c[3], base=c[0], top=c[1],
                   chain=c, bandwidth=0).to_record()
    world.vm.definition.jobs[rec["id"]] = rec
    assert isinstance(world.step(rec["id"]), Wait)
    assert world.state(rec["id"]) == "COMMIT"
    assert world.dom.job["top"] == c[1]


def test_recovery_in_pivot_when_pivot_already_happened(world):
    c = world.chain
    rec = MergeJob(id=U(), drive="vda", domain=SD, image=IMG, leaf=c[3], base=c[2], top=c[3],
                   chain=c, bandwidth=0, state=State.PIVOT, top_capacity=1 << 20).to_record()
    world.vm.definition.jobs[rec["id"]] = rec
    world.dom.chain = c[:3]                    # QEMU pivoted before the agent died
    assert world.step(rec["id"]) is DONE
    assert world.vm.definition.drives[0].volume_ids() == c[:3]
    assert ("finish", c[2], [c[3]], 1 << 20, True) in world.log


@pytest.mark.parametrize("case", ["not-ancestor", "unknown-top", "busy", "shared", "leaf-stale",
                                  "commit-refused"])
def test_failed_validation_leaves_no_trace(world, case):
    c = world.chain
    args = dict(base=c[0], top=c[1])
    expected = errors.MergeFailed
    if case == "not-ancestor":
        args = dict(base=c[2], top=c[1])
    elif case == "unknown-top":
        args, expected = dict(base=c[0], top=U()), errors.ImageFileNotFound
    elif case == "busy":
        world.merger.merge(world.vm, world.spec, base=c[2], top=c[3])
    elif case == "shared":
        world.storage.shared.add(c[0])
    elif case == "leaf-stale":
        world.spec["volumeID"], expected = c[2], errors.ImageFileNotFound
    elif case == "commit-refused":
        world.dom.commit_error = "internal error"
    before = dict(world.vm.definition.jobs)
    persisted = len(world.persisted)
    with pytest.raises(expected):
        world.merger.merge(world.vm, world.spec, **args)
    assert world.vm.definition.jobs == before
    if case != "commit-refused":
        assert len(world.persisted) == persisted
    else:  # the STARTING record was written and then removed again
        assert world.persisted[-1] == before


def test_record_versions():
    job = MergeJob(id=U(), drive="vda", domain=SD, image=IMG, leaf="l", base="b", top="l",
                   chain=["b", "l"], bandwidth=5, state=State.READY, pivot_attempts=2)
    rec = job.to_record()
    assert rec["version"] == 2
    assert MergeJob.from_record(rec) == job
    # Version 1: VDSM's livemerge Job.to_dict() layout.
    v1 = {"id": job.id, "drive": "vda", "disk": {"poolID": U(), "domainID": SD, "imageID": IMG,
          "volumeID": "l"}, "base": "b", "top": "l", "bandwidth": 5, "state": "CLEANUP",
          "extend": None, "pivot": True}
    old = MergeJob.from_record(v1)
    assert (old.state, old.active, old.leaf, old.chain) == (State.READY, True, "l", ["b", "l"])
    with pytest.raises(ValueError, match="version"):
        MergeJob.from_record({**rec, "version": 99})


def test_job_finished_before_any_stats_is_shown_once(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[0], top=c[1])
    world.dom.finish()
    assert world.step(job) is DONE
    assert world.merger.job_stats(world.vm)[job]["state"] == "done"
    assert world.merger.job_stats(world.vm) == {}
    # A job that was already seen leaves vmJobs for good when it ends.
    job = world.merger.merge(world.vm, {**world.spec}, base=c[0], top=c[2])
    assert world.merger.job_stats(world.vm)[job]["state"] == "commit"
    world.dom.finish()
    world.step(job)
    assert world.merger.job_stats(world.vm) == {}
