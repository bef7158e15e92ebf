"""Question 8: the snapshot freeze window.

VM.snapshot of a VM with 1 and with 4 drives (the new leaves created before,
through Volume.create, not timed), p50/p99 of the call, against the floor:
libvirt's own snapshotCreateXML with the same flags (disk-only, reuse-ext,
no-metadata, atomic) on a plain libvirt domain with the same drive XML
(vmhost.virt.domxml.build) and overlays pre-created with qemu-img, from this
process. The two alternate, call by call, on running (halted) guests.

Guest-visible pause: libvirt's lifecycle events SUSPENDED / RESUMED on each
domain during the calls (a disk-only snapshot needs none; an agent that paused
the guest would show here), counted and timed.

Target: VM.snapshot p50 <= 1.3 x the floor's p50, 4 drives.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
import uuid

import libvirt

from common import (LIBVIRT_URI, MiB, Bench, BenchVm, default_out_dir, fmt_ms, host_facts, log,
                    main_guard, md_table, percentile, save_result, verdict)
from vmhost.storage import qemu_img
from vmhost.virt import domxml
from vmhost.virt.snapshot import SNAPSHOT_FLAGS, SnapshotTarget, snapshot_xml

DISK = 64 * MiB
TARGETS = "abcdefgh"


class Pauses:
    """SUSPENDED / RESUMED lifecycle events per domain UUID, with their time."""

    def __init__(self):
        from vmhost.virt.connection import Connection
        self._lock = threading.Lock()
        self.events: list[tuple[float, str, int]] = []
        self._connection = Connection(LIBVIRT_URI)
        self._connection.lifecycle_listeners.append(self._on_event)
        self._connection.get()

    def _on_event(self, vm_uuid: str, event: int, detail: int) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
            with self._lock:
                self.events.append((time.perf_counter(), vm_uuid, event))

    def between(self, vm_uuid: str, t0: float, t1: float) -> tuple[int, float]:
        """(suspensions, seconds suspended) of the VM in [t0, t1 + 0.2 s]."""
        with self._lock:
            evs = [(t, e) for t, u, e in self.events if u == vm_uuid and t0 <= t <= t1 + 0.2]
        count, paused, since = 0, 0.0, None
        for t, e in evs:
            if e == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
                count, since = count + 1, t
            elif since is not None:
                paused, since = paused + t - since, None
        return count, paused

    def close(self) -> None:
        self._connection.close()


# --- the two sides ---------------------------------------------------------------

def agent_vm(bench: Bench, drives: int) -> tuple[BenchVm, list[dict]]:
    """A VM through VM.create with `drives` one-volume images; drive 0 boots
    the halt sector."""
    devices = []
    for i in range(drives):
        img = str(uuid.uuid4())
        vol = bench.create_volume(img, size=DISK)
        if i == 0:
            qemu_img.io(bench.volume_path(img, vol), f"write -s {bench._boot_sector} 0 512")
        devices.append({"device": "disk", "domainID": bench.sd, "imageID": img, "volumeID": vol})
    vm_id = str(uuid.uuid4())
    bench.call("VM.create", vmID=vm_id, vmParams={
        "vmName": f"{bench.prefix}{vm_id[:8]}", "memSize": 16, "devices": devices})
    vm = BenchVm(bench, vm_id, devices[0]["imageID"], [devices[0]["volumeID"]])
    return vm, devices


def agent_snapshot(bench: Bench, vm: BenchVm, devices: list[dict]) -> float:
    drives = []
    for d in devices:
        new = bench.create_volume(d["imageID"], parent=d["volumeID"], size=DISK)
        drives.append({"domainID": bench.sd, "imageID": d["imageID"],
                       "baseVolumeID": d["volumeID"], "volumeID": new})
        d["volumeID"] = new
    started = time.perf_counter()
    bench.call("VM.snapshot", vmID=vm.id, snapDrives=drives)
    return time.perf_counter() - started


class FloorVm:
    """A plain libvirt domain (no vmhost metadata: no agent adopts it) with
    the same drive XML; its overlays are made with qemu-img."""

    def __init__(self, bench: Bench, drives: int):
        self.bench = bench
        self.dir = os.path.join(bench.workdir, f"floor-{uuid.uuid4().hex[:6]}")
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        self.leaves = []
        for i in range(drives):
            path = os.path.join(self.dir, f"d{i}-0.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(DISK)],
                           check=True)
            if i == 0:
                qemu_img.io(path, f"write -s {bench._boot_sector} 0 512")
            self.leaves.append(path)
        self.id = str(uuid.uuid4())
        disks = [domxml.DiskSpec(target=f"vd{TARGETS[i]}", path=p, format="qcow2")
                 for i, p in enumerate(self.leaves)]
        xml = domxml.build(self.id, f"{bench.prefix}floor-{self.id[:8]}", 16, "kvm"
                           if os.path.exists("/dev/kvm") else "qemu", disks, "")
        bench.conn.createXML(xml, 0)
        self.vm = BenchVm(bench, self.id, "", [])
        self.generation = 0

    def snapshot(self) -> float:
        self.generation += 1
        targets = []
        for i, leaf in enumerate(self.leaves):
            new = os.path.join(self.dir, f"d{i}-{self.generation}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", leaf, "-F", "qcow2",
                            new], check=True)
            targets.append(SnapshotTarget(drive=f"vd{TARGETS[i]}", path=new))
            self.leaves[i] = new
        dom = self.vm.dom()
        xml = snapshot_xml(targets, [])
        started = time.perf_counter()
        dom.snapshotCreateXML(xml, SNAPSHOT_FLAGS)
        return time.perf_counter() - started


# --- the run --------------------------------------------------------------------------

def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values) if values else None}


def run(bench: Bench, drive_counts: list[int], reps: int, pauses: Pauses) -> dict:
    out = {}
    for drives in drive_counts:
        vm, devices = agent_vm(bench, drives)
        floor = FloorVm(bench, drives)
        bench.wait_halted([vm, floor.vm])
        times = {"agent": [], "floor": [], "ping": []}
        paused = {"agent": [0, 0.0], "floor": [0, 0.0]}
        for rep in range(reps):
            order = ("agent", "floor") if rep % 2 == 0 else ("floor", "agent")
            started = time.perf_counter()
            bench.call("Host.ping")   # the API's own floor, on the same connection
            times["ping"].append(time.perf_counter() - started)
            for side in order:
                t0 = time.perf_counter()
                if side == "agent":
                    times[side].append(agent_snapshot(bench, vm, devices))
                    target = vm.id
                else:
                    times[side].append(floor.snapshot())
                    target = floor.id
                n, s = pauses.between(target, t0, time.perf_counter())
                paused[side][0] += n
                paused[side][1] += s
        out[drives] = {side: {**summary(times[side]), "suspensions": paused[side][0],
                              "suspended_s": paused[side][1], "times": times[side]}
                       for side in ("agent", "floor")}
        out[drives]["ping"] = summary(times["ping"])
        out[drives]["chain"] = [1, reps + 1]
        a, f = out[drives]["agent"], out[drives]["floor"]
        out[drives]["ratio"] = a["p50"] / f["p50"]
        out[drives]["overhead_p50_s"] = a["p50"] - f["p50"]
        log(f"snapshot: {drives} drive(s): VM.snapshot p50 {fmt_ms(a['p50'])} ms, floor "
            f"{fmt_ms(f['p50'])} ms, ratio {out[drives]['ratio']:.2f}, suspensions "
            f"{a['suspensions']} / {f['suspensions']}")
    return out


def markdown(result: dict) -> str:
    rows = []
    for drives, r in result["drives"].items():
        a, f = r["agent"], r["floor"]
        target = f"{r['ratio']:.2f}x" + (f" ({verdict(r['ratio'] <= 1.3)})" if int(drives) == 4
                                         else "")
        rows.append([drives, fmt_ms(a["p50"]), fmt_ms(a["p99"]), fmt_ms(f["p50"]),
                     fmt_ms(f["p99"]), fmt_ms(r["overhead_p50_s"]), fmt_ms(r["ping"]["p50"], 2),
                     target,
                     f"{a['suspensions']} ({fmt_ms(a['suspended_s'])} ms) / "
                     f"{f['suspensions']} ({fmt_ms(f['suspended_s'])} ms)"])
    table = md_table(["drives", "VM.snapshot p50 ms", "VM.snapshot p99 ms",
                      "libvirt floor p50 ms", "floor p99 ms", "agent overhead p50 ms",
                      "of it: API round trip (Host.ping p50) ms",
                      "VM.snapshot / floor p50 (target <= 1.3 with 4 drives)",
                      "guest suspensions (time) agent / floor"], rows)
    notes = (f"{result['reps']} snapshots per side and drive count, alternating call by call, "
             "on running guests (halt boot sector) with 64 MiB qcow2 drives (cache='none', "
             "io as domxml.build makes them). *VM.snapshot*: the API call as a client sees it "
             "(HTTP, validation, the chain check and storage preparation outside the VM lock, "
             "the re-check, the write-ahead persist, libvirt's call, the live XML re-read); the "
             "new leaves were created with Volume.create before, untimed. *Floor*: "
             "`snapshotCreateXML` with the agent's flags on a plain domain with the same drive "
             "XML, overlays made with qemu-img, untimed. Each drive's chain grows from 1 to "
             f"{result['reps'] + 1} volumes during the run (both sides alike); the agent's "
             "storage preparation reads the new leaf only (its metadata and qcow2 header), so "
             "its share does not grow with the chain. *Guest suspensions*: libvirt "
             "SUSPENDED/RESUMED lifecycle events of the domain during the call; a disk-only "
             "external snapshot runs QEMU's `transaction` without stopping the vCPUs, so the "
             "guest-visible freeze is the time QEMU holds the BQL for the drain and the "
             "switch, inside the floor's time.")
    return "## 8. Snapshot freeze window\n\n" + table + "\n\n" + notes + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drives", default="1,4")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=default_out_dir())
    args = p.parse_args()
    with Bench("snapshot") as bench:
        facts = host_facts(bench.conn)
        pauses = Pauses()
        try:
            drives = run(bench, [int(d) for d in args.drives.split(",")], args.reps, pauses)
        finally:
            pauses.close()
    result = {"drives": drives, "reps": args.reps, "host": facts}
    four = drives.get(4)
    result["ok"] = None if four is None else four["ratio"] <= 1.3
    save_result(args.out, "snapshot_freeze", result, markdown(result))
    return 0


if __name__ == "__main__":
    main_guard(main)
