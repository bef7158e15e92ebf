"""The four views of a drive's chain, which must tell one story, each base first:

- the agent's (Host.getVMFullList volumeChain),
- libvirt's (the live domain XML's backingStore),
- the images' own (qemu-img info --backing-chain from the agent's leaf),
- the storage metadata's (each volume's .meta PUUID, walked from that leaf).
"""
from __future__ import annotations

import os

import libvirt

from vmhost.client import Client
from vmhost.ids import BLANK_UUID
from vmhost.storage import qemu_img
from vmhost.storage.metadata import VolumeMetadata
from vmhost.virt import domxml

MAX_DEPTH = 64     # a loop in bad metadata ends here


def agent_chain(client: Client, vm_id: str, drive: int = 0) -> list[str]:
    info = client.call("Host.getVMFullList", vmList=[vm_id])[0]
    return [v["volumeID"] for v in info["devices"][drive]["volumeChain"]]


def live_chain(dom: libvirt.virDomain, target: str = "vda") -> list[str]:
    return [n.volume for n in domxml.live_disks(dom.XMLDesc(0))[target].chain]


def qemu_chain(img_dir: str, leaf: str) -> list[str]:
    infos = qemu_img.info(os.path.join(img_dir, leaf), backing_chain=True)
    return [os.path.basename(i["filename"]) for i in reversed(infos)]


def read_metadata(img_dir: str, vol: str) -> VolumeMetadata:
    with open(os.path.join(img_dir, vol + ".meta"), "rb") as f:
        return VolumeMetadata.parse(f.read())


def metadata_chain(img_dir: str, leaf: str) -> list[str]:
    chain, vol = [], leaf
    while vol != BLANK_UUID and len(chain) < MAX_DEPTH:
        chain.append(vol)
        vol = read_metadata(img_dir, vol).parent
    return chain[::-1]


def four_views(client: Client, dom: libvirt.virDomain, vm_id: str,
               img_dir: str) -> dict[str, list[str]]:
    """The four views of the VM's first drive (vda), by name."""
    agent = agent_chain(client, vm_id)
    return {"Host.getVMFullList": agent,
            "libvirt live XML": live_chain(dom),
            "qemu-img backing-chain": qemu_chain(img_dir, agent[-1]),
            "metadata PUUIDs": metadata_chain(img_dir, agent[-1])}
