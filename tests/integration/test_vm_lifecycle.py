"""VM life cycle on real libvirt: create, pause, cont, stats, destroy, Down
detection, ILLEGAL chains refused, volumes freed after destroy."""
from __future__ import annotations

import os
import uuid

import pytest

from conftest import wait_for

from vmhost.client import RpcError
from vmhost.storage.metadata import Legality, VolumeMetadata


def test_capabilities_report_the_accelerator_in_use(env):
    caps = env.call("Host.getCapabilities")
    assert caps["virtType"] in ("kvm", "qemu")
    assert caps["kvm"] is (caps["virtType"] == "kvm")
    assert caps["liveMerge"] == "true"
    img = str(uuid.uuid4())
    vm = env.create_vm([(img, env.create_volume(img))])
    assert f"type='{caps['virtType']}'" in env.dom(vm).XMLDesc(0).split(">")[0].replace('"', "'")


def test_pause_cont_stats_destroy(env):
    img = str(uuid.uuid4())
    vm = env.create_vm([(img, env.create_volume(img))])
    stats = env.call("VM.getStats", vmID=vm)
    assert len(stats) == 1 and stats[0]["status"] == "Up" and stats[0]["vmJobs"] == {}
    env.call("VM.pause", vmID=vm)
    assert env.call("VM.getStats", vmID=vm)[0]["status"] == "Paused"
    assert env.dom(vm).state()[0] == 3  # VIR_DOMAIN_PAUSED
    env.call("VM.cont", vmID=vm)
    assert env.call("VM.getStats", vmID=vm)[0]["status"] == "Up"
    assert env.call("Host.getVMList") == [{"vmId": vm, "status": "Up"}]
    assert [s["vmId"] for s in env.call("Host.getAllVmStats")] == [vm]
    with pytest.raises(RpcError) as e:
        env.call("VM.create", vmID=vm, vmParams={"vmName": "vmhost-test-again", "memSize": 64,
                                                 "devices": []})
    assert e.value.code == 4
    env.call("VM.destroy", vmID=vm)
    assert env.call("Host.getVMList") == []
    with pytest.raises(RpcError) as e:
        env.call("VM.getStats", vmID=vm)
    assert e.value.code == 1


def test_qemu_death_is_reported_down_and_frees_volumes(env):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    with open(f"/run/libvirt/qemu/{env.dom(vm).name()}.pid") as f:
        os.kill(int(f.read()), 9)
    wait_for(lambda: env.call("VM.getStats", vmID=vm)[0]["status"] == "Down", what="Down")
    # A Down VM holds no volume: its leaf can be deleted.
    env.call("Volume.delete", storagedomainID=env.sd, imageID=img, volumeID=base)
    env.call("VM.destroy", vmID=vm)


def test_illegal_chain_is_refused_unless_allowed(env):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    meta = os.path.join(env.image_dir(img), base + ".meta")
    with open(meta, "rb") as f:
        md = VolumeMetadata.parse(f.read())
    with open(meta, "wb") as f:
        f.write(md.replace(legality=Legality.ILLEGAL).dump())
    with pytest.raises(RpcError) as e:
        env.create_vm([(img, base)])
    assert e.value.code == 227 and base in e.value.message
    assert env.call("Host.getVMList") == []
    vm = env.create_vm([(img, base)], allowIllegal=True)
    assert env.call("VM.getStats", vmID=vm)[0]["status"] == "Up"


def test_delete_after_destroy_rechecks_leaf(env):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    top = env.snapshot(vm, img, base)
    env.call("VM.destroy", vmID=vm)
    env.call("Volume.delete", storagedomainID=env.sd, imageID=img, volumeID=top)
    info = env.call("Volume.getInfo", storagedomainID=env.sd, imageID=img, volumeID=base)
    assert info["voltype"] == "LEAF"
    assert env.call("StorageDomain.getVolumes", storagedomainID=env.sd, imageID=img) == [base]
    assert not os.path.exists(os.path.join(env.image_dir(img), top))
    assert not os.path.exists(os.path.join(env.image_dir(img), top + ".meta"))
