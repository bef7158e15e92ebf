"""Question 9: which drive configuration serves guests and merges best.

Why does QEMU's active commit trail an offline `qemu-img commit`? The
offline commit is itself a mirror job (qemu-img runs commit_active_start)
with cache=none and the thread-pool AIO; a live drive as domxml.build makes
it uses cache='none' io='native' (Linux AIO). So the same data is committed
live under several drive configurations, in the same run, three runs, beside
the offline commit and a raw dd copy of the same size:

- guest write: `size` of data written through the drive (qemu-io in the
  monitor: QEMU's block layer as the guest's virtio requests reach it);
- live internal commit (base <- top (data) <- leaf) to libvirt's COMPLETED;
- live active commit (base <- top (data) = leaf) to READY (the copy; the
  pivot is not QEMU's throughput and is timed apart in section 2).

Plain libvirt domains started paused (the copy and qemu-io run without
vCPUs; no firmware CPU), no agent: only the drive XML differs. Each case on
fresh files; the order of the configurations rotates between runs.
MB/s is 10^6 bytes per second.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
import uuid

import libvirt

from common import (GiB, MiB, Bench, LibvirtJobEvents, default_out_dir, fmt_ms, host_facts, log,
                    main_guard, md_table, median, save_result)
from merge_throughput import dd_copy, offline_commit
from vmhost.testing import guestio
from vmhost.virt import domxml

PATTERN = 0x3A
CAPACITY = 2 * GiB
# name -> (cache, io); domxml.DRIVE_CACHE / DRIVE_IO is what the agent builds.
CONFIGS = {
    "none/threads": ("none", "threads"),
    "none/native": ("none", "native"),
    "none/io_uring": ("none", "io_uring"),
}
AGENT_CONFIG = f"{domxml.DRIVE_CACHE}/{domxml.DRIVE_IO}"


def mb_s(size: int, seconds: float) -> float:
    return size / 1e6 / seconds


def qcow2(path: str, backing: str | None = None) -> str:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    subprocess.run(args + [path, str(CAPACITY)], check=True)
    return path


def domain_xml(name: str, vm_uuid: str, leaf: str, cache: str, io: str) -> str:
    xml = domxml.build(vm_uuid, name, 16, "kvm" if os.path.exists("/dev/kvm") else "qemu",
                       [domxml.DiskSpec(target="vda", path=leaf, format="qcow2")], "")
    return xml.replace(f"cache='{domxml.DRIVE_CACHE}' io='{domxml.DRIVE_IO}'",
                       f"cache='{cache}' io='{io}'")


def one_case(bench: Bench, lv: LibvirtJobEvents, workdir: str, cache: str, io: str,
             size: int, active: bool) -> dict:
    """Build the chain, start the domain paused, write the data through the
    drive, commit; returns the guest write and the commit times."""
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    base = qcow2(os.path.join(workdir, "base.qcow2"))
    top = qcow2(os.path.join(workdir, "top.qcow2"), base)
    leaf = top if active else qcow2(os.path.join(workdir, "leaf.qcow2"), top)
    vm_uuid = str(uuid.uuid4())
    dom = bench.conn.createXML(domain_xml(f"{bench.prefix}drive-{vm_uuid[:8]}", vm_uuid, leaf,
                                          cache, io), libvirt.VIR_DOMAIN_START_PAUSED)
    try:
        if not active:   # the data goes into top, below the leaf: write it before the leaf
            dom.destroy()
            dom = bench.conn.createXML(domain_xml(f"{bench.prefix}drive-{vm_uuid[:8]}", vm_uuid,
                                                  top, cache, io), libvirt.VIR_DOMAIN_START_PAUSED)
        started = time.perf_counter()
        for off in range(0, size, 256 * MiB):
            guestio.write(dom, "vda", PATTERN, off, min(256 * MiB, size - off))
        write_s = time.perf_counter() - started
        if not active:
            dom.destroy()
            dom = bench.conn.createXML(domain_xml(f"{bench.prefix}drive-{vm_uuid[:8]}", vm_uuid,
                                                  leaf, cache, io),
                                       libvirt.VIR_DOMAIN_START_PAUSED)
        mark = lv.mark()
        wall0, started = time.time(), time.perf_counter()
        if active:
            dom.blockCommit("vda", None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
            t = lv.wait(vm_uuid, "READY", mark, timeout=600)
        else:
            dom.blockCommit("vda", base, top, 0, 0)
            t = lv.wait(vm_uuid, "COMPLETED", mark, timeout=600)
        commit_s = t - wall0
        pivot_s = None
        if active:   # libvirt's synchronous pivot: QEMU's job-complete, drain and flush
            pivot_started = time.perf_counter()
            dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            pivot_s = time.perf_counter() - pivot_started
        return {"write_s": write_s, "commit_s": commit_s, "pivot_s": pivot_s,
                "elapsed_s": time.perf_counter() - started}
    finally:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
        for f in os.listdir(workdir):
            os.unlink(os.path.join(workdir, f))


def run(bench: Bench, size: int, reps: int, configs: list[str]) -> dict:
    lv = LibvirtJobEvents()
    work = os.path.join(bench.workdir, "drive")
    results: dict = {"offline commit": [], "dd copy": []}
    for name in configs:
        results[name] = {"guest write": [], "live internal": [], "live active": [], "pivot s": []}
    try:
        for rep in range(reps):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            r = offline_commit(os.path.join(bench.workdir), size)
            results["offline commit"].append(mb_s(size, r["seconds"]))
            r = dd_copy(os.path.join(bench.workdir), size)
            results["dd copy"].append(mb_s(size, r["seconds"]))
            for name in order:
                cache, io = CONFIGS[name]
                try:
                    internal = one_case(bench, lv, work, cache, io, size, active=False)
                    active = one_case(bench, lv, work, cache, io, size, active=True)
                except libvirt.libvirtError as e:
                    log(f"  {name}: not available here ({e})")
                    results[name]["error"] = str(e)
                    continue
                results[name]["guest write"].append(
                    mb_s(size, median([internal["write_s"], active["write_s"]])))
                results[name]["live internal"].append(mb_s(size, internal["commit_s"]))
                results[name]["live active"].append(mb_s(size, active["commit_s"]))
                results[name]["pivot s"].append(active["pivot_s"])
            log(f"  run {rep + 1}/{reps}: offline {results['offline commit'][-1]:.0f}, dd copy "
                f"{results['dd copy'][-1]:.0f}; " + "; ".join(
                    f"{n}: write {results[n]['guest write'][-1]:.0f}, internal "
                    f"{results[n]['live internal'][-1]:.0f}, active "
                    f"{results[n]['live active'][-1]:.0f}"
                    for n in configs if results[n]["live active"]) + " MB/s")
    finally:
        lv.close()
    return results


def summarize(results: dict, configs: list[str]) -> dict:
    offline = results["offline commit"]
    out = {"offline": median(offline), "dd_copy": median(results["dd copy"]), "configs": {}}
    for name in configs:
        r = results[name]
        if not r["live active"]:
            out["configs"][name] = {"error": r.get("error", "no run")}
            continue
        ratio = {k: [v / o for v, o in zip(r[k], offline)] for k in ("live internal",
                                                                     "live active")}
        out["configs"][name] = {
            "write": median(r["guest write"]), "internal": median(r["live internal"]),
            "active": median(r["live active"]),
            "internal_ratio": median(ratio["live internal"]),
            "active_ratio": median(ratio["live active"]),
            "active_ratios": ratio["live active"], "internal_ratios": ratio["live internal"],
            "pivot_s": median(r["pivot s"]),
        }
    ok = {n: c for n, c in out["configs"].items() if "error" not in c}
    if ok:
        # Best for merges, guest writes second: the smallest of the two ratios to
        # offline decides, then the guest's write rate.
        out["best"] = max(ok, key=lambda n: (round(min(ok[n]["active_ratio"],
                                                          ok[n]["internal_ratio"]), 2),
                                             ok[n]["write"]))
    return out


def markdown(s: dict, results: dict, reps: int, size: int) -> str:
    rows = [["offline `qemu-img commit -t none`", "", "", "", "",
             " / ".join(f"{v:.0f}" for v in results["offline commit"]), "1.00", ""],
            ["dd copy (direct I/O)", "", "", "", "",
             " / ".join(f"{v:.0f}" for v in results["dd copy"]),
             f"{s['dd_copy'] / s['offline']:.2f}", ""]]
    for name, c in s["configs"].items():
        if "error" in c:
            rows.append([f"live, drive cache/io {name}", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a",
                         c["error"][:80]])
            continue
        r = results[name]
        rows.append([f"live, drive cache/io {name}", f"{c['write']:.0f}", f"{c['internal']:.0f}",
                     f"{c['active']:.0f}", fmt_ms(c["pivot_s"], 0),
                     "int " + " / ".join(f"{v:.0f}" for v in r["live internal"]) + "; act "
                     + " / ".join(f"{v:.0f}" for v in r["live active"]),
                     f"int {c['internal_ratio']:.2f}, act {c['active_ratio']:.2f}",
                     " / ".join(f"{v:.2f}" for v in c["active_ratios"])])
    table = md_table(["case", "guest write MB/s", "live internal MB/s", "live active MB/s",
                      "pivot ms (libvirt, synchronous)", "MB/s per run", "/ offline (median paired ratio)",
                      "active / offline, each run (target >= 0.95 in each)"], rows)
    best = s.get("best")
    notes = (f"{size // MiB} MiB of data, {reps} runs; medians. The agent's drives are "
             f"{AGENT_CONFIG} (vmhost.virt.domxml). io='native' also reserves 1024 events of the "
             "host-wide fs.aio-max-nr (65536 by default) per VM: about 64 VMs per host. "
             + (f"Best for merges (the smaller of the two paired ratios), then guest writes: "
                f"**{best}**." if best else ""))
    return "## 9. Drive configuration for merges\n\n" + table + "\n\n" + notes + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=default_out_dir())
    args = p.parse_args()
    size = args.size_mib * MiB
    configs = args.configs.split(",")
    with Bench("drive") as bench:
        facts = host_facts(bench.conn)
        results = run(bench, size, args.reps, configs)
    summary = summarize(results, configs)
    save_result(args.out, "drive_config", {**summary, "results": results, "size": size,
                                           "reps": args.reps, "host": facts,
                                           "agent_config": AGENT_CONFIG},
                markdown(summary, results, args.reps, size))
    return 0


if __name__ == "__main__":
    main_guard(main)
