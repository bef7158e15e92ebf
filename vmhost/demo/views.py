"""The four views of a drive's chain, which must tell one story:

- the agent's (Host.getVMFullList volumeChain),
- libvirt's (the live domain XML's backingStore),
- the images' own (qemu-img info --backing-chain),
- the storage metadata's (each volume's .meta PUUID, walked from the leaf).
"""
from __future__ import annotations

import os

from vmhost.demo.stage import DemoVm, Stage
from vmhost.ids import BLANK_UUID
from vmhost.storage import qemu_img
from vmhost.storage.metadata import VolumeMetadata

COLUMN = 24


def agent_chain(stage: Stage, vm: DemoVm) -> list[str]:
    drive = stage.call("Host.getVMFullList", vmList=[vm.id])[0]["devices"][0]
    return [v["volumeID"] for v in drive["volumeChain"]]


def qemu_chain(stage: Stage, vm: DemoVm, leaf: str) -> list[str]:
    infos = qemu_img.info(os.path.join(stage.image_dir(vm.img), leaf), backing_chain=True)
    return [os.path.basename(i["filename"]) for i in reversed(infos)]


def metadata_chain(stage: Stage, vm: DemoVm, leaf: str) -> list[str]:
    chain, vol = [], leaf
    while vol != BLANK_UUID and len(chain) < 64:   # a loop in bad metadata ends here
        chain.append(vol)
        with open(os.path.join(stage.image_dir(vm.img), vol + ".meta"), "rb") as f:
            vol = VolumeMetadata.parse(f.read()).parent
    return chain[::-1]


def four_views(stage: Stage, vm: DemoVm) -> dict[str, list[str]]:
    agent = agent_chain(stage, vm)
    leaf = agent[-1]
    return {"Host.getVMFullList": agent,
            "libvirt live XML": stage.live_chain(vm),
            "qemu-img backing-chain": qemu_chain(stage, vm, leaf),
            "metadata PUUIDs": metadata_chain(stage, vm, leaf)}


def table(vm: DemoVm, views: dict[str, list[str]]) -> list[str]:
    """The views side by side, base first, one row per position in the chain."""
    rows = [" " * 4 + "".join(name.ljust(COLUMN) for name in views)]
    for n in range(max(len(chain) for chain in views.values())):
        cells = [vm.label(chain[n]) if n < len(chain) else "-" for chain in views.values()]
        rows.append(f"{n:<4}" + "".join(c.ljust(COLUMN) for c in cells))
    return rows
