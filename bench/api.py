"""Question 4: API latency, throughput and the agent's memory.

At N = 0 (the baseline) and each N VMs (default 50, 100, 200), created through
the agent and paused at once: Host.getAllVmStats and the agent's memory do
not depend on what the guest runs, and paused VMs cost no CPU (the recovery
benchmark is the one with N running VMs):

- Host.getAllVmStats latency, p50/p99 over many calls on one keep-alive
  connection, beside Host.ping (the transport + dispatch floor) measured the
  same way in the same run;
- the agent's RSS (VmRSS, and VmHWM: the peak).

At the largest N: Host.ping requests per second on loopback, with one
keep-alive connection and with several connections (one client process each;
the clients share the 2 cores with the agent).

Targets: getAllVmStats with 200 VMs p50 <= 10 ms; agent RSS <= 100 MiB with 200 VMs.
"""
from __future__ import annotations

import argparse
import multiprocessing
import time

from common import (Bench, default_out_dir, fmt_ms, host_facts, log, main_guard, md_table,
                    percentile, process_memory, save_result, verdict)
from vmhost.client import Client


def latencies(client: Client, method: str, count: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        client.call(method)
    out = []
    for _ in range(count):
        started = time.perf_counter()
        client.call(method)
        out.append(time.perf_counter() - started)
    return out


def summary(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": sum(values) / len(values), "n": len(values)}


def measure_point(bench: Bench, n: int, calls: int) -> dict:
    client = Client(bench.agent.url, validate=False)
    try:
        stats = latencies(client, "Host.getAllVmStats", calls)
        ping = latencies(client, "Host.ping", calls)
        answer = client.call("Host.getAllVmStats")
    finally:
        client.close()
    return {"n": n, "vms_reported": len(answer), "getAllVmStats": summary(stats),
            "ping": summary(ping), "memory_mib": process_memory(bench.agent.proc.pid)}


def _ping_worker(url: str, seconds: float, start_at: float, results) -> None:
    client = Client(url, validate=False)
    while time.time() < start_at:
        time.sleep(0.001)
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        client.call("Host.ping")
        count += 1
    client.close()
    results.put(count)


def ping_rate(url: str, connections: int, seconds: float) -> float:
    """Host.ping per second over `connections` keep-alive connections, one
    client process each."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 0.5
    procs = [ctx.Process(target=_ping_worker, args=(url, seconds, start_at, results))
             for _ in range(connections)]
    for p in procs:
        p.start()
    total = sum(results.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def markdown(result: dict) -> str:
    rows = []
    for point in result["points"]:
        s, p, m = point["getAllVmStats"], point["ping"], point["memory_mib"]
        rows.append([point["n"], fmt_ms(s["p50"], 2), fmt_ms(s["p99"], 2), fmt_ms(p["p50"], 2),
                     fmt_ms(p["p99"], 2), fmt_ms(s["p50"] - p["p50"], 2),
                     f"{m['VmRSS']:.1f}", f"{m['VmHWM']:.1f}"])
    table = md_table(["N VMs", "getAllVmStats p50 ms", "getAllVmStats p99 ms",
                      "Host.ping p50 ms (floor)", "Host.ping p99 ms", "p50 above ping ms",
                      "agent RSS MiB", "agent peak RSS MiB"], rows)
    top = result["points"][-1]
    targets = md_table(["target", "measured", "verdict"], [
        [f"getAllVmStats p50 <= 10 ms with {top['n']} VMs",
         f"{fmt_ms(top['getAllVmStats']['p50'], 2)} ms", verdict(result["stats_ok"])],
        [f"agent RSS <= 100 MiB with {top['n']} VMs", f"{top['memory_mib']['VmRSS']:.1f} MiB",
         verdict(result["rss_ok"])],
    ])
    rates = md_table(["Host.ping on loopback", "requests/s"],
                     [[f"{c} keep-alive connection(s)", f"{r:.0f}"]
                      for c, r in result["ping_rate"].items()])
    notes = (f"VMs created through the agent and paused at once (stats come from the agent's "
             "memory whatever the guest does; paused VMs leave the CPU to the measurement). "
             f"{result['calls']} calls per verb per point on one keep-alive connection, after a "
             "warm-up; client-side schema validation off. Host.ping is the floor of any call "
             "(HTTP, JSON-RPC dispatch, schema validation in the agent). Requests per second: "
             f"{result['rate_seconds']:.0f} s per setting, clients in separate processes on the "
             "same 2 cores as the agent.")
    return ("## 4. API latency and agent memory\n\n" + table + "\n\n" + targets + "\n\n" + rates
            + "\n\n" + notes + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="50,100,200")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--connections", default="1,4")
    p.add_argument("--rate-seconds", type=float, default=5.0)
    p.add_argument("--out", default=default_out_dir())
    args = p.parse_args()
    sizes = sorted(int(n) for n in args.sizes.split(","))
    with Bench("api") as bench:
        facts = host_facts(bench.conn)
        points = [measure_point(bench, 0, args.calls)]
        vms: list = []
        for n in sizes:
            log(f"api: N={n}")
            vms += bench.create_vms(n - len(vms), paused=True)
            points.append(measure_point(bench, n, args.calls))
            log(f"  getAllVmStats p50 {points[-1]['getAllVmStats']['p50'] * 1000:.2f} ms, "
                f"RSS {points[-1]['memory_mib']['VmRSS']:.1f} MiB")
        rate = {int(c): ping_rate(bench.agent.url, int(c), args.rate_seconds)
                for c in args.connections.split(",")}
    top = points[-1]
    result = {"points": points, "ping_rate": rate, "calls": args.calls,
              "rate_seconds": args.rate_seconds, "host": facts,
              "stats_ok": top["getAllVmStats"]["p50"] <= 0.010,
              "rss_ok": top["memory_mib"]["VmRSS"] <= 100}
    save_result(args.out, "api", result, markdown(result))
    return 0


if __name__ == "__main__":
    main_guard(main)
