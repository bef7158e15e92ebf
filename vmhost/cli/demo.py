"""`vmhost demo`: the agent's main job on embedded defaults.

Starts an agent with a local file storage domain under the state dir, creates
a VM, takes two live snapshots with guest writes in between, prints the chain
as the agent reports it beside `qemu-img info --backing-chain`, checks the
guest data, cleans up and exits 0 (1 if any view disagrees).
"""
from __future__ import annotations

import os
import shutil
import uuid

import libvirt

from vmhost.cli.agentproc import AgentProcess
from vmhost.client import Client
from vmhost.ids import BLANK_UUID
from vmhost.storage import qemu_img
from vmhost.virt import guestio

MiB = 1 << 20


def run_demo(state_dir: str, keep: bool = False) -> int:
    shutil.rmtree(state_dir, ignore_errors=True)
    storage_root = os.path.join(state_dir, "storage")
    os.makedirs(storage_root, mode=0o755)
    os.chmod(state_dir, 0o755)
    agent = AgentProcess(os.path.join(state_dir, "agent"),
                         log_path=os.path.join(state_dir, "agent.log"),
                         extra_args=["--monitor-interval", "1"])
    ok = False
    try:
        agent.start().wait_ready()
        ok = _demo(agent.client, storage_root, keep)
    finally:
        agent.stop()
        if not keep and ok:
            shutil.rmtree(state_dir, ignore_errors=True)
    print("demo: OK" if ok else f"demo: FAILED (agent log in {state_dir}/agent.log)")
    return 0 if ok else 1


def _demo(client: Client, storage_root: str, keep: bool) -> bool:
    sd, img, vm = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    vols = [str(uuid.uuid4()) for _ in range(3)]
    caps = client.call("Host.getCapabilities")
    print(f"agent {caps['version']}: virtType={caps['virtType']} kvm={caps['kvm']}")
    client.call("StorageDomain.create", storagedomainID=sd, domainType="localfs",
                typeArgs=storage_root, name="demo")
    client.call("Volume.create", storagedomainID=sd, imageID=img, volumeID=vols[0],
                size=64 * MiB, volFormat="COW", preallocate="SPARSE", diskType="DATA",
                desc="demo base", srcImgUUID=BLANK_UUID, srcVolUUID=BLANK_UUID)
    client.call("VM.create", vmID=vm, vmParams={
        "vmName": f"demo-{vm[:8]}", "memSize": 64,
        "devices": [{"device": "disk", "domainID": sd, "imageID": img, "volumeID": vols[0]}]})
    dom = libvirt.open("qemu:///system").lookupByUUIDString(vm)
    writes = [(0x11, 0), (0x22, 1 * MiB), (0x33, 2 * MiB)]
    guestio.write(dom, "vda", writes[0][0], writes[0][1], MiB)
    for i in (1, 2):
        client.call("Volume.create", storagedomainID=sd, imageID=img, volumeID=vols[i],
                    size=64 * MiB, volFormat="COW", preallocate="SPARSE", diskType="DATA",
                    desc=f"demo snapshot {i}", srcImgUUID=img, srcVolUUID=vols[i - 1])
        client.call("VM.snapshot", vmID=vm, snapDrives=[
            {"domainID": sd, "imageID": img, "baseVolumeID": vols[i - 1], "volumeID": vols[i]}])
        guestio.write(dom, "vda", writes[i][0], writes[i][1], MiB)
        print(f"snapshot {i}: leaf is now {vols[i]}")
    ok = _show_chain(client, vm)
    for pattern, offset in writes:
        guestio.verify(dom, "vda", pattern, offset, MiB)
    print("guest data: every write reads back from the final chain")
    if not keep:
        client.call("VM.destroy", vmID=vm)
        for vol in reversed(vols):
            client.call("Volume.delete", storagedomainID=sd, imageID=img, volumeID=vol)
        print("cleaned up: VM destroyed, volumes deleted")
    return ok


def _show_chain(client: Client, vm: str) -> bool:
    drive = client.call("Host.getVMFullList", vmList=[vm])[0]["devices"][0]
    agent_chain = [v["volumeID"] for v in drive["volumeChain"]]
    infos = qemu_img.info(drive["path"], backing_chain=True)
    qemu_chain = [os.path.basename(i["filename"]) for i in reversed(infos)]
    print(f"\n{'#':<3}{'agent (Host.getVMFullList)':<40}{'qemu-img info --backing-chain':<40}")
    for n in range(max(len(agent_chain), len(qemu_chain))):
        a = agent_chain[n] if n < len(agent_chain) else "-"
        q = qemu_chain[n] if n < len(qemu_chain) else "-"
        print(f"{n:<3}{a:<40}{q:<40}")
    agree = agent_chain == qemu_chain
    print(f"chains {'agree' if agree else 'DISAGREE'} (base first)\n")
    return agree
