"""Live snapshots on a real VM: the four views of a chain agree, and guest
writes made before and after each snapshot read back from the final chain."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from vmhost.client import RpcError
from vmhost.ids import BLANK_UUID
from vmhost.storage import qemu_img
from vmhost.testing import guestio

MiB = 1 << 20


def test_two_snapshots_four_views_agree_and_data_reads_back(env):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    dom = env.dom(vm)
    guestio.write(dom, "vda", 0x11, 0, MiB)
    mid = env.snapshot(vm, img, base)
    guestio.write(dom, "vda", 0x22, MiB, MiB)
    guestio.write(dom, "vda", 0x2a, 0, 64 * 1024)        # overwrite part of base's data
    top = env.snapshot(vm, img, mid)
    guestio.write(dom, "vda", 0x33, 2 * MiB, MiB)

    assert env.assert_four_views(vm, img) == [base, mid, top]

    # Storage metadata: leaf/internal and legality follow the chain.
    infos = [env.call("Volume.getInfo", storagedomainID=env.sd, imageID=img, volumeID=v)
             for v in (base, mid, top)]
    assert [i["voltype"] for i in infos] == ["INTERNAL", "INTERNAL", "LEAF"]
    assert {i["legality"] for i in infos} == {"LEGAL"}
    assert [i["parent"] for i in infos] == [BLANK_UUID, base, mid]

    # The qcow2 headers name the backing file relatively: just the parent's UUID.
    headers = qemu_img.info(os.path.join(env.image_dir(img), top), backing_chain=True)
    assert [h.get("backing-filename") for h in headers] == [mid, base, None]

    # Live: every write reads back through the running VM.
    guestio.verify(dom, "vda", 0x2a, 0, 64 * 1024)
    guestio.verify(dom, "vda", 0x11, 64 * 1024, MiB - 64 * 1024)
    guestio.verify(dom, "vda", 0x22, MiB, MiB)
    guestio.verify(dom, "vda", 0x33, 2 * MiB, MiB)
    guestio.verify(dom, "vda", 0x00, 3 * MiB, MiB)

    # Offline: the same data from the final chain on disk, and each layer holds
    # exactly what was written while it was the leaf.
    env.call("VM.destroy", vmID=vm)
    leaf = os.path.join(env.image_dir(img), top)
    qemu_img.io(leaf, "read -P 0x2a 0 64k")
    qemu_img.io(leaf, "read -P 0x11 64k 960k")
    qemu_img.io(leaf, "read -P 0x22 1M 1M")
    qemu_img.io(leaf, "read -P 0x33 2M 1M")
    base_path = os.path.join(env.image_dir(img), base)
    qemu_img.io(base_path, "read -P 0x11 0 1M")
    qemu_img.io(base_path, "read -P 0x00 1M 2M")


def test_snapshot_of_two_drives_is_atomic_and_per_drive(env):
    img_a, img_b = str(uuid.uuid4()), str(uuid.uuid4())
    a0, b0 = env.create_volume(img_a), env.create_volume(img_b)
    vm = env.create_vm([(img_a, a0), (img_b, b0)])
    a1 = env.create_volume(img_a, parent=a0)
    b1 = env.create_volume(img_b, parent=b0)
    env.call("VM.snapshot", vmID=vm, snapDrives=[
        {"domainID": env.sd, "imageID": img_a, "baseVolumeID": a0, "volumeID": a1},
        {"domainID": env.sd, "imageID": img_b, "baseVolumeID": b0, "volumeID": b1}])
    assert env.assert_four_views(vm, img_a, "vda") == [a0, a1]
    assert env.assert_four_views(vm, img_b, "vdb") == [b0, b1]


def test_failed_snapshot_changes_no_chain(env):
    """One bad drive fails the whole snapshot: no drive switches (all or none)."""
    img_a, img_b = str(uuid.uuid4()), str(uuid.uuid4())
    a0, b0 = env.create_volume(img_a), env.create_volume(img_b)
    vm = env.create_vm([(img_a, a0), (img_b, b0)])
    a1 = env.create_volume(img_a, parent=a0)
    b1 = env.create_volume(img_b, parent=b0)
    # Make b1 unusable for QEMU behind the agent's back: libvirt must fail.
    with open(os.path.join(env.image_dir(img_b), b1), "wb") as f:
        f.write(b"not a qcow2 image")
    err = None
    try:
        env.call("VM.snapshot", vmID=vm, snapDrives=[
            {"domainID": env.sd, "imageID": img_a, "baseVolumeID": a0, "volumeID": a1},
            {"domainID": env.sd, "imageID": img_b, "baseVolumeID": b0, "volumeID": b1}])
    except Exception as e:  # RpcError
        err = e
    assert err is not None and getattr(err, "code", None) == 48
    assert env.agent_chain(vm, img_a) == env.live_chain(vm, "vda") == [a0]
    assert env.agent_chain(vm, img_b) == env.live_chain(vm, "vdb") == [b0]


def test_a_new_leaf_that_is_not_a_child_of_the_drive_leaf_is_refused(env):
    """The new volume's qcow2 header must name the drive's leaf as backing
    file; the check reads that one volume (the chain below is QEMU's)."""
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    mid = env.snapshot(vm, img, base)
    new = env.create_volume(img, parent=mid)
    path = os.path.join(env.image_dir(img), new)

    def refused(why: str) -> None:
        with pytest.raises(RpcError) as e:
            env.call("VM.snapshot", vmID=vm, snapDrives=[
                {"domainID": env.sd, "imageID": img, "baseVolumeID": mid, "volumeID": new}])
        assert e.value.code == 48 and why in e.value.message, e.value
        assert env.assert_four_views(vm, img) == [base, mid]

    # Its qcow2 header names base (rebased behind the agent's back; the
    # metadata still says mid): QEMU would run base <- new.
    subprocess.run(["qemu-img", "rebase", "-u", "-b", base, "-F", "qcow2", path], check=True)
    refused(f"is not a child of {mid}")
    with open(path, "r+b") as f:
        f.write(b"not a qcow2 header")
    refused("is not a usable qcow2 image")
