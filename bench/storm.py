"""Question 7: a storm of merges (an engine's backup schedule deleting the
snapshots of many VMs at once).

M VMs (default 20), each with `size` (default 256 MiB) of guest-written data
in the layer to merge, half internal merges (base <- top (data) <- leaf) and
half active (base <- top (data) = leaf, with pivot), beside a fleet of idle
paused VMs (default 180: 200 VMs on the host). In the same run:

- the storm: all M VM.merge calls at once (one thread each, as an engine
  would send them); aggregate rate = M x size / (first call -> last DONE);
- the baseline: M offline `qemu-img commit -t none` of identical chains
  (built with qemu-io on the same file system) started at once; aggregate
  rate = M x size / (start -> last exit);
- each job's completion latency: from libvirt's event that QEMU is done
  (COMPLETED for an internal merge, READY for an active one: the pivot is
  the agent's part) to the agent's DONE (the job left vmJobs, storage
  synced);
- Host.getAllVmStats and VM.getStats latency, p50/p99, from a client looping
  them during the storm, against the same loop on the same agent idle just
  before.

Each repetition runs the storm once per agent configuration (default: the
agent's defaults, then `workers`/`storage_workers` raised, then the pivot
bound lifted), so a bottleneck in the scheduler's workers or the per-domain
storage executor shows as a difference in completion latency, and the pivot
bound's effect on the guest's pause as the PIVOT phase's figures, in the same
run.

Targets: aggregate >= 0.9 x offline; completion p99 <= 500 ms;
getAllVmStats p99 <= 20 ms during the storm with 200 VMs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import threading
import time

from common import (MiB, AgentJobEvents, Bench, LibvirtJobEvents, default_out_dir, fmt_ms,
                    host_facts, log, main_guard, md_table, median, percentile, save_result,
                    verdict)
from vmhost.client import Client

PATTERN = 0x6D
# Agent configurations compared in the same run (TOML bodies).
CONFIGS = {
    "defaults": "",
    "raised": "workers = 24\nstorage_workers = 12\nstorage_queue = 64\n",
    # Before the pivot bound (vmhost.virt.pivotslots): every READY job paused its VM
    # at once and they queued in libvirt for their pivots, holding a worker each.
    "unbounded": "pivot_slots = 20\n",
}


def mb_s(total: int, seconds: float) -> float:
    return total / 1e6 / seconds


# --- API latency while something runs ----------------------------------------------

class StatsLoop:
    """Host.getAllVmStats and VM.getStats in turn on one keep-alive
    connection, in a thread, until stopped."""

    def __init__(self, url: str, vm_id: str):
        self.client = Client(url, validate=False, timeout=60)
        self.vm_id = vm_id
        self.times: dict[str, list[float]] = {"Host.getAllVmStats": [], "VM.getStats": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for verb, params in (("Host.getAllVmStats", {}), ("VM.getStats", {"vmID": self.vm_id})):
                started = time.perf_counter()
                self.client.call(verb, **params)
                self.times[verb].append(time.perf_counter() - started)
            time.sleep(0.005)   # ~100 calls/s: a busy engine, not a flood

    def __enter__(self) -> "StatsLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.client.close()


def lat_summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values) if values else None}


# --- the live storm --------------------------------------------------------------------

def prepare_live(bench: Bench, vms: list, size: int) -> list[dict]:
    """Each VM gets a fresh top with `size` of data; odd VMs get a leaf above it."""
    plan = []
    for i, vm in enumerate(vms):
        base = vm.chain[-1]
        top = vm.snapshot(size=2 * size)
        vm.write(PATTERN, 0, size)
        active = i % 2 == 1
        if not active:
            vm.snapshot(size=2 * size)
        plan.append({"vm": vm, "base": base, "top": top, "active": active})
    return plan


def live_storm(bench: Bench, plan: list[dict], size: int, lv: LibvirtJobEvents,
               events: AgentJobEvents) -> dict:
    mark = lv.mark()
    jobs: dict[int, str] = {}
    errors: list[str] = []
    barrier = threading.Barrier(len(plan))

    clients = [Client(bench.agent.url, validate=False, timeout=120) for _ in plan]

    def call(i: int, p: dict) -> None:
        vm = p["vm"]
        barrier.wait()   # one connection per thread: Client is not thread-safe
        try:
            jobs[i] = clients[i].call(
                "VM.merge", vmID=vm.id, drive={"domainID": bench.sd, "imageID": vm.img,
                                               "volumeID": vm.chain[-1]},
                baseVolUUID=p["base"], topVolUUID=p["top"], bandwidth=0)
        except Exception as e:   # reported, the storm goes on
            errors.append(f"{vm.id}: {e}")
        finally:
            clients[i].close()

    wall0, t0 = time.time(), time.perf_counter()
    threads = [threading.Thread(target=call, args=(i, p)) for i, p in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls_s = time.perf_counter() - t0
    per_job = []
    for i, p in enumerate(plan):
        if i not in jobs:
            continue
        _, done = events.wait(jobs[i], ("DONE",), timeout=1800)
        qemu = lv.wait(p["vm"].id, "READY" if p["active"] else "COMPLETED", mark, timeout=60)
        states = dict(events.jobs.get(jobs[i], {}))   # the agent's time of each state
        per_job.append({"active": p["active"], "qemu_done": qemu - wall0, "done": done - wall0,
                        "latency_s": done - qemu,
                        "states_s": {st: t - qemu for st, t in states.items()}})
        p["vm"].merged(p["base"], p["top"])
        p["merged"] = True
    for e in errors:
        log(f"  VM.merge failed: {e}")
    last = max(j["done"] for j in per_job) if per_job else None
    return {"seconds": last, "calls_s": calls_s, "jobs": per_job, "errors": errors,
            "mb_s": mb_s(len(per_job) * size, last) if last else None}


# --- the offline baseline -----------------------------------------------------------------

def offline_storm(workdir: str, count: int, size: int) -> dict:
    os.makedirs(workdir, exist_ok=True)
    tops = []
    for i in range(count):
        base, top = os.path.join(workdir, f"b{i}.qcow2"), os.path.join(workdir, f"t{i}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(2 * size)],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                        top], check=True)
        subprocess.run(["qemu-io", "-t", "none", "-f", "qcow2", "-c",
                        f"write -P {PATTERN:#x} 0 {size}", top], check=True, capture_output=True)
        tops.append(top)
    started = time.perf_counter()
    procs = [subprocess.Popen(["qemu-img", "commit", "-q", "-t", "none", top]) for top in tops]
    ends = []
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"qemu-img commit failed: rc {p.returncode}")
        ends.append(time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    shutil.rmtree(workdir, ignore_errors=True)
    return {"seconds": elapsed, "mb_s": mb_s(count * size, elapsed),
            "each_s": sorted(ends)}


# --- one agent configuration --------------------------------------------------------------

def restart_with(bench: Bench, name: str) -> None:
    extra = []
    if CONFIGS[name]:
        path = os.path.join(bench.workdir, f"{name}.toml")
        with open(path, "w") as f:
            f.write(CONFIGS[name])
        extra = ["--config", path]
    bench.kill_agent()
    bench.start_agent(extra)


def run_config(bench: Bench, name: str, vms: list, size: int, idle_seconds: float,
               lv: LibvirtJobEvents) -> dict:
    restart_with(bench, name)
    events = AgentJobEvents(bench.client)
    plan = prepare_live(bench, vms, size)
    with StatsLoop(bench.agent.url, vms[0].id) as idle:
        time.sleep(idle_seconds)
    with StatsLoop(bench.agent.url, vms[0].id) as busy:
        live = live_storm(bench, plan, size, lv, events)
    for p in plan:   # drop the merged-away volumes (not timed)
        if p.get("merged"):
            bench.delete_volume(p["vm"].img, p["top"])
    live["_idle_times"], live["_storm_times"] = idle.times, busy.times
    if bench.agent is not None and os.path.exists(bench.agent.log_path):
        # The agent's log of the storm, kept for a look at where jobs waited.
        shutil.copy(bench.agent.log_path, os.path.join(bench.out_dir, f"storm-agent-{name}.log"))
    live["idle"] = {v: lat_summary(t) for v, t in idle.times.items()}
    live["storm"] = {v: lat_summary(t) for v, t in busy.times.items()}
    for kind, sel in (("all", lambda j: True), ("internal", lambda j: not j["active"]),
                      ("active", lambda j: j["active"])):
        live[f"latency_{kind}"] = lat_summary([j["latency_s"] for j in live["jobs"] if sel(j)])
    log(f"  {name}: {live['mb_s']:.0f} MB/s aggregate, completion p50 "
        f"{fmt_ms(live['latency_all']['p50'])} p99 {fmt_ms(live['latency_all']['p99'])} ms, "
        f"getAllVmStats p99 idle {fmt_ms(live['idle']['Host.getAllVmStats']['p99'])} / storm "
        f"{fmt_ms(live['storm']['Host.getAllVmStats']['p99'])} ms")
    return live


# --- summary and report ----------------------------------------------------------------------

def summarize(reps: list[dict], count: int, size: int, fleet: int) -> dict:
    out = {"count": count, "size": size, "fleet": fleet, "reps": reps, "configs": {}}
    offline = [r["offline"]["mb_s"] for r in reps]
    out["offline_mb_s"] = median(offline)
    for name in CONFIGS:
        runs = [r[name] for r in reps]
        lat = [j["latency_s"] for r in runs for j in r["jobs"]]
        c = {
            "mb_s": median([r["mb_s"] for r in runs]),
            "ratio": median([r["mb_s"] / rep["offline"]["mb_s"] for r, rep in zip(runs, reps)]),
            "latency": lat_summary(lat),
            "latency_internal": lat_summary([j["latency_s"] for r in runs for j in r["jobs"]
                                             if not j["active"]]),
            "latency_active": lat_summary([j["latency_s"] for r in runs for j in r["jobs"]
                                           if j["active"]]),
            "idle": {v: lat_summary([t for r in runs for t in _times(r, "idle", v)])
                     for v in ("Host.getAllVmStats", "VM.getStats")},
            "errors": [e for r in runs for e in r["errors"]],
        }
        c["storm"] = {v: lat_summary([t for r in runs for t in _times(r, "storm", v)])
                      for v in ("Host.getAllVmStats", "VM.getStats")}
        c["phases"] = phases([j for r in runs for j in r["jobs"]])
        c["rate_ok"] = c["ratio"] >= 0.9
        c["latency_ok"] = c["latency"]["p99"] is not None and c["latency"]["p99"] <= 0.5
        c["stats_ok"] = c["storm"]["Host.getAllVmStats"]["p99"] <= 0.020
        out["configs"][name] = c
    return out


# Where a job's completion latency goes: the agent's state changes, each
# measured from libvirt's event (COMPLETED / READY) that QEMU is done.
PHASES = {"internal": [("event", "CLEANUP"), ("CLEANUP", "DONE")],
          "active": [("event", "READY"), ("READY", "PIVOT"), ("PIVOT", "CLEANUP"),
                     ("CLEANUP", "DONE")]}


def phases(jobs: list[dict]) -> dict:
    out = {}
    for kind, steps in PHASES.items():
        sel = [j["states_s"] for j in jobs if j["active"] == (kind == "active")]
        for a, b in steps:
            d = [s[b] - (s[a] if a != "event" else 0.0) for s in sel if b in s and
                 (a == "event" or a in s)]
            out[f"{kind}: {'libvirt event' if a == 'event' else a} -> {b}"] = lat_summary(d)
    return out


def _times(run: dict, phase: str, verb: str) -> list[float]:
    return run.get(f"_{phase}_times", {}).get(verb, [])


def markdown(s: dict) -> str:
    rows = [["offline `qemu-img commit` x " + str(s["count"]), f"{s['offline_mb_s']:.0f}",
             "1.00", "", "", "", "", "", ""]]
    for name, c in s["configs"].items():
        rows.append([
            f"live, agent {name}", f"{c['mb_s']:.0f}",
            f"{c['ratio']:.2f} ({verdict(c['rate_ok'])})",
            f"{fmt_ms(c['latency']['p50'], 0)} / {fmt_ms(c['latency']['p99'], 0)} "
            f"({verdict(c['latency_ok'])})",
            f"{fmt_ms(c['latency_internal']['p50'], 0)} / {fmt_ms(c['latency_internal']['p99'], 0)}",
            f"{fmt_ms(c['latency_active']['p50'], 0)} / {fmt_ms(c['latency_active']['p99'], 0)}",
            f"{fmt_ms(c['idle']['Host.getAllVmStats']['p50'], 2)} / "
            f"{fmt_ms(c['idle']['Host.getAllVmStats']['p99'], 2)} -> "
            f"{fmt_ms(c['storm']['Host.getAllVmStats']['p50'], 2)} / "
            f"{fmt_ms(c['storm']['Host.getAllVmStats']['p99'], 2)} ({verdict(c['stats_ok'])})",
            f"{fmt_ms(c['idle']['VM.getStats']['p50'], 2)} / "
            f"{fmt_ms(c['idle']['VM.getStats']['p99'], 2)} -> "
            f"{fmt_ms(c['storm']['VM.getStats']['p50'], 2)} / "
            f"{fmt_ms(c['storm']['VM.getStats']['p99'], 2)}",
            str(len(c["errors"])),
        ])
    table = md_table(["case", "aggregate MB/s (median)", "/ offline (paired median)",
                      "completion p50 / p99 ms (target p99 <= 500)",
                      "internal p50 / p99 ms", "active (READY -> DONE) p50 / p99 ms",
                      "getAllVmStats p50 / p99 ms, idle -> storm (target p99 <= 20)",
                      "VM.getStats p50 / p99 ms, idle -> storm", "failed calls"], rows)
    configs = "; ".join(f"*{n}*: {c.strip().replace(chr(10), ', ') or 'the agent defaults'}"
                        for n, c in CONFIGS.items())
    notes = (f"{s['count']} VMs merging at once ({s['count'] // 2} internal, "
             f"{s['count'] - s['count'] // 2} active), {s['size'] // MiB} MiB of guest-written "
             f"data each, beside {s['fleet']} idle paused VMs ({s['count'] + s['fleet']} VMs on "
             f"the host); {len(s['reps'])} repetition(s), order offline / live alternated. "
             f"Agent configurations, each a fresh agent on the same VMs: {configs}. Aggregate: "
             "all data / (first call -> last DONE), offline: all data / (start -> last exit). "
             "Completion latency: libvirt's COMPLETED (internal) or READY (active) event, seen "
             "by the bench's own connection, to the agent's DONE. API latency: one client "
             "looping getAllVmStats and VM.getStats (~100 calls/s) for a few seconds on the "
             "idle agent, then during the storm.")
    names = list(s["configs"])
    phase_names = list(dict.fromkeys(ph for c in s["configs"].values() for ph in c["phases"]))

    def cell(name: str, ph: str) -> str:
        v = s["configs"][name]["phases"].get(ph)
        return f"{fmt_ms(v['p50'], 0)} / {fmt_ms(v['p99'], 0)} ({v['n']})" if v else "-"
    phase_table = md_table(["phase"] + [f"agent {n}: p50 / p99 ms (jobs)" for n in names],
                           [[ph] + [cell(n, ph) for n in names] for ph in phase_names])
    phase_note = ("Where the completion latency goes, from the agent's job notifications "
                  "(each state's publish time, against libvirt's event). For an active merge "
                  "the guest is paused from PIVOT (the agent pauses it, then libvirt's pivot: "
                  "QEMU's job-complete drains and flushes the mirror) until the pivot marker "
                  "is written in CLEANUP's storage sync: that is the guest-visible pause of an "
                  "active merge. With the pivot bound (the defaults: `pivot_slots = 2`) a READY "
                  "job waits for a slot with its guest running; *unbounded* is the agent as it "
                  "was before the bound: every READY job paused its VM at once, then queued "
                  "in libvirt for its pivot while holding a scheduler worker.")
    return ("## 7. Twenty merges at once\n\n" + table + "\n\n" + notes + "\n\n"
            + phase_table + "\n\n" + phase_note + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", type=int, default=20, help="VMs merging at once")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--fleet", type=int, default=180, help="idle paused VMs beside them")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--idle-seconds", type=float, default=3.0)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=default_out_dir())
    args = p.parse_args()
    size = args.size_mib * MiB
    for name in list(CONFIGS):
        if name not in args.configs.split(","):
            del CONFIGS[name]
    reps = []
    with Bench("storm") as bench:
        bench.out_dir = args.out
        os.makedirs(args.out, exist_ok=True)
        facts = host_facts(bench.conn)
        log(f"storm: {args.vms} VMs to merge")
        vms = [bench.create_vm(disk_size=2 * size) for _ in range(args.vms)]
        bench.wait_halted(vms)
        if args.fleet:
            log(f"storm: {args.fleet} idle paused VMs")
            bench.create_vms(args.fleet, paused=True)
        lv = LibvirtJobEvents()
        try:
            for rep in range(args.reps):
                log(f"storm: repetition {rep + 1}/{args.reps}")
                r: dict = {}
                order = ["offline", *CONFIGS] if rep % 2 == 0 else [*CONFIGS, "offline"]
                for case in order:
                    if case == "offline":
                        r["offline"] = offline_storm(os.path.join(bench.workdir, "offline"),
                                                     args.vms, size)
                        log(f"  offline: {r['offline']['mb_s']:.0f} MB/s aggregate")
                    else:
                        r[case] = run_config(bench, case, vms, size, args.idle_seconds, lv)
                reps.append(r)
        finally:
            lv.close()
    summary = summarize(reps, args.vms, size, args.fleet)
    save_result(args.out, "storm", {**summary, "host": facts}, markdown(summary))
    return 0


if __name__ == "__main__":
    main_guard(main)
