"""The engine's everyday flow on one drive, on real QEMU: snapshot, internal
merge, snapshot, active merge, snapshot, merge, snapshot again, with no
merged volume deleted in between (the engine may delete them late or never).
After each step the four views of the chain agree, the storage metadata
tells the chain (parents, legality, voltype) and the merged-away volumes
apart, and the guest reads every write back (issue 10, finding 1).
And Volume.delete killed half-way converges (finding 8)."""
from __future__ import annotations

import os
import uuid

from conftest import Guest, start_agent, wait_for
from scenario import record
from vmhost.client import TransportError
from vmhost.failpoints import ENV
from vmhost.storage import qemu_img

MiB = 1 << 20


class Flow:
    def __init__(self, env, workdir):
        self.env = env
        self.img = str(uuid.uuid4())
        self.chain = [env.create_volume(self.img)]
        self.vm = env.create_vm([(self.img, self.chain[0])])
        self.guest = Guest(env, self.vm, workdir)
        self.merged: dict[str, str] = {}     # merged-away volume -> the base it went into
        self.layers = 0

    def write_layer(self) -> None:
        """New data in the leaf, and an overwrite of what older layers wrote."""
        n = self.layers
        self.guest.write(0x10 + n, n * 2 * MiB, MiB)
        self.guest.write(0x40 + n, 0, 128 * 1024)
        self.layers += 1

    def snapshot(self) -> None:
        self.chain.append(self.env.snapshot(self.vm, self.img, self.chain[-1]))
        self.write_layer()
        self.check()

    def merge(self, base: str, top: str) -> None:
        env = self.env
        job = env.call("VM.merge", vmID=self.vm,
                       drive={"domainID": env.sd, "imageID": self.img,
                              "volumeID": self.chain[-1]},
                       baseVolUUID=base, topVolUUID=top)
        env.wait_job_gone(self.vm, job)
        outcome = [h for h in env.call("Host.getJobHistory") if h["id"] == job]
        assert outcome and outcome[-1]["state"] == "DONE", outcome
        b, t = self.chain.index(base), self.chain.index(top)
        self.merged.update({v: base for v in self.chain[b + 1:t + 1]})
        self.chain = self.chain[:b + 1] + self.chain[t + 1:]
        self.check()

    def check(self) -> None:
        env, img = self.env, self.img
        assert env.assert_four_views(self.vm, img) == self.chain
        mds = {v: env.metadata(img, v) for v in env.call(
            "StorageDomain.getVolumes", storagedomainID=env.sd, imageID=img)}
        assert set(mds) == set(self.chain) | set(self.merged)
        assert [mds[v].voltype.value for v in self.chain] == \
            ["INTERNAL"] * (len(self.chain) - 1) + ["LEAF"]
        assert {mds[v].legality.value for v in self.chain} == {"LEGAL"}
        for vol, base in self.merged.items():
            assert mds[vol].legality.value == "ILLEGAL", vol
            assert mds[vol].merged_away and mds[vol].merged_into == base, vol
        self.guest.assert_intact(img)


def test_snapshot_and_merge_cycles_without_deleting_merged_volumes(env, workdir):
    f = Flow(env, workdir)
    f.write_layer()
    f.snapshot()                                # base <- s1
    f.snapshot()                                # base <- s1 <- s2
    base, s1, s2 = f.chain
    f.merge(base, s1)                           # internal: base <- s2
    f.snapshot()                                # base <- s2 <- s3
    s3 = f.chain[-1]
    f.merge(s2, s3)                             # active: base <- s2; s3 still names s2
    f.snapshot()                                # finding 1: refused before the fix
    s4 = f.chain[-1]
    f.merge(base, s4)                           # active, everything into the base
    assert f.chain == [base]
    f.snapshot()                                # base <- s5, with four merged-away volumes
    s5 = f.chain[-1]

    # The engine deletes the merged volumes at last, in any order (s2 before
    # s3, which names it as parent): no live volume's voltype changes.
    for vol in (s2, s1, s4, s3):
        env.call("Volume.delete", storagedomainID=env.sd, imageID=f.img, volumeID=vol)
        del f.merged[vol]
        f.check()
    # A retried delete (the engine got no answer) succeeds and changes nothing.
    assert env.call("Volume.delete", storagedomainID=env.sd, imageID=f.img, volumeID=s3) is True
    f.check()
    assert sorted(os.listdir(env.image_dir(f.img))) == \
        sorted([base, s5, base + ".meta", s5 + ".meta"])

    # Offline, from the files alone: every layer's writes read back.
    env.call("VM.destroy", vmID=f.vm)
    assert qemu_img.compare(f.guest.reference, os.path.join(env.image_dir(f.img), s5))


def test_finding8_delete_killed_after_files_removed_converges(env, workdir):
    """The engine made a snapshot volume, VM.snapshot failed, and its undo
    (Volume.delete) kills the agent between removing the files and fixing
    the parent's voltype. After a restart the next snapshot works and the
    engine's retry of the delete succeeds."""
    f = Flow(env, workdir)
    f.write_layer()
    f.snapshot()                                # base <- s1
    s1 = f.chain[-1]
    undone = env.create_volume(f.img, parent=s1)
    env.agent.kill9()
    env.agent = start_agent(env.agent.state_dir, env={ENV: "storage.delete.files_removed"})
    proc = env.agent.proc
    try:
        env.call("Volume.delete", storagedomainID=env.sd, imageID=f.img, volumeID=undone)
    except TransportError:
        pass
    wait_for(lambda: proc.poll() is not None, 30, "the agent to die at the failpoint")
    env.agent = start_agent(env.agent.state_dir)
    assert not os.path.exists(os.path.join(env.image_dir(f.img), undone))
    assert env.metadata(f.img, s1).voltype.value == "INTERNAL"   # what the crash left
    f.snapshot()                                # base <- s1 <- s2: not refused
    assert env.call("Volume.delete", storagedomainID=env.sd, imageID=f.img,
                    volumeID=undone) is True
    f.check()
    record({"scenario": "delete-crash", "point": "storage.delete.files_removed", "kind": "-",
            "outcome": "killed", "converged": True, "seconds": 0, "final": "gone",
            "merged": False, "data_ok": True, "leaks": 0})
