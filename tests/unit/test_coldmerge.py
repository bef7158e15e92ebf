"""Cold merge (vmhost.storage.coldmerge) on a real file domain with real
qemu-img; the scheduler is a fake that runs the work items when told."""
from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest

from vmhost import errors, failpoints
from vmhost.ids import BLANK_UUID
from vmhost.scheduler import DONE, Blocked, Retry, Wait
from vmhost.storage import qemu_img
from vmhost.storage.coldmerge import ColdMerger, Phase
from vmhost.storage.metadata import Legality, VolType
from vmhost.storage.service import StorageService

MiB = 1 << 20
U = lambda: str(uuid.uuid4())  # noqa: E731
# qemu-img commit -t none needs O_DIRECT: keep the images off tmpfs.
TEST_BASE = os.environ.get("VMHOST_TEST_DIR", "/var/tmp/vmhost-tests")
HOST = U()


class FakeScheduler:
    def __init__(self):
        self.items: dict = {}

    def submit(self, key, description, fn, topics=(), delay=0.0):
        self.items[key] = fn

    def drain(self, rounds: int = 20) -> None:
        """Run every item until it is DONE (new items included)."""
        for _ in range(rounds):
            if not self.items:
                return
            for key, fn in list(self.items.items()):
                outcome = fn()
                assert outcome is DONE, f"{key}: {outcome}"
                del self.items[key]
        raise AssertionError(f"items never finished: {list(self.items)}")


class Crash(BaseException):
    """Stands in for SIGKILL: nothing catches it, nothing after it runs."""


@pytest.fixture
def root():
    path = os.path.join(TEST_BASE, f"unit-coldmerge-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Rig:
    """A storage service, its domain and a cold merger, as one agent has them."""

    def __init__(self, root: str, sd: str | None = None, host: str = HOST):
        self.root = root
        # Few monitor probes: their children must not outlive the test.
        self.storage = StorageService(os.path.join(root, "state"), monitor_interval=3600)
        self.sd = sd or U()
        if sd is None:
            os.makedirs(os.path.join(root, "sd"))
            self.storage.create_domain(self.sd, "localfs", os.path.join(root, "sd"), "unit")
        self.storage.domain_valid = lambda sd: True      # the monitor is not what we test
        self.scheduler = FakeScheduler()
        self.in_use: set[str] = set()
        self.merger = ColdMerger(self.storage, self.scheduler, host,
                                 vm_in_use=lambda sd, img, vol: vol in self.in_use)
        self.storage.image_job = self.merger.image_job

    def restart(self, host: str = HOST) -> "Rig":
        """A new agent on the same state dir and domain (the old one died)."""
        self.storage.stop()
        return Rig(self.root, self.sd, host)

    def path(self, img: str, vol: str) -> str:
        return self.storage.domain(self.sd).volume_path(img, vol)

    def md(self, img: str, vol: str):
        return self.storage.domain(self.sd).read_metadata(img, vol)

    def jobs_dir(self) -> str:
        return self.storage.domain(self.sd).jobs_dir()


def build(rig: Rig, layers: int = 3, grow_top: bool = False):
    """base <- ... <- leaf with data in every layer, and a reference image
    written the same way. With grow_top the second volume is larger than the base."""
    img, vols = U(), []
    ref = os.path.join(rig.root, f"ref-{img[:8]}.qcow2")
    qemu_img.create(ref, "qcow2", size=32 * MiB)
    for i in range(layers):
        vol = U()
        size = 32 * MiB if (grow_top and i >= 1) else 16 * MiB
        rig.storage.create_volume(rig.sd, img, vol, size, "COW",
                                  src_img_uuid=img if i else BLANK_UUID,
                                  src_vol_uuid=vols[-1] if vols else BLANK_UUID)
        vols.append(vol)
        writes = [(0x10 + i, i * 2 * MiB, MiB), (0x40 + i, 0, 64 * 1024)]
        if grow_top and i == 1:
            writes.append((0x5a, 20 * MiB, MiB))       # beyond the base's end
        for pattern, offset, length in writes:
            cmd = f"write -P {pattern:#x} {offset} {length}"
            qemu_img.io(rig.path(img, vol), cmd)
            qemu_img.io(ref, cmd)
    return img, vols, ref


def subchain(rig, img, base, top, **kw) -> dict:
    return {"sd_id": rig.sd, "img_id": img, "base_id": base, "top_id": top, **kw}


def assert_merged(rig, img, vols, ref, base, top, gen0):
    leaf = [v for v in vols if v != top][-1]
    assert [md.volume for md in rig.storage.volume_chain(rig.sd, img, leaf)] == \
        [v for v in vols if v != top]
    infos = qemu_img.info(rig.path(img, leaf), backing_chain=True)
    assert [os.path.basename(i["filename"]) for i in reversed(infos)] == \
        [v for v in vols if v != top]
    assert qemu_img.compare(ref, rig.path(img, leaf)), "merged chain differs from the reference"
    top_md, base_md = rig.md(img, top), rig.md(img, base)
    assert top_md.legality is Legality.ILLEGAL and top_md.merged_into == base
    assert base_md.generation == gen0 + 1 and base_md.legality is Legality.LEGAL
    assert os.listdir(rig.jobs_dir()) == []
    return base_md


@pytest.mark.parametrize("kind", ["internal", "leaf"])
def test_cold_merge_with_data_in_every_layer(root, kind):
    rig = Rig(root)
    img, vols, ref = build(rig)
    base, top = (vols[0], vols[1]) if kind == "internal" else (vols[1], vols[2])
    gen0 = rig.md(img, base).generation
    job = U()
    rig.merger.merge(job, subchain(rig, img, base, top, base_generation=gen0))
    assert rig.merger.get_jobs()[job]["status"] == "pending"
    # The record on the domain holds the image: no VM start, no delete, no second job.
    with pytest.raises(errors.VolumeIsBusy, match=job):
        rig.storage.prepare_image(rig.sd, img, vols[-1])
    with pytest.raises(errors.VolumeIsBusy):
        rig.merger.merge(U(), subchain(rig, img, vols[0], vols[1]))
    rig.scheduler.drain()
    base_md = assert_merged(rig, img, vols, ref, base, top, gen0)
    assert base_md.voltype is (VolType.LEAF if kind == "leaf" else VolType.INTERNAL)
    info = rig.merger.get_jobs(job_ids=[job])[job]
    assert info == {"id": job, "status": "done", "progress": 100, "job_type": "storage",
                    "description": f"cold merge of {top} into {base}"}
    assert rig.merger.get_jobs(job_type="virt") == {}
    rig.storage.delete_volume(rig.sd, img, top)         # the image is free again
    rig.storage.stop()


def test_base_grows_to_the_top_capacity(root):
    rig = Rig(root)
    img, vols, ref = build(rig, layers=2, grow_top=True)
    gen0 = rig.md(img, vols[0]).generation
    rig.merger.merge(U(), subchain(rig, img, vols[0], vols[1]))
    rig.scheduler.drain()
    base_md = rig.md(img, vols[0])
    assert base_md.capacity == 32 * MiB and base_md.generation == gen0 + 1
    assert qemu_img.info(rig.path(img, vols[0]))["virtual-size"] == 32 * MiB
    assert qemu_img.compare(ref, rig.path(img, vols[0]))
    rig.storage.stop()


def test_progress_is_reported_during_the_commit(root):
    rig = Rig(root)
    img, vols, ref = build(rig, layers=2)
    job = U()
    seen = []
    report = rig.merger._progress

    def spy(job_id, percent):
        seen.append(rig.merger.get_jobs()[job_id]["progress"])
        report(job_id, percent)
    rig.merger._progress = spy
    rig.merger.merge(job, subchain(rig, img, vols[0], vols[1]))
    rig.scheduler.drain()
    assert seen and seen[0] == 0 and rig.merger.get_jobs()[job]["progress"] == 100
    rig.storage.stop()


def test_abort_during_the_commit_keeps_the_chain_and_delete_forgets_the_job(root):
    rig = Rig(root)
    img, vols, ref = build(rig)
    job = U()
    set_progress = rig.merger._set_progress

    def abort_at_first_report(job_id, percent):
        set_progress(job_id, percent)
        if percent < 100:
            rig.merger.abort(job_id)
    rig.merger._set_progress = abort_at_first_report
    rig.merger.merge(job, subchain(rig, img, vols[0], vols[1]))
    gen0 = rig.md(img, vols[0]).generation
    rig.scheduler.drain()
    assert rig.merger.get_jobs()[job]["status"] == "aborted"
    assert rig.md(img, vols[1]).legality is Legality.LEGAL
    assert rig.md(img, vols[0]).generation == gen0
    assert [md.volume for md in rig.storage.volume_chain(rig.sd, img, vols[2])] == vols
    assert qemu_img.compare(ref, rig.path(img, vols[2]))
    assert os.listdir(rig.jobs_dir()) == [] and rig.merger.image_job(rig.sd, img) is None
    with pytest.raises(errors.JobInWrongState, match="ended"):
        rig.merger.abort(job)
    rig.merger.delete(job)
    assert rig.merger.get_jobs() == {}
    with pytest.raises(errors.NoSuchJob):
        rig.merger.delete(job)
    # Past the commit an abort is refused; a running job cannot be deleted.
    job2 = U()
    rig.merger.merge(job2, subchain(rig, img, vols[0], vols[1]))
    with pytest.raises(errors.JobInWrongState, match="abort it first"):
        rig.merger.delete(job2)
    rig.merger._live[job2].phase = Phase.REBASE      # as if the commit had completed
    with pytest.raises(errors.JobInWrongState, match="REBASE"):
        rig.merger.abort(job2)
    rig.storage.stop()


def test_a_failed_commit_ends_failed_and_a_locked_image_is_retried(root, monkeypatch):
    rig = Rig(root)
    img, vols, ref = build(rig)
    gen0 = rig.md(img, vols[0]).generation
    errs = ["Failed to get \"write\" lock", "No space left on device"]

    def commit(top, **kw):
        raise qemu_img.QemuImgError(["qemu-img", "commit"], 1, errs.pop(0))
    monkeypatch.setattr(qemu_img, "commit", commit)
    job = U()
    rig.merger.merge(job, subchain(rig, img, vols[0], vols[1]))
    (fn,) = rig.scheduler.items.values()
    outcome = fn()                      # the lock: someone else still has it open
    assert isinstance(outcome, Retry) and "lock" in outcome.reason
    assert rig.merger.get_jobs()[job]["status"] == "running"
    assert fn() is DONE                 # no space: the job fails, the chain is as before
    info = rig.merger.get_jobs()[job]
    assert info["status"] == "failed" and "No space" in info["error"]["message"]
    assert info["error"]["code"] == errors.MergeFailed.code
    assert os.listdir(rig.jobs_dir()) == [] and rig.merger.image_job(rig.sd, img) is None
    assert rig.md(img, vols[0]).generation == gen0
    assert qemu_img.compare(ref, rig.path(img, vols[2]))
    rig.storage.stop()


def test_generation_mismatch_is_refused_and_nothing_changes(root):
    rig = Rig(root)
    img, vols, _ = build(rig)
    gen0 = rig.md(img, vols[0]).generation
    with pytest.raises(errors.GenerationMismatch, match=f"GEN {gen0}.*expects {gen0 + 5}"):
        rig.merger.merge(U(), subchain(rig, img, vols[0], vols[1], base_generation=gen0 + 5))
    assert rig.merger.image_job(rig.sd, img) is None and rig.merger.get_jobs() == {}
    assert not os.path.exists(rig.jobs_dir()) or os.listdir(rig.jobs_dir()) == []
    rig.storage.stop()


def test_a_job_fenced_by_a_gen_change_stops_without_touching_anything(root):
    rig = Rig(root)
    img, vols, ref = build(rig)
    job = U()
    rig.merger.merge(job, subchain(rig, img, vols[0], vols[1]))
    base = rig.md(img, vols[0])
    # The engine fences a lost job: GEN+3 on the base (FenceVolumeJobCommand).
    rig.storage.domain(rig.sd).write_metadata(base.replace(generation=base.generation + 3))
    rig.scheduler.drain()
    info = rig.merger.get_jobs()[job]
    assert info["status"] == "failed" and "fenced" in info["error"]["message"]
    assert rig.md(img, vols[1]).legality is Legality.LEGAL
    assert os.listdir(rig.jobs_dir()) == [] and rig.merger.image_job(rig.sd, img) is None
    assert qemu_img.compare(ref, rig.path(img, vols[2]))
    rig.storage.stop()


def test_refused_while_a_vm_uses_the_image_or_bad_subchain(root):
    rig = Rig(root)
    img, vols, _ = build(rig)
    rig.in_use.add(vols[2])
    with pytest.raises(errors.VolumeIsBusy, match="running VM"):
        rig.merger.merge(U(), subchain(rig, img, vols[0], vols[1]))
    rig.in_use.clear()
    with pytest.raises(errors.InvalidParameter, match="not the parent"):
        rig.merger.merge(U(), subchain(rig, img, vols[0], vols[2]))
    with pytest.raises(errors.ImageFileNotFound):
        rig.merger.merge(U(), subchain(rig, img, vols[0], U()))
    leaf = rig.md(img, vols[2])       # a pivot marker: the image needs a reconcile first
    rig.storage.domain(rig.sd).write_metadata(leaf.replace(legality=Legality.ILLEGAL))
    with pytest.raises(errors.InvalidParameter, match=f"ILLEGAL volume.*{vols[2]}.*reconcile"):
        rig.merger.merge(U(), subchain(rig, img, vols[0], vols[1]))
    assert rig.merger.get_jobs() == {} and rig.merger.image_job(rig.sd, img) is None
    rig.storage.stop()


def test_a_record_of_another_host_holds_the_image_and_is_not_taken_over(root):
    rig = Rig(root)
    img, vols, _ = build(rig)
    job = U()
    rig.merger.merge(job, subchain(rig, img, vols[0], vols[1]))   # never run: the host "dies"
    other = rig.restart(host=U())
    with pytest.raises(errors.VolumeIsBusy, match=f"job {job} of host {HOST}"):
        other.merger.merge(U(), subchain(other, img, vols[0], vols[1]))
    other.merger.resume()
    other.scheduler.drain()
    assert other.merger.get_jobs() == {}
    assert os.listdir(other.jobs_dir()) == [f"{job}.json"]
    other.storage.stop()


def _shared(rig: Rig, lease: dict) -> None:
    """The rig's domain as a shared one: the image lease is `lease["free"]` or held
    by another host; lease["held"] says whether this agent holds it."""
    def hold(sd, img):
        if not lease["held"] and not lease["free"]:
            raise errors.AcquireLockFailure(f"image {img}: held by another host")
        lease["held"] = True

    def release(sd, img):
        lease["held"] = False
    rig.storage.is_shared = lambda sd: True
    rig.storage.hold_image, rig.storage.release_image = hold, release


def test_a_record_of_another_host_is_taken_over_under_the_image_lease(root):
    rig = Rig(root)
    img, vols, ref = build(rig)
    gen0 = rig.md(img, vols[0]).generation
    job = U()
    rig.merger.merge(job, subchain(rig, img, vols[0], vols[1]))   # its host dies
    other = rig.restart(host=U())
    lease = {"free": False, "held": False}
    _shared(other, lease)
    other.merger.resume()
    scan = other.scheduler.items.pop(f"coldmerge-scan/{other.sd}")
    assert isinstance(scan(), Wait)          # the dead host's lease lives: looked at again
    assert other.merger.get_jobs() == {} and not other.scheduler.items
    lease["free"] = True                     # expired
    assert isinstance(scan(), Wait)
    assert lease["held"] and other.merger.get_jobs()[job]["status"] == "running"
    other.scheduler.drain()
    assert other.merger.get_jobs()[job]["status"] == "done" and not lease["held"]
    assert_merged(other, img, vols, ref, vols[0], vols[1], gen0)
    other.storage.stop()


def test_a_job_another_host_finished_meanwhile_ends_done_without_touching_anything(root):
    rig = Rig(root)
    img, vols, ref = build(rig)
    gen0 = rig.md(img, vols[0]).generation
    job = U()
    rig.merger.merge(job, subchain(rig, img, vols[0], vols[1]))
    other = Rig(root, rig.sd, host=U())      # another host, on the same domain
    _shared(other, {"free": True, "held": False})
    other.merger.resume()
    other.scheduler.items.pop(f"coldmerge-scan/{other.sd}")()
    other.scheduler.drain()                  # host2 finished it while host1 waited
    before = {v: rig.md(img, v) for v in vols}
    rig.scheduler.drain()
    assert rig.merger.get_jobs()[job]["status"] == "done"
    assert {v: rig.md(img, v) for v in vols} == before
    assert_merged(rig, img, vols, ref, vols[0], vols[1], gen0)
    other.storage.stop()
    rig.storage.stop()


KINDS = {"internal": (0, 1), "leaf": (1, 2)}
# A leaf merge has no rebase.
CRASHES = [(p, k) for p in failpoints.COLD_POINTS for k in KINDS
           if not (k == "leaf" and p.startswith("coldmerge.rebase."))]


@pytest.mark.parametrize("point,kind", CRASHES)
def test_crash_at_each_phase_boundary_then_resume_converges(root, monkeypatch, point, kind):
    rig = Rig(root)
    img, vols, ref = build(rig)
    b, t = KINDS[kind]
    base, top = vols[b], vols[t]
    gen0 = rig.md(img, base).generation
    job = U()

    def hit(name):
        if name == point:
            raise Crash(name)
    monkeypatch.setattr(failpoints, "hit", hit)
    rig.merger.merge(job, subchain(rig, img, base, top))
    with pytest.raises(Crash):
        rig.scheduler.drain()
    monkeypatch.setattr(failpoints, "hit", lambda name: None)
    # Nothing is lost at the crash: the chain from the leaf reads as before.
    assert qemu_img.compare(ref, rig.path(img, vols[-1]))
    with open(os.path.join(rig.jobs_dir(), f"{job}.json")) as f:
        assert json.load(f)["id"] == job

    again = rig.restart()
    # The record holds the image before the start-up scan found it.
    with pytest.raises(errors.VolumeIsBusy, match=job):
        again.storage.delete_volume(again.sd, img, top)
    again.merger.resume()
    again.scheduler.drain()
    assert_merged(again, img, vols, ref, base, top, gen0)
    assert again.merger.get_jobs()[job]["status"] == "done"
    again.storage.stop()


def test_scan_waits_for_the_domain(root):
    rig = Rig(root)
    rig.storage.domain_valid = lambda sd: False
    rig.merger.resume()
    (fn,) = rig.scheduler.items.values()
    assert isinstance(fn(), Blocked)
    rig.storage.stop()
