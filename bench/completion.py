"""Question 3: completion latency of small merges.

Latency = from QEMU finishing the job (the time this process receives
libvirt's BLOCK_JOB_2 COMPLETED event on its own connection) to the job
leaving vmJobs with the storage metadata synced (the agent's DONE
notification, stamped by the agent when it publishes it: after the record
left vmJobs, after the storage sync). Both clocks are this host's time.time().

Small internal merges (1-5 MiB of guest data, rate-limited to 4 MiB/s so QEMU
finishes 0.25-1.25 s after the call, i.e. after the agent's first poll and
spread over its poll interval), one at a time, on two VMs in turn. The agent
runs with the same --job-poll-interval twice: with libvirt's block job events
(an event triggers an immediate poll) and without (--no-block-job-events: poll
only). Blocks of merges alternate between the two agents.

Targets with events on: p50 <= 100 ms, p99 <= 1 s.
"""
from __future__ import annotations

import argparse
import random

from common import (MiB, AgentJobEvents, Bench, LibvirtJobEvents, default_out_dir, fmt_ms,
                    host_facts, log, main_guard, md_table, percentile, save_result,
                    serve_flags, verdict)

BANDWIDTH = 4            # MiB/s
SIZES_MIB = (1, 2, 3, 4, 5)
EVENTS_OFF_FLAG = "--no-block-job-events"


def one_merge(bench: Bench, vm, lv: LibvirtJobEvents, events: AgentJobEvents,
              rng: random.Random, pattern: int) -> dict:
    """[base, L] -> write into L, snapshot -> [base, L, new] -> merge L into base."""
    size = rng.choice(SIZES_MIB) * MiB
    vm.write(pattern, MiB, size, chunk=size)
    vm.snapshot()
    base, top = vm.chain[0], vm.chain[-2]
    mark = lv.mark()
    job = bench.merge(vm, base, top, bandwidth=BANDWIDTH)
    _, done = events.wait(job, ("DONE",), timeout=120)
    for gone in vm.merged(base, top):
        bench.delete_volume(vm.img, gone)
    try:
        # DONE comes after QEMU finished: the event is here unless it was lost.
        qemu_done = lv.wait(vm.id, "COMPLETED", mark, timeout=5)
    except TimeoutError:
        log("  libvirt's COMPLETED event was lost (libvirtd restarted?): sample skipped")
        return {"latency_s": None, "size_mib": size // MiB}
    return {"latency_s": done - qemu_done, "size_mib": size // MiB}


def run_block(bench: Bench, vms: list, lv: LibvirtJobEvents, mode: str, args: list[str],
              count: int, rng: random.Random) -> list[dict]:
    bench.kill_agent()
    bench.start_agent(args)
    events = AgentJobEvents(bench.client)
    out = []
    for i in range(count):
        r = one_merge(bench, vms[i % len(vms)], lv, events, rng, 0x20 + i % 64)
        r["mode"] = mode
        out.append(r)
    return out


def stats(samples: list[dict]) -> dict:
    lat = [s["latency_s"] for s in samples if s["latency_s"] is not None]
    return {"n": len(lat), "lost": len(samples) - len(lat), "p50": percentile(lat, 50), "p90": percentile(lat, 90),
            "p99": percentile(lat, 99), "max": max(lat) if lat else None,
            "min": min(lat) if lat else None, "latencies": lat}


def markdown(result: dict) -> str:
    rows = []
    for mode in ("events on", "events off"):
        s = result["modes"].get(mode)
        if s is None or not s["n"]:
            rows.append([mode, 0, "TODO", "TODO", "TODO", "TODO", "TODO",
                         "`vmhost serve` has no " + EVENTS_OFF_FLAG])
            continue
        target = ""
        if mode == "events on":
            target = (f"p50 {verdict(s['p50'] <= 0.1)}, p99 {verdict(s['p99'] <= 1.0)}")
        rows.append([mode, s["n"], fmt_ms(s["min"]), fmt_ms(s["p50"]), fmt_ms(s["p90"]),
                     fmt_ms(s["p99"]), fmt_ms(s["max"]), target])
    table = md_table(["agent", "merges", "min ms", "p50 ms", "p90 ms", "p99 ms", "max ms",
                      "target (events on: p50 <= 100 ms, p99 <= 1 s)"], rows)
    notes = (f"Job poll interval {result['poll_interval']} s in both agents. Latency: libvirt's "
             "COMPLETED event (received by the bench's own libvirt connection) to the agent's "
             "DONE notification (published after the job left vmJobs and its storage metadata "
             f"was synced). Internal merges of 1-5 MiB at {BANDWIDTH} MiB/s, one at a time; "
             "blocks alternate between the two agents. With events off the latency is the wait "
             "for the next poll plus the cleanup; its distribution has steps because the five "
             "data sizes give five job durations (0.25 - 1.25 s), each ending at a fixed phase "
             "of the poll interval.")
    return "## 3. Completion latency\n\n" + table + "\n\n" + notes + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--merges", type=int, default=40, help="per mode (>= 30)")
    p.add_argument("--blocks", type=int, default=2, help="alternating blocks per mode")
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--out", default=default_out_dir())
    args = p.parse_args()
    flags = serve_flags()
    poll = ["--job-poll-interval", str(args.poll_interval)] \
        if "--job-poll-interval" in flags else []
    modes = {"events on": poll}
    if EVENTS_OFF_FLAG in flags:
        modes["events off"] = poll + [EVENTS_OFF_FLAG]
    else:
        log(f"completion: `vmhost serve` has no {EVENTS_OFF_FLAG}: events-off row is TODO")
    rng = random.Random(20140)
    samples: dict[str, list[dict]] = {m: [] for m in modes}
    with Bench("completion") as bench:
        facts = host_facts(bench.conn)
        vms = bench.create_vms(2)
        bench.wait_halted(vms)
        for vm in vms:
            vm.snapshot()                     # [base, L]: L gets each merge's data
        lv = LibvirtJobEvents()
        per_block = -(-args.merges // args.blocks)
        try:
            for block in range(args.blocks):
                for mode, extra in modes.items():
                    n = min(per_block, args.merges - block * per_block)
                    log(f"completion: block {block + 1}/{args.blocks}, {mode}: {n} merges")
                    samples[mode] += run_block(bench, vms, lv, mode, extra, n, rng)
        finally:
            lv.close()
    result = {"poll_interval": args.poll_interval if poll else "default",
              "modes": {m: stats(s) for m, s in samples.items()},
              "samples": samples, "host": facts}
    on = result["modes"]["events on"]
    result["ok"] = on["p50"] <= 0.1 and on["p99"] <= 1.0
    save_result(args.out, "completion", result, markdown(result))
    return 0


if __name__ == "__main__":
    main_guard(main)
