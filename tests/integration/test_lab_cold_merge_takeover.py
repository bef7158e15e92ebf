"""A cold merge (SDM.merge) whose host goes away is finished by another host of
the lab, under the image's lease (vmhost.storage.coldmerge, `_may_take_over`).

host1 runs the cold merge of base <- top <- leaf (data in every layer, written
offline, and into a reference image); it stops at a cold-merge failpoint:
- agent-killed: its agent dies there (SIGKILL; host1 itself runs on). sanlock
  releases the dead agent's lease at once: host2's next scan of the domain's job
  records (every 10 s) takes the job over. In `make test`.
- poweroff: its agent freezes there holding the lease, then host1 loses power.
  host2 waits for the dead host's lease to expire (about 70 s) before it takes
  the job over. `faults` (lease expiry).
Either way host2 finishes the job: Host.getJobs on host2 shows it done, the
qcow2 chain and the metadata are base <- leaf, top is ILLEGAL (merged into the
base), the base's GEN moved on, the leaf reads like the reference, no record
is left on the domain.
"""
from __future__ import annotations

import os
import time
import uuid

import pytest

from conftest import wait_for
from labutil import (MiB, agent_pid, boot_with_failpoint, create_volume,  # noqa: F401
                     lab_cli, lab_dir, lab_up, read_metadata,  # lab_dir: fixture
                     shared_domain, stopped)
from scenario import record
from vmhost.client import Client, TransportError
from vmhost.ids import BLANK_UUID
from vmhost.storage import qemu_img

CASES = [
    pytest.param("agent-killed", "coldmerge.commit.after", id="agent-killed"),
    pytest.param("poweroff", "coldmerge.rebase.after:1:stop", id="poweroff",
                 marks=pytest.mark.faults),
]


def _chain(img_dir: str, leaf: str) -> tuple[list[str], list[str]]:
    """(qcow2 chain, metadata chain) from leaf, base first."""
    qemu = [os.path.basename(i["filename"]) for i in reversed(
        qemu_img.info(os.path.join(img_dir, leaf), backing_chain=True))]
    meta, vol = [], leaf
    while vol != BLANK_UUID:
        meta.append(vol)
        vol = read_metadata(img_dir, vol).parent
    return qemu, meta[::-1]


def _status(url: str, job: str) -> str | None:
    with Client(url, timeout=30) as c:
        return c.call("Host.getJobs", job_ids=[job]).get(job, {}).get("status")


def _answers(url: str) -> bool:
    try:
        with Client(url, timeout=2) as c:
            c.call("Host.ping")
        return True
    except (TransportError, OSError):
        return False


@pytest.mark.parametrize("how,point", CASES)
def test_another_host_finishes_a_cold_merge_under_the_image_lease(lab_dir, workdir, how, point):
    storage = os.path.join(workdir, "shared")
    hosts = lab_up(lab_dir, storage, 2)
    boot_with_failpoint(lab_dir, "host1", point)
    sd = shared_domain(hosts, storage)
    img, job = str(uuid.uuid4()), str(uuid.uuid4())
    img_dir = os.path.join(storage, sd, "images", img)
    reference = os.path.join(workdir, "reference.qcow2")
    qemu_img.create(reference, "qcow2", size=64 * MiB)
    with Client(hosts[0]["url"], timeout=60) as h1:
        chain: list[str] = []
        for i in range(3):
            chain.append(create_volume(h1, sd, img, parent=chain[-1] if chain else None))
            for pattern, offset, length in ((0x10 + i, i * 8 * MiB, 4 * MiB),
                                            (0x40 + i, 0, 64 * 1024)):
                cmd = f"write -P {pattern:#x} {offset} {length}"
                qemu_img.io(os.path.join(img_dir, chain[-1]), cmd)
                qemu_img.io(reference, cmd)
        base, top, leaf = chain
        gen0 = h1.call("Volume.getInfo", storagedomainID=sd, imageID=img,
                       volumeID=base)["generation"]
        try:
            h1.call("SDM.merge", job_id=job, subchain_info={
                "sd_id": sd, "img_id": img, "base_id": base, "top_id": top})
        except TransportError:
            pass                    # died answering: the record was written before
    name = point.split(":")[0]
    if how == "agent-killed":
        wait_for(lambda: not _answers(hosts[0]["url"]), 60, f"host1's agent to die at {name}")
    else:
        agent = agent_pid(lab_dir, "host1")
        wait_for(lambda: stopped(agent), 60, f"host1's agent to stop at {name}")
        lab_cli(lab_dir, "poweroff", "host1")
    gone = time.monotonic()
    wait_for(lambda: _status(hosts[1]["url"], job) == "done", 150,
             f"host2 to finish host1's cold merge ({how})")
    waited = time.monotonic() - gone
    if how == "poweroff":
        assert waited >= 60, f"taken over {waited:.0f}s after the power cut: before expiry"
    else:
        assert waited <= 40, f"taken over only {waited:.0f}s after the agent died"

    assert _chain(img_dir, leaf) == ([base, leaf], [base, leaf])
    top_md, base_md = read_metadata(img_dir, top), read_metadata(img_dir, base)
    assert top_md.legality.value == "ILLEGAL" and top_md.merged_into == base
    assert base_md.legality.value == "LEGAL" and base_md.generation == gen0 + 1
    assert qemu_img.compare(reference, os.path.join(img_dir, leaf))
    # (A temp file of host1's is its own business: host2 leaves it.)
    assert [n for n in os.listdir(os.path.join(storage, sd, "jobs")) if n.endswith(".json")] == []
    # The image is free again: host2 changes it (the merged-away volume goes).
    with Client(hosts[1]["url"], timeout=60) as h2:
        h2.call("Volume.delete", storagedomainID=sd, imageID=img, volumeID=top)
    record({"scenario": "fleet-cold-takeover", "point": name, "kind": "internal",
            "outcome": how, "converged": True, "seconds": round(waited, 1), "final": "done",
            "merged": True, "data_ok": True, "leaks": 0})
