"""Question 10: many pivots at once on one libvirt connection.

In a storm of active merges the agent pivots many VMs at once, each with a
synchronous blockJobAbort(PIVOT) on its one libvirt connection. libvirtd
serves at most `max_client_requests` (default 5) calls of one client at a
time, and a synchronous pivot holds its slot while QEMU drains and flushes
the mirror. So: M plain domains (started paused, no agent) with an active
commit each, READY; then all M pivots at once from M threads, (a) sharing
one connection, (b) one connection each, and (c) one shared connection with
VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC (returns once QEMU was told; the pivot is
done when the live XML shows base as the leaf, polled every 20 ms as the
agent's _wait_for_pivot does). Per pivot: call -> XML shows it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
import uuid

import libvirt

from common import (LIBVIRT_URI, MiB, Bench, LibvirtJobEvents, default_out_dir, fmt_ms, host_facts,
                    log, main_guard, md_table, percentile, save_result)
from vmhost.testing import guestio
from vmhost.virt import domxml

MODES = ("shared connection", "one connection each", "shared connection, ASYNC")


def ready_domains(bench: Bench, lv: LibvirtJobEvents, count: int, size: int) -> list[dict]:
    out = []
    mark = lv.mark()
    for i in range(count):
        d = os.path.join(bench.workdir, f"p{i}-{uuid.uuid4().hex[:6]}")
        os.makedirs(d)
        os.chmod(d, 0o755)
        base, top = os.path.join(d, "base.qcow2"), os.path.join(d, "top.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(4 * size)],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                        top], check=True)
        vm_uuid = str(uuid.uuid4())
        xml = domxml.build(vm_uuid, f"{bench.prefix}pivot-{vm_uuid[:8]}", 16,
                           "kvm" if os.path.exists("/dev/kvm") else "qemu",
                           [domxml.DiskSpec(target="vda", path=top, format="qcow2")], "")
        dom = bench.conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        guestio.write(dom, "vda", 0x11, 0, size)
        dom.blockCommit("vda", None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
        out.append({"uuid": vm_uuid, "top": top, "dir": d})
    for p in out:
        lv.wait(p["uuid"], "READY", mark, timeout=300)
    return out


def pivot_all(doms: list[dict], mode: str) -> list[float]:
    shared = libvirt.open(LIBVIRT_URI)
    conns = [shared if mode != "one connection each" else libvirt.open(LIBVIRT_URI)
             for _ in doms]
    times: list[float] = [0.0] * len(doms)
    barrier = threading.Barrier(len(doms))
    flags = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    if mode.endswith("ASYNC"):
        flags |= libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC

    def one(i: int) -> None:
        dom = conns[i].lookupByUUIDString(doms[i]["uuid"])
        barrier.wait()
        started = time.perf_counter()
        dom.blockJobAbort("vda", flags)
        while doms[i]["top"] in dom.XMLDesc(0):
            time.sleep(0.02)
        times[i] = time.perf_counter() - started

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(doms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in set(conns):
        c.close()
    return times


def markdown(result: dict) -> str:
    rows = []
    for mode in MODES:
        r = result["modes"][mode]
        rows.append([mode, fmt_ms(r["p50"], 0), fmt_ms(r["p99"], 0), fmt_ms(r["max"], 0),
                     " ".join(f"{t * 1000:.0f}" for t in sorted(r["times"]))])
    table = md_table(["pivots of all VMs at once", "p50 ms", "p99 ms", "max ms",
                      "each (sorted) ms"], rows)
    notes = (f"{result['count']} plain libvirt domains (started paused, as the agent pauses a "
             f"VM for its pivot), active commit of {result['size'] // MiB} MiB each, READY; "
             f"{result['reps']} repetition(s) per mode. libvirtd's max_client_requests is the "
             "default (5). Reading: a staircase in the shared-connection row only would mean "
             "the pivots queue for libvirtd's per-client slots (the agent's one connection); "
             "the same staircase in every row means they queue below libvirt: each pivot's "
             "completion drains the mirror and flushes the base on the one disk, one after "
             "the other.")
    return "## 10. Pivots at once\n\n" + table + "\n\n" + notes + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", type=int, default=10)
    p.add_argument("--size-mib", type=int, default=32)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--out", default=default_out_dir())
    args = p.parse_args()
    size = args.size_mib * MiB
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    with Bench("pivots") as bench:
        facts = host_facts(bench.conn)
        lv = LibvirtJobEvents()
        try:
            for rep in range(args.reps):
                order = MODES if rep % 2 == 0 else MODES[::-1]
                for mode in order:
                    doms = ready_domains(bench, lv, args.vms, size)
                    samples[mode] += pivot_all(doms, mode)
                    bench.destroy_own_domains()
                    log(f"pivots: {mode}: p50 {percentile(samples[mode], 50) * 1000:.0f} ms, "
                        f"max {max(samples[mode]) * 1000:.0f} ms")
        finally:
            lv.close()
    result = {"count": args.vms, "size": size, "reps": args.reps, "host": facts,
              "modes": {m: {"p50": percentile(t, 50), "p99": percentile(t, 99), "max": max(t),
                            "times": t} for m, t in samples.items()}}
    save_result(args.out, "pivots", result, markdown(result))
    return 0


if __name__ == "__main__":
    main_guard(main)
