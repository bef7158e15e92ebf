"""Storage on a real file domain and real qemu-img (no libvirt needed)."""
from __future__ import annotations

import os
import uuid

import pytest

from vmhost import errors
from vmhost.ids import BLANK_UUID
from vmhost.storage import qemu_img
from vmhost.storage.metadata import (Legality, MetadataError, VolFormat, VolType,
                                     VolumeMetadata, parse_format, parse_prealloc)
from vmhost.storage.service import StorageService

MiB = 1 << 20
U = lambda: str(uuid.uuid4())  # noqa: E731


@pytest.fixture
def storage(tmp_path):
    root = tmp_path / "sd"
    root.mkdir()
    svc = StorageService(str(tmp_path / "state"))
    svc.sd = U()
    svc.root = str(root)
    svc.create_domain(svc.sd, "localfs", str(root), "unit")
    yield svc
    svc.stop()


def make_chain(storage, n: int):
    img, vols = U(), [U() for _ in range(n)]
    for i, vol in enumerate(vols):
        storage.create_volume(storage.sd, img, vol, 16 * MiB, "COW",
                              src_img_uuid=img if i else BLANK_UUID,
                              src_vol_uuid=vols[i - 1] if i else BLANK_UUID)
    return img, vols


def test_metadata_round_trip_and_torn_file_detection():
    md = VolumeMetadata(domain=U(), image=U(), volume=U(), parent=BLANK_UUID,
                        format=VolFormat.COW, voltype=VolType.LEAF, legality=Legality.LEGAL,
                        capacity=MiB, description="line\nbreak")
    data = md.dump()
    assert VolumeMetadata.parse(data) == md    # encoded, not flattened: tests/unit/test_metadata_hostile.py
    with pytest.raises(MetadataError, match="truncated"):
        VolumeMetadata.parse(data[: len(data) // 2])
    with pytest.raises(MetadataError, match="lacks key"):
        VolumeMetadata.parse(b"FORMAT=COW\nEOF\n")


def test_vdsm_numeric_codes():
    assert parse_format(4) is VolFormat.COW and parse_format("RAW") is VolFormat.RAW
    assert parse_prealloc(2).value == "SPARSE"
    with pytest.raises(ValueError):
        parse_format("QCOW3")


def test_chain_layout_relative_backing_and_voltypes(storage):
    img, vols = make_chain(storage, 3)
    image_dir = os.path.join(storage.root, storage.sd, "images", img)
    assert sorted(os.listdir(image_dir)) == sorted(vols + [v + ".meta" for v in vols])
    infos = qemu_img.info(os.path.join(image_dir, vols[2]), backing_chain=True)
    assert [i.get("backing-filename") for i in infos] == [vols[1], vols[0], None]
    assert [md.volume for md in storage.volume_chain(storage.sd, img, vols[2])] == vols
    types = [storage.volume_info(storage.sd, img, v)["voltype"] for v in vols]
    assert types == ["INTERNAL", "INTERNAL", "LEAF"]
    info = storage.volume_info(storage.sd, img, vols[1])
    for key in ("uuid", "domain", "image", "parent", "format", "voltype", "legality",
                "capacity", "apparentsize", "truesize", "ctime", "description"):
        assert key in info
    assert info["parent"] == vols[0] and info["capacity"] == str(16 * MiB)


def test_overlay_inherits_larger_parent_capacity_and_refuses_smaller_size(storage):
    img, base = U(), U()
    storage.create_volume(storage.sd, img, base, 32 * MiB, "COW")
    with pytest.raises(errors.InvalidParameter, match="smaller"):
        storage.create_volume(storage.sd, img, U(), 16 * MiB, "COW", src_img_uuid=img,
                              src_vol_uuid=base)


def test_raw_base_with_cow_overlay(storage):
    img, base, top = U(), U(), U()
    storage.create_volume(storage.sd, img, base, 8 * MiB, "RAW")
    storage.create_volume(storage.sd, img, top, 8 * MiB, "COW", src_img_uuid=img,
                          src_vol_uuid=base)
    prepared = storage.prepare_image(storage.sd, img, top)
    assert prepared.format == "qcow2"
    assert [r.volume for r in prepared.chain] == [base, top]
    assert storage.prepare_image(storage.sd, img, base).format == "raw"
    infos = qemu_img.info(prepared.chain[-1].path, backing_chain=True)
    assert infos[0]["backing-filename-format"] == "raw"


def test_delete_rules_and_leaf_recheck(storage):
    img, vols = make_chain(storage, 2)
    with pytest.raises(errors.VolumeImageHasChildren):
        storage.delete_volume(storage.sd, img, vols[0])
    storage.volume_in_use = lambda sd, i, v: v == vols[1]
    with pytest.raises(errors.VolumeIsBusy):
        storage.delete_volume(storage.sd, img, vols[1])
    storage.volume_in_use = lambda sd, i, v: False
    storage.delete_volume(storage.sd, img, vols[1])
    assert storage.volume_info(storage.sd, img, vols[0])["voltype"] == "LEAF"
    storage.delete_volume(storage.sd, img, vols[0])
    assert not os.path.exists(os.path.join(storage.root, storage.sd, "images", img))
    with pytest.raises(errors.ImageFileNotFound):
        storage.volume_info(storage.sd, img, vols[0])


def test_prepare_refuses_illegal_unless_allowed(storage):
    img, vols = make_chain(storage, 2)
    dom = storage.domain(storage.sd)
    dom.write_metadata(dom.read_metadata(img, vols[0]).replace(legality=Legality.ILLEGAL))
    with pytest.raises(errors.PrepareIllegalVolume, match=vols[0]):
        storage.prepare_image(storage.sd, img, vols[1])
    assert len(storage.prepare_image(storage.sd, img, vols[1], allow_illegal=True).chain) == 2


def test_prepare_leaf_reads_the_new_volume_only(storage):
    img, vols = make_chain(storage, 3)
    leaf = storage.prepare_leaf(storage.sd, img, vols[2])
    assert (leaf.ref.volume, leaf.format, leaf.backing) == (vols[2], "qcow2", vols[1])
    assert leaf.ref.path == storage.prepare_image(storage.sd, img, vols[2]).chain[-1].path
    # The volumes below are not read: a damaged one does not matter here.
    open(storage.prepare_image(storage.sd, img, vols[0]).chain[-1].path, "r+b").write(b"junk")
    assert storage.prepare_leaf(storage.sd, img, vols[2]).backing == vols[1]
    with pytest.raises(errors.InvalidParameter, match="not a usable qcow2 image"):
        storage.prepare_leaf(storage.sd, img, vols[0])
    dom = storage.domain(storage.sd)
    dom.write_metadata(dom.read_metadata(img, vols[2]).replace(legality=Legality.ILLEGAL))
    with pytest.raises(errors.PrepareIllegalVolume, match=vols[2]):
        storage.prepare_leaf(storage.sd, img, vols[2])


def _meta_files(storage, img) -> dict[str, bytes]:
    d = os.path.join(storage.root, storage.sd, "images", img)
    return {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d) if f.endswith(".meta")}


def test_prepare_follows_qcow2_headers_not_stale_metadata(storage):
    # An internal merge of mid into b finished on a host that died: the
    # leaf's backing pointer names b, the metadata still says mid.
    img, vols = make_chain(storage, 3)
    b, mid, leaf = vols
    dom = storage.domain(storage.sd)
    qemu_img.rebase(dom.volume_path(img, leaf), b, unsafe=True)
    before = _meta_files(storage, img)
    prepared = storage.prepare_image(storage.sd, img, leaf)
    assert [r.volume for r in prepared.chain] == [b, leaf]
    assert _meta_files(storage, img) == before    # no lease yet: nothing written
    # ILLEGAL is judged on the chain QEMU will run, not on the metadata's.
    dom.write_metadata(dom.read_metadata(img, mid).replace(legality=Legality.ILLEGAL))
    assert len(storage.prepare_image(storage.sd, img, leaf).chain) == 2
    dom.write_metadata(dom.read_metadata(img, b).replace(legality=Legality.ILLEGAL))
    with pytest.raises(errors.PrepareIllegalVolume, match=b):
        storage.prepare_image(storage.sd, img, leaf)


def test_prepare_refuses_a_qcow2_chain_through_a_volume_without_metadata(storage):
    img, vols = make_chain(storage, 2)
    dom = storage.domain(storage.sd)
    stray = U()
    qemu_img.create(os.path.join(os.path.dirname(dom.volume_path(img, vols[0])), stray),
                    "qcow2", 16 * MiB)
    qemu_img.rebase(dom.volume_path(img, vols[1]), stray, unsafe=True)
    with pytest.raises(errors.ImageFileNotFound, match=stray):
        storage.prepare_image(storage.sd, img, vols[1])


def test_failed_allocation_leaves_no_volume(storage, monkeypatch):
    img, vol = U(), U()

    def boom(*a, **kw):
        raise qemu_img.QemuImgError(["qemu-img", "create"], 1, "disk on fire")
    monkeypatch.setattr(qemu_img, "create", boom)
    with pytest.raises(errors.VolumeCreationError, match="disk on fire"):
        storage.create_volume(storage.sd, img, vol, MiB, "COW")
    assert storage.list_volumes(storage.sd, img) == []


def test_registry_survives_restart_without_touching_storage(storage, tmp_path):
    again = StorageService(str(tmp_path / "state"))
    assert again.domain(storage.sd).manifest == storage.domain(storage.sd).manifest
    assert again.repo_stats()[storage.sd]["valid"] is False  # not checked yet


def test_monitor_reports_valid_then_invalid(tmp_path):
    from vmhost.storage.monitor import DomainMonitor
    import threading
    probe = tmp_path / "metadata"
    probe.write_bytes(b"x" * 4096)
    events, changed = [], threading.Event()

    def on_change(sd, valid, reason):
        events.append((valid, reason))
        changed.set()
    mon = DomainMonitor("sd", str(probe), interval=0.05, timeout=5, on_change=on_change)
    mon.start()
    assert changed.wait(10) and events[0] == (True, "")
    changed.clear()
    probe.unlink()
    assert changed.wait(10)
    assert events[1][0] is False and "metadata" in events[1][1]
    assert mon.status.valid is False
    mon.stop()


def test_sync_chain_four_cases_idempotent(storage):
    img, vols = make_chain(storage, 4)
    b, s1, s2, leaf = vols
    md = lambda v: storage.domain(storage.sd).read_metadata(img, v)  # noqa: E731
    # 4: in sync.
    assert storage.sync_volume_chain(storage.sd, img, leaf, vols) == "in-sync"
    # 1: before an active merge of everything above s1: s2 and the leaf ILLEGAL.
    assert storage.sync_volume_chain(storage.sd, img, leaf, [b, s1]) == "leaf-missing"
    assert [md(v).legality.value for v in vols] == ["LEGAL", "LEGAL", "ILLEGAL", "ILLEGAL"]
    assert [md(v).parent for v in vols] == [BLANK_UUID, b, s1, s2]
    # 3: the pivot failed; the full chain makes them LEGAL again.
    assert storage.sync_volume_chain(storage.sd, img, leaf, vols) == "illegal-restored"
    assert {md(v).legality.value for v in vols} == {"LEGAL"}
    # 2: s1 and s2 merged into b: the leaf's parent moves to b.
    assert storage.sync_volume_chain(storage.sd, img, leaf, [b, leaf]) == "internal-missing"
    assert md(leaf).parent == b and md(s1).parent == b and md(s2).parent == s1
    before = {v: md(v) for v in vols}
    assert storage.sync_volume_chain(storage.sd, img, leaf, [b, leaf]) == "in-sync"
    assert {v: md(v) for v in vols} == before
    with pytest.raises(errors.InvalidParameter):
        storage.sync_volume_chain(storage.sd, img, leaf, [b, U()])


def test_finish_merge_and_reconcile(storage):
    img, vols = make_chain(storage, 3)
    b, mid, leaf = vols
    storage.finish_merge(storage.sd, img, b, [mid, leaf], capacity=32 * MiB, base_is_leaf=True)
    info = storage.volume_info(storage.sd, img, b)
    assert (info["voltype"], info["capacity"]) == ("LEAF", str(32 * MiB))
    assert storage.volume_info(storage.sd, img, mid)["legality"] == "ILLEGAL"
    # Offline: the qcow2 chain from the leaf is [b, mid, leaf]; the ILLEGAL
    # volumes on top are dropped.
    assert storage.reconcile_chain(storage.sd, img, leaf) == [b]
    storage.volume_in_use = lambda sd, i, v: True
    with pytest.raises(errors.VolumeIsBusy):
        storage.reconcile_chain(storage.sd, img, leaf)


def test_prober_times_out_on_a_blocking_read(tmp_path):
    from vmhost.storage.monitor import Prober
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)           # opening it blocks like a hung mount (but can be killed)
    probe = Prober(str(fifo), timeout=0.2)
    ok, reason, _ = probe()
    assert not ok and "timed out" in reason
    ok, reason, _ = Prober(str(tmp_path / "missing"), timeout=5)()
    assert not ok and "missing" in reason


def test_failpoint_storage_metadata_temp_written_leaves_no_stale_temp(tmp_path):
    """Regression (crash matrix, point storage.metadata.temp_written): a
    writer killed between its temp file and the rename left the temp behind."""
    from vmhost.fsutil import atomic_write
    target = tmp_path / "vol.meta"
    (tmp_path / "vol.meta.tmp.99999").write_bytes(b"half")
    atomic_write(str(target), b"whole\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.meta"]
    assert target.read_bytes() == b"whole\n"


def test_every_failpoint_is_placed_in_the_code():
    import pathlib
    from vmhost import failpoints
    from vmhost.virt.merge import MergeJob, State
    source = "".join(p.read_text() for p in pathlib.Path(failpoints.__file__).parent.rglob("*.py")
                     if p.name != "failpoints.py")
    for point in failpoints.POINTS:
        parts = point.split(".")
        if parts[:2] == ["merge", "save"]:
            # the job store's save hits <kind>.save.<state>.before/after for every state
            assert parts[2] in State.__members__ and MergeJob.KIND == "merge"
            assert 'f"{job.KIND}.save.{state}.' + parts[3] in source
        else:
            assert f'"{point}"' in source, point


def test_size_bounds_and_overlay_preallocation_are_refused_clearly(storage):
    img, base = U(), U()
    with pytest.raises(errors.InvalidParameter, match="1 PiB"):
        storage.create_volume(storage.sd, img, U(), 1 << 64, "RAW")
    storage.create_volume(storage.sd, img, base, MiB, "COW")
    with pytest.raises(errors.InvalidParameter, match="SPARSE"):
        storage.create_volume(storage.sd, img, U(), MiB, "COW", preallocate="PREALLOCATED",
                              src_img_uuid=img, src_vol_uuid=base)
    assert storage.list_volumes(storage.sd, img) == [base]


# --- issue 10: live merge at its edges ---------------------------------------

def _md(storage, img, vol):
    return storage.domain(storage.sd).read_metadata(img, vol)


def _active_merge(storage, img, base, top):
    """What the merge flow does to storage for an active merge of `top` into
    `base`: mark the leaf before the pivot (sync case 1), then after it."""
    assert storage.sync_volume_chain(storage.sd, img, top, [base]) == "leaf-missing"
    storage.finish_merge(storage.sd, img, base, [top], capacity=16 * MiB, base_is_leaf=True)


def test_finding1_snapshot_after_active_merge_not_refused(storage):
    """Regression (issue 10, finding 1): after an active merge the merged-away
    leaf still names the new leaf as its parent; a snapshot on the new leaf
    was refused ("not a leaf: it already has a child")."""
    img, (base, top) = make_chain(storage, 2)
    _active_merge(storage, img, base, top)
    new = U()
    storage.create_volume(storage.sd, img, new, 16 * MiB, "COW", src_img_uuid=img,
                          src_vol_uuid=base)
    assert [md.volume for md in storage.volume_chain(storage.sd, img, new)] == [base, new]
    assert (_md(storage, img, base).voltype, _md(storage, img, new).voltype) == \
        (VolType.INTERNAL, VolType.LEAF)
    # The engine deletes the merged volume later: the new chain keeps its voltypes.
    storage.delete_volume(storage.sd, img, top)
    assert _md(storage, img, base).voltype is VolType.INTERNAL
    assert sorted(storage.list_volumes(storage.sd, img)) == sorted([base, new])
    # And once more: snapshot, merge, snapshot without deleting in between.
    _active_merge(storage, img, base, new)
    again = U()
    storage.create_volume(storage.sd, img, again, 16 * MiB, "COW", src_img_uuid=img,
                          src_vol_uuid=base)
    assert storage.list_volumes(storage.sd, img) == sorted([base, new, again])


def test_finding1_illegal_leaf_in_a_pivot_window_is_not_garbage(storage):
    """The marker of sync case 1 (leaf ILLEGAL, pivot not proven) is not a
    merged-away volume: it still is the base's child and may hold the newest data."""
    img, (base, top) = make_chain(storage, 2)
    assert storage.sync_volume_chain(storage.sd, img, top, [base]) == "leaf-missing"
    assert _md(storage, img, top).legality is Legality.ILLEGAL
    with pytest.raises(errors.InvalidParameter, match="already has a child"):
        storage.create_volume(storage.sd, img, U(), 16 * MiB, "COW", src_img_uuid=img,
                              src_vol_uuid=base)
    with pytest.raises(errors.VolumeImageHasChildren):
        storage.delete_volume(storage.sd, img, base)
    storage.volume_in_use = lambda sd, i, v: v == top
    with pytest.raises(errors.VolumeIsBusy):
        storage.delete_volume(storage.sd, img, top)
    # The pivot failed: sync case 3 makes it LEGAL, and it is the leaf as before.
    assert storage.sync_volume_chain(storage.sd, img, top, [base, top]) == "illegal-restored"
    assert _md(storage, img, base).voltype is VolType.INTERNAL
    assert _md(storage, img, top).legality is Legality.LEGAL


def test_finding1_merged_volumes_are_nobodys_children(storage):
    """After an internal merge of s1 and s2 into the base, the merged-away
    volumes are removable in any order, and removing them never changes the
    voltype of a live volume."""
    img, vols = make_chain(storage, 4)
    b, s1, s2, leaf = vols
    assert storage.sync_volume_chain(storage.sd, img, leaf, [b, leaf]) == "internal-missing"
    storage.finish_merge(storage.sd, img, b, [s1, s2], capacity=16 * MiB, base_is_leaf=False)
    storage.delete_volume(storage.sd, img, s1)     # s2 still names s1: not a child
    assert _md(storage, img, b).voltype is VolType.INTERNAL
    storage.delete_volume(storage.sd, img, s2)     # its parent is gone already
    assert storage.list_volumes(storage.sd, img) == sorted([b, leaf])
    assert [md.voltype for md in storage.volume_chain(storage.sd, img, leaf)] == \
        [VolType.INTERNAL, VolType.LEAF]
    with pytest.raises(errors.VolumeImageHasChildren):
        storage.delete_volume(storage.sd, img, b)


def test_finding1_volume_being_created_still_counts_as_a_child(storage, monkeypatch):
    """A volume is ILLEGAL until complete: a creation cut short (its metadata
    written, no data yet) is no merged-away volume; deleting it frees the parent."""
    img, (base,) = make_chain(storage, 1)
    dom, half = storage.domain(storage.sd), U()

    class PowerCut(BaseException):
        pass

    def cut(*a, **kw):
        raise PowerCut()
    monkeypatch.setattr(dom, "allocate", cut)
    with pytest.raises(PowerCut):
        storage.create_volume(storage.sd, img, half, 16 * MiB, "COW", src_img_uuid=img,
                              src_vol_uuid=base)
    monkeypatch.undo()
    assert _md(storage, img, half).legality is Legality.ILLEGAL
    assert not _md(storage, img, half).merged_away
    with pytest.raises(errors.InvalidParameter, match="already has a child"):
        storage.create_volume(storage.sd, img, U(), 16 * MiB, "COW", src_img_uuid=img,
                              src_vol_uuid=base)
    with pytest.raises(errors.VolumeImageHasChildren):
        storage.delete_volume(storage.sd, img, base)
    storage.delete_volume(storage.sd, img, half)
    assert _md(storage, img, base).voltype is VolType.LEAF
    storage.create_volume(storage.sd, img, U(), 16 * MiB, "COW", src_img_uuid=img,
                          src_vol_uuid=base)


def test_merged_marker_round_trip_and_only_when_set():
    md = VolumeMetadata(domain=U(), image=U(), volume=U(), parent=U(), format=VolFormat.COW,
                        voltype=VolType.LEAF, legality=Legality.ILLEGAL, capacity=MiB)
    assert b"MERGED" not in md.dump() and not md.merged_away
    merged = md.replace(merged_into=U())
    assert VolumeMetadata.parse(merged.dump()) == merged and merged.merged_away
    assert not merged.replace(legality=Legality.LEGAL).merged_away
    with pytest.raises(MetadataError, match="MERGED"):
        VolumeMetadata.parse(merged.dump().replace(merged.merged_into.encode(), b"x"))


def _crash_at(monkeypatch, point):
    """A failpoint that raises (in-process) instead of killing the agent."""
    from vmhost import failpoints

    class Crash(Exception):
        pass

    def hit(name):
        if name == point:
            raise Crash(name)
    monkeypatch.setattr(failpoints, "hit", hit)
    return Crash


def test_finding8_delete_crash_after_files_removed_converges(storage, monkeypatch):
    """Regression (issue 10, finding 8): a crash between removing a volume's
    files and recomputing its parent's voltype left the parent INTERNAL with
    no child, and every later snapshot on the disk was refused."""
    from vmhost import failpoints
    assert "storage.delete.files_removed" in failpoints.POINTS
    img, (base, top) = make_chain(storage, 2)
    crash = _crash_at(monkeypatch, "storage.delete.files_removed")
    with pytest.raises(crash):
        storage.delete_volume(storage.sd, img, top)
    monkeypatch.undo()
    assert storage.list_volumes(storage.sd, img) == [base]
    assert _md(storage, img, base).voltype is VolType.INTERNAL    # what the crash left
    # The next snapshot works: an INTERNAL volume without children is a leaf.
    new = U()
    storage.create_volume(storage.sd, img, new, 16 * MiB, "COW", src_img_uuid=img,
                          src_vol_uuid=base)
    assert _md(storage, img, base).voltype is VolType.INTERNAL
    # The engine retries the delete it got no answer for: success.
    storage.delete_volume(storage.sd, img, top)
    assert storage.list_volumes(storage.sd, img) == sorted([base, new])
    storage.delete_volume(storage.sd, img, new)
    assert _md(storage, img, base).voltype is VolType.LEAF


def test_finding8_delete_retry_repairs_the_parent(storage, monkeypatch):
    img, (base, top) = make_chain(storage, 2)
    crash = _crash_at(monkeypatch, "storage.delete.files_removed")
    with pytest.raises(crash):
        storage.delete_volume(storage.sd, img, top)
    monkeypatch.undo()
    storage.delete_volume(storage.sd, img, top)
    assert _md(storage, img, base).voltype is VolType.LEAF


def test_finding8_delete_is_idempotent(storage):
    """Deleting a volume that is already gone (or half gone) succeeds."""
    img, (base, mid, top) = make_chain(storage, 3)
    storage.delete_volume(storage.sd, img, top)
    storage.delete_volume(storage.sd, img, top)
    # Half removed (data gone, metadata left): the retry finishes the job.
    os.unlink(storage.domain(storage.sd).volume_path(img, mid))
    storage.delete_volume(storage.sd, img, mid)
    storage.delete_volume(storage.sd, img, mid)
    assert storage.list_volumes(storage.sd, img) == [base]
    assert _md(storage, img, base).voltype is VolType.LEAF
    before = _md(storage, img, base)
    storage.delete_volume(storage.sd, img, U())      # never existed: nothing to do
    assert storage.list_volumes(storage.sd, img) == [base] and _md(storage, img, base) == before


def test_finding10_image_locks_do_not_pile_up(storage):
    for _ in range(5):
        img, vol = U(), U()
        storage.create_volume(storage.sd, img, vol, MiB, "COW")
        storage.delete_volume(storage.sd, img, vol)
    assert storage._image_locks == {}
