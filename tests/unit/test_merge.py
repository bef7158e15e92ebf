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
        self.running = True

    def state(self, flags=0):
        return [libvirt.VIR_DOMAIN_RUNNING if self.running else libvirt.VIR_DOMAIN_PAUSED, 0]

    def suspend(self):
        self.log.append(("suspend",))
        self.running = False

    def resume(self):
        self.log.append(("resume",))
        self.running = True

    def blockJobSetSpeed(self, disk, bandwidth, flags=0):
        self.log.append(("speed", bandwidth))

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
        self.held = False
        self.refuse_lease = False

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

    # The image lease the agent holds while the VM is paused (logged when taken
    # and given back); `refuse_lease` stands for another host holding it.
    def hold_image(self, sd, img):
        if self.refuse_lease:
            raise errors.AcquireLockFailure(f"image {img}: held by another host")
        if not self.held:
            self.log.append(("hold",))
        self.held = True

    def release_image(self, sd, img):
        if self.held:
            self.log.append(("release",))
        self.held = False


class FakeRepairs:
    def __init__(self):
        self.intents, self.started = {}, {}

    def intend(self, repair):
        self.intents[repair.key] = repair

    def has(self, key):
        return key in self.intents

    def cancel(self, key):
        self.intents.pop(key, None)

    def start(self, key, reason):
        if key not in self.intents:
            return False
        self.started[key] = reason
        return True


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
    repairs = FakeRepairs()
    scheduler = FakeScheduler()
    merger = Merger(storage, scheduler, lambda vm_id: vm if vm_id == vm.id else None,
                    domain_of=lambda v: dom, persist=persist,
                    config=MergeConfig(poll_interval=0.01, pivot_budget=60, pivot_timeout=0.2,
                                       final_entry_ttl=0),
                    repairs=repairs)

    class W:
        pass
    w = W()
    w.log, w.chain, w.dom, w.storage, w.vm, w.merger, w.persisted = \
        log, chain, dom, storage, vm, merger, persisted
    w.repairs, w.scheduler = repairs, scheduler
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
    states = [tuple(e[1].values()) for e in world.log if e[0] == "persist"]
    assert states[1:5] == [("COMMIT",), ("READY",), ("PIVOT",), ("CLEANUP",)]
    assert world.vm.definition.drives[0].volume_ids() == [c[0], c[1]]
    assert ("finish", c[1], [c[2], c[3]], 1 << 20, True) in world.log
    assert world.dom.running


def test_finding4_marker_is_written_after_the_pivot_with_the_guest_paused(world):
    """The ILLEGAL marker means exactly "pivoted": the VM is paused for the
    pivot, the marker written after it, and only then the VM runs again."""
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3], bandwidth=5)
    world.dom.progress(100, ready=True)
    assert world.step(job) is DONE
    order = [e for e in world.log if e[0] in ("suspend", "blockJobAbort", "sync", "resume",
                                                "speed")]
    assert order == [("suspend",), ("speed", 0),
                     ("blockJobAbort", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT),
                     ("sync", c[3], [c[0], c[1]]), ("resume",)]
    # The record said "paused for the pivot" before the VM was paused.
    pivot_rec = next(p[job] for p in world.persisted if p.get(job, {}).get("state") == "PIVOT")
    assert pivot_rec["paused_for_pivot"] is True


def test_finding4_storage_down_after_pivot_keeps_the_vm_paused_until_marked(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[2], top=c[3])
    world.dom.progress(100, ready=True)
    world.storage.valid = False
    out = world.step(job)                         # no pause while the marker cannot be written
    assert isinstance(out, Blocked) and SD in out.requirement.description
    assert world.state(job) == "READY" and world.dom.running
    world.storage.valid, world.storage.fail = True, True
    assert isinstance(world.step(job), Retry)     # pivoted; the marker write failed
    assert world.state(job) == "CLEANUP" and not world.dom.running
    world.storage.fail = False
    assert world.step(job) is DONE
    assert world.dom.running
    assert world.vm.definition.drives[0].volume_ids() == c[:3]


def test_finding3_failed_pivot_touches_no_storage_and_resumes(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[2], top=c[3])
    world.dom.progress(100, ready=True)
    world.dom.pivot_failures = 1
    out = world.step(job)
    assert isinstance(out, Retry) and "pivot failed" in out.reason
    assert world.state(job) == "READY" and world.dom.running
    assert not any(e[0] == "sync" for e in world.log)   # the marker was never written
    rec = world.vm.definition.jobs[job]
    assert rec["paused_for_pivot"] is False and rec["pivot_attempts"] == 1
    assert world.step(job) is DONE
    assert world.vm.definition.drives[0].volume_ids() == c[:3]


def test_finding7_pivot_failures_retry_within_a_time_budget(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[2], top=c[3])
    world.dom.progress(100, ready=True)
    world.dom.pivot_failures = 99
    for _ in range(8):                               # far more than the old bound of 5
        assert isinstance(world.step(job), Retry)
        assert world.state(job) == "READY"
    world.merger.config.pivot_budget = 0             # the budget is spent
    assert isinstance(world.step(job), Retry)
    assert world.state(job) == "ABORTING"
    assert world.step(job) is DONE
    # finding 6: a FAILED job leaves vmJobs; its outcome is in the history.
    assert job not in world.vm.definition.jobs
    entry = world.merger.history.find(job)
    assert entry["state"] == "FAILED" and "pivot failed 9 times" in entry["error"]
    assert world.dom.job is None and world.dom.chain == c and world.dom.running
    assert not any(e[0] == "sync" and e[2] != c for e in world.log)   # never marked


def test_finding6_failed_job_leaves_vmjobs(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[0], top=c[2])
    assert world.merger.job_stats(world.vm)[job]["state"] == "commit"
    world.dom.job = None                       # `virsh blockjob --abort` behind our back
    world.merger.on_block_job_event(world.vm.id, "vda", 3, libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED)
    assert world.step(job) is DONE
    assert world.merger.job_stats(world.vm) == {}
    entry = world.merger.history.find(job)
    assert entry["state"] == "FAILED" and "cancelled outside vmhost" in entry["error"]
    assert world.vm.definition.drives[0].volume_ids() == c
    assert not any(e[0] == "finish" for e in world.log)
    world.merger.dismiss(world.vm, job)        # a no-op for a job already gone
    assert job not in world.repairs.intents    # nothing left to repair


def test_finding10_stale_event_is_not_the_reason_of_a_later_failure(world):
    c = world.chain
    world.merger.on_block_job_event(world.vm.id, "vda", 3, libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED)
    assert world.merger._last_event == {}      # no job on the drive: not kept
    job = world.merger.merge(world.vm, world.spec, base=c[0], top=c[1])
    world.merger.on_block_job_event(world.vm.id, "vda", 3, libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED)
    world.dom.job = None
    world.step(job)
    assert "FAILED" in world.merger.history.find(job)["error"]
    assert world.merger._last_event == {}      # dropped with the job


def test_finding10_failed_blockcommit_leaks_nothing(world):
    c = world.chain
    world.dom.commit_error = "internal error"
    with pytest.raises(errors.MergeFailed):
        world.merger.merge(world.vm, world.spec, base=c[0], top=c[1])
    assert world.merger.report.unreported() == set() and world.repairs.intents == {}


def test_finding10_final_entry_is_not_stolen_by_a_fast_poller(world):
    c = world.chain
    world.merger.config.final_entry_ttl = 3600
    job = world.merger.merge(world.vm, world.spec, base=c[0], top=c[1])
    world.dom.finish()
    assert world.step(job) is DONE
    # A monitoring poller and then the engine: both see the final entry.
    assert world.merger.job_stats(world.vm)[job]["state"] == "done"
    assert world.merger.job_stats(world.vm)[job]["state"] == "done"
    world.merger.forget_vm(world.vm.id)
    assert world.merger.job_stats(world.vm) == {}


def test_finding5_commit_persist_failure_still_leaves_a_work_item(world):
    c = world.chain
    calls = {"n": 0}
    real = world.merger._persist

    def flaky(vm):
        calls["n"] += 1
        if calls["n"] == 2:                    # STARTING is stored, COMMIT is not
            raise libvirt.libvirtError("cannot acquire state change lock")
        real(vm)
    world.merger._persist = flaky
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3])
    assert world.state(job) == "STARTING" and world.dom.job is not None
    assert f"merge/{world.vm.id}/{job}" in world.scheduler.items
    world.dom.progress(100, ready=True)
    assert world.step(job) is DONE              # STARTING found the job, and went on
    assert world.vm.definition.drives[0].volume_ids() == c[:2]


def test_finding2_vm_down_hands_storage_work_to_a_repair(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3])
    assert world.repairs.intents[job].walk_from == c[3]     # written before blockCommit
    world.dom.progress(100, ready=True)
    world.storage.valid = False
    assert isinstance(world.step(job), Blocked)
    world.vm.status = "Down"                    # QEMU died while the job waited
    assert world.step(job) is DONE
    assert job not in world.vm.definition.jobs
    assert "went down" in world.repairs.started[job]
    assert world.repairs.intents[job].merged == [c[2], c[3]]
    assert world.merger.history.find(job)["state"] == "FAILED"


def test_finding2_destroyed_vm_hands_storage_work_to_a_repair(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[0], top=c[1])
    world.vm.status = "Down"
    world.merger.vm_gone(world.vm)
    assert job in world.repairs.started and job not in world.vm.definition.jobs


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
    b, l = U(), U()
    job = MergeJob(id=U(), drive="vda", domain=SD, image=IMG, leaf=l, base=b, top=l,
                   chain=[b, l], bandwidth=5, state=State.READY, pivot_attempts=2)
    rec = job.to_record()
    assert rec["version"] == 2
    assert MergeJob.from_record(rec) == job
    # Version 1: VDSM's livemerge Job.to_dict() layout.
    v1 = {"id": job.id, "drive": "vda", "disk": {"poolID": U(), "domainID": SD, "imageID": IMG,
          "volumeID": l}, "base": b, "top": l, "bandwidth": 5, "state": "CLEANUP",
          "extend": None, "pivot": True}
    old = MergeJob.from_record(v1)
    assert (old.state, old.active, old.leaf, old.chain) == (State.READY, True, l, [b, l])
    with pytest.raises(ValueError, match="version"):
        MergeJob.from_record({**rec, "version": 99})
    # A malformed field is refused naming it (recovery reports such a VM).
    with pytest.raises(errors.InvalidParameter, match="leaf"):
        MergeJob.from_record({**rec, "leaf": "../../etc"})


def test_job_finished_before_any_stats_is_shown_once(world):
    # (final_entry_ttl = 0 here: shown to one stats call, then gone)
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


def test_no_such_domain_during_a_step_is_the_vm_going_down(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[0], top=c[1])

    def gone(disk, flags=0):
        e = libvirt.libvirtError("Domain not found")
        e.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "Domain not found", 0, "", None, None, 0, 0)
        raise e
    world.dom.blockJobInfo = gone
    assert world.step(job) is DONE
    assert job not in world.vm.definition.jobs and world.vm.status == "Down"
    assert job in world.repairs.started


def test_the_agent_holds_the_image_lease_while_the_vm_is_paused_for_the_pivot(world):
    """libvirt gives QEMU's leases up at the pause: the agent holds the image's
    from right after the suspend until the marker is written, and gives it back
    before the resume (libvirt takes it again for QEMU then)."""
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3])
    world.dom.progress(100, ready=True)
    assert world.step(job) is DONE
    order = [e[0] if e[0] != "blockJobAbort" else "pivot" for e in world.log
             if e[0] in ("suspend", "hold", "blockJobAbort", "sync", "release", "resume")]
    assert order == ["suspend", "hold", "pivot", "sync", "release", "resume"]
    assert not world.storage.held


def test_a_lease_taken_by_another_host_during_the_pause_means_no_pivot(world):
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3])
    world.dom.progress(100, ready=True)
    world.storage.refuse_lease = True
    outcome = world.step(job)
    assert isinstance(outcome, Retry) and "held by another host" in outcome.reason
    assert world.state(job) == "READY" and world.dom.running
    assert not [e for e in world.log if e[0] in ("blockJobAbort", "sync")]
    assert world.dom.chain == c
    world.storage.refuse_lease = False           # the other host is done: retried
    assert world.step(job) is DONE
    assert world.vm.definition.drives[0].volume_ids() == [c[0], c[1]]


def test_recovery_of_a_vm_paused_after_the_pivot_takes_the_lease_for_the_marker(world):
    """The agent died after the pivot (sanlock released its hold): the restarted
    agent takes the lease again before the marker; while it cannot, the VM
    stays paused."""
    c = world.chain
    job = world.merger.merge(world.vm, world.spec, base=c[1], top=c[3])
    world.dom.progress(100, ready=True)
    rec = world.vm.definition.jobs[job]
    rec.update(state="PIVOT", paused_for_pivot=True)
    world.dom.suspend()
    world.dom.finish()                             # pivoted; then the agent died
    world.storage.refuse_lease = True
    assert isinstance(world.step(job), Retry)
    assert world.state(job) == "CLEANUP" and not world.dom.running
    assert not [e for e in world.log if e[0] == "sync"]
    world.storage.refuse_lease = False
    assert world.step(job) is DONE
    order = [e[0] for e in world.log if e[0] in ("hold", "sync", "release", "resume")]
    assert order == ["hold", "sync", "release", "resume"]
