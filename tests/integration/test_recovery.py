"""kill -9 of the agent: on restart, running VMs and their chains come back
from libvirt alone. Proof that no storage is read: the storage is hidden
behind an empty tmpfs mounted over it while the agent recovers (QEMU keeps
its open files and runs on)."""
from __future__ import annotations

import os
import subprocess
import uuid

from conftest import VM_PREFIX, start_agent, storage_hidden
from vmhost.testing import guestio

MiB = 1 << 20


def test_kill9_restart_reports_vms_and_chains_without_storage(env, workdir):
    vms = {}
    for _ in range(2):
        img = str(uuid.uuid4())
        base = env.create_volume(img)
        vm = env.create_vm([(img, base)])
        top = env.snapshot(vm, img, env.snapshot(vm, img, base))
        vms[vm] = (img, top)
    env.call("VM.pause", vmID=next(iter(vms)))
    before = {vm: env.call("Host.getVMFullList", vmList=[vm])[0] for vm in vms}

    env.agent.kill9()
    with storage_hidden(env.storage_root):
        agent = start_agent(env.agent.state_dir)
        env.agent = agent
        after = {i["vmId"]: i for i in agent.client.call("Host.getVMFullList")}
        stats = {s["vmId"]: s for s in agent.client.call("Host.getAllVmStats")}
        repo = agent.client.call("Host.getStorageRepoStats")

    assert set(after) == set(vms)
    for vm in vms:
        assert after[vm]["devices"] == before[vm]["devices"]
        assert after[vm]["status"] == before[vm]["status"]
        assert env.agent_chain(vm, vms[vm][0]) == env.live_chain(vm)
    assert [stats[vm]["status"] for vm in vms] == ["Paused", "Up"]
    # The storage really was unreachable while the agent recovered: its own
    # domain monitor could not read it (or had not checked yet).
    assert repo[env.sd]["valid"] is False

    # And with the storage back, the recovered VMs are fully usable.
    vm = list(vms)[1]
    img, top = vms[vm]
    new = env.snapshot(vm, img, top)
    assert env.agent_chain(vm, img)[-1] == new == env.live_chain(vm)[-1]
    guestio.write(env.dom(vm), "vda", 0x5a, 0, MiB)
    guestio.verify(env.dom(vm), "vda", 0x5a, 0, MiB)


def test_recovery_ignores_domains_without_vmhost_metadata(env, libvirtd, workdir):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    ours = env.create_vm([(img, base)])
    foreign_img = os.path.join(workdir, "foreign.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", foreign_img, "16M"], check=True)
    os.chmod(foreign_img, 0o666)
    foreign = libvirtd.createXML(f"""<domain type='qemu'><name>{VM_PREFIX}foreign</name>
      <memory unit='MiB'>16</memory><os><type arch='x86_64' machine='pc'>hvm</type></os>
      <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{foreign_img}'/><target dev='vda' bus='virtio'/></disk></devices></domain>""", 0)
    try:
        env.agent.kill9()
        env.agent = start_agent(env.agent.state_dir)
        listed = env.call("Host.getVMList", onlyUUID=True)
        assert ours in listed and foreign.UUIDString() not in listed
    finally:
        foreign.destroy()
