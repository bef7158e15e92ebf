"""Question 2: merge throughput against the physical limit.

The same amount of data (default 1 GiB, one pattern, written in 256 MiB
requests) in the top layer, merged four ways, all with O_DIRECT I/O on the
same file system:

- live internal merge through the agent: base <- top (data) <- leaf, VM.merge
  of top into base, timed from the call to the job's DONE (storage synced);
- live active merge through the agent: base <- top (data, the leaf), VM.merge
  with pivot, timed the same way;
- offline `qemu-img commit -t none` of an identical chain built with qemu-io;
- the disk's raw sequential write speed (dd oflag=direct), and a direct-I/O
  dd copy of a file of that size (read + write on one disk: what any commit
  must do).

Every case on fresh volumes/files; repetitions alternate the order. MB/s is
10^6 bytes per second. Target: live merge >= 0.9 x offline qemu-img commit.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time

from common import (GiB, MiB, AgentJobEvents, Bench, LibvirtJobEvents, default_out_dir,
                    host_facts, log, main_guard, md_table, median, save_result, verdict)

CHUNK = 256 * MiB
PATTERN = 0x5C
CAPACITY = 2 * GiB


def mb_per_s(size: int, seconds: float) -> float:
    return size / 1e6 / seconds


# --- the physical limit ---------------------------------------------------------

def dd(args: list[str]) -> None:
    subprocess.run(["dd", "status=none", *args], check=True)


def dd_write(workdir: str, size: int) -> dict:
    path = os.path.join(workdir, "dd-write")
    started = time.perf_counter()
    dd(["if=/dev/zero", f"of={path}", "bs=4M", f"count={size // (4 * MiB)}", "oflag=direct",
        "conv=fsync"])
    elapsed = time.perf_counter() - started
    os.unlink(path)
    return {"seconds": elapsed}


def dd_copy(workdir: str, size: int) -> dict:
    src, dst = os.path.join(workdir, "dd-src"), os.path.join(workdir, "dd-dst")
    dd(["if=/dev/urandom", f"of={src}", "bs=4M", f"count={size // (4 * MiB)}", "oflag=direct"])
    started = time.perf_counter()
    dd([f"if={src}", f"of={dst}", "bs=4M", "iflag=direct", "oflag=direct", "conv=fsync"])
    elapsed = time.perf_counter() - started
    os.unlink(src)
    os.unlink(dst)
    return {"seconds": elapsed}


# --- offline ---------------------------------------------------------------------

def offline_commit(workdir: str, size: int) -> dict:
    base, top = os.path.join(workdir, "off-base.qcow2"), os.path.join(workdir, "off-top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", base,
                    str(CAPACITY)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-b", base,
                    "-F", "qcow2", top], check=True)
    writes = []
    for off in range(0, size, CHUNK):
        writes += ["-c", f"write -P {PATTERN:#x} {off} {min(CHUNK, size - off)}"]
    subprocess.run(["qemu-io", "-t", "none", "-f", "qcow2", *writes, top], check=True,
                   capture_output=True)
    started = time.perf_counter()
    subprocess.run(["qemu-img", "commit", "-q", "-t", "none", "-b", base, top], check=True)
    elapsed = time.perf_counter() - started
    os.unlink(top)
    os.unlink(base)
    return {"seconds": elapsed}


# --- live, through the agent -----------------------------------------------------------

def live_merge(bench: Bench, vm, size: int, active: bool, lv: LibvirtJobEvents,
               events: AgentJobEvents) -> dict:
    """base <- top with `size` of guest data (<- leaf for an internal merge)."""
    base = vm.chain[-1]
    top = vm.snapshot(size=CAPACITY)
    vm.write(PATTERN, 0, size, chunk=CHUNK)
    if not active:
        vm.snapshot(size=CAPACITY)
    mark = lv.mark()
    wall0, started = time.time(), time.perf_counter()
    job = bench.merge(vm, base, top)
    _, done = events.wait(job, ("DONE",), timeout=1800)
    elapsed = time.perf_counter() - started
    qemu = lv.wait(vm.id, "READY" if active else "COMPLETED", mark, timeout=60) - wall0
    vm.merged(base, top)
    return {"seconds": elapsed, "qemu_seconds": qemu, "agent_done_wall": done - wall0}


def retire(bench: Bench, vm) -> None:
    """Destroy a used VM and remove its image (frees the disk space at once)."""
    bench.call("VM.destroy", vmID=vm.id)
    shutil.rmtree(vm.image_dir(), ignore_errors=True)


# --- the run --------------------------------------------------------------------

CASES = ["dd write", "dd copy", "qemu-img commit (offline)", "live internal merge",
         "live active merge"]


def run(bench: Bench, size: int, reps: int) -> dict[str, list[dict]]:
    lv = LibvirtJobEvents()
    events = AgentJobEvents(bench.client)
    vms = {(kind, rep): bench.create_vm(disk_size=CAPACITY)
           for rep in range(reps) for kind in ("internal", "active")}
    log(f"merge: waiting for {len(vms)} VMs to halt")
    bench.wait_halted(list(vms.values()))
    results: dict[str, list[dict]] = {c: [] for c in CASES}
    work = os.path.join(bench.workdir, "offline")
    os.makedirs(work, exist_ok=True)
    try:
        for rep in range(reps):
            order = CASES if rep % 2 == 0 else CASES[::-1]
            for case in order:
                if case == "dd write":
                    r = dd_write(work, size)
                elif case == "dd copy":
                    r = dd_copy(work, size)
                elif case.startswith("qemu-img"):
                    r = offline_commit(work, size)
                else:
                    kind = "active" if "active" in case else "internal"
                    vm = vms[(kind, rep)]
                    r = live_merge(bench, vm, size, kind == "active", lv, events)
                    retire(bench, vm)
                r["mb_s"] = mb_per_s(size, r["seconds"])
                results[case].append(r)
                log(f"  rep {rep + 1}/{reps} {case}: {r['seconds']:.2f}s = {r['mb_s']:.0f} MB/s")
    finally:
        lv.close()
    return results


def summarize(results: dict[str, list[dict]], size: int) -> dict:
    summary = {}
    for case, runs in results.items():
        s = {"mb_s": median([r["mb_s"] for r in runs]), "runs": runs,
             "seconds": median([r["seconds"] for r in runs])}
        if runs and "qemu_seconds" in runs[0]:
            s["qemu_seconds"] = median([r["qemu_seconds"] for r in runs])
            s["agent_tail_seconds"] = median([r["seconds"] - r["qemu_seconds"] for r in runs])
        summary[case] = s
    offline_runs = results["qemu-img commit (offline)"]
    for case in ("live internal merge", "live active merge"):
        # Each repetition against the offline commit of the same repetition
        # (paired: cancels the disk's drift); the verdict is their median.
        ratios = [r["mb_s"] / o["mb_s"] for r, o in zip(results[case], offline_runs)]
        summary[case]["rep_ratios"] = ratios
        summary[case]["vs_offline"] = median(ratios)
        summary[case]["ok"] = summary[case]["vs_offline"] >= 0.9
    dd = [r["mb_s"] for r in results["dd write"]]
    summary["dd write"]["spread"] = (min(dd), max(dd))
    return {"size": size, "cases": summary}


def markdown(summary: dict, reps: int) -> str:
    cases = summary["cases"]
    dd_write_mb = cases["dd write"]["mb_s"]
    offline = cases["qemu-img commit (offline)"]["mb_s"]
    rows = []
    for case in CASES:
        c = cases[case]
        qemu = (f"{c['qemu_seconds']:.2f} + {c['agent_tail_seconds']:.2f}"
                if "qemu_seconds" in c else "")
        target = f"{c['vs_offline']:.2f}x ({verdict(c['ok'])})" if "ok" in c else ""
        spread = " - ".join(f"{x:.2f}" for x in (min(c["rep_ratios"]), max(c["rep_ratios"]))) \
            if "rep_ratios" in c else ""
        runs = " / ".join(f"{r['mb_s']:.0f}" for r in c["runs"])
        rows.append([case, f"{c['seconds']:.2f}", qemu, f"{c['mb_s']:.0f}", runs,
                     f"{c['mb_s'] / dd_write_mb:.2f}", f"{c['mb_s'] / offline:.2f}", spread,
                     target])
    table = md_table(["case", "seconds", "QEMU + agent tail s", "MB/s (median)",
                      "MB/s per repetition", "/ dd write", "/ offline commit (medians)",
                      "paired ratio to offline, min - max", "target: median paired ratio "
                      ">= 0.9"], rows)
    notes = (f"{summary['size'] // MiB} MiB of guest-written data in the top; medians of {reps} "
             "repetitions (order alternated). The verdict compares each live merge with the "
             "offline commit of the same repetition (paired ratio) and takes the median. Live merges are timed from the VM.merge call to "
             "the job's DONE event (storage metadata synced); *QEMU* is the part until libvirt's "
             "COMPLETED (internal) or READY (active) event, the *agent tail* is the rest (for an "
             "active merge: marking the leaf ILLEGAL, the pivot, cleanup). All I/O is O_DIRECT "
             "(cache='none', `qemu-img commit -t none`, dd direct), on the same ext4 file system.")
    return "## 2. Merge throughput\n\n" + table + "\n\n" + notes + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=default_out_dir())
    args = p.parse_args()
    size = args.size_mib * MiB
    with Bench("merge") as bench:
        facts = host_facts(bench.conn)
        results = run(bench, size, args.reps)
    summary = summarize(results, size)
    save_result(args.out, "merge_throughput", {**summary, "host": facts},
                markdown(summary, args.reps))
    return 0


if __name__ == "__main__":
    main_guard(main)
