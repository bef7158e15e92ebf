"""PNG plots of the benchmark results (matplotlib, headless)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recovery_scale(sizes: list[dict], fits: dict, path: str) -> str:
    n = [s["n"] for s in sizes]
    ms = lambda key: [s[key] * 1000 for s in sizes]  # noqa: E731
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.6))
    ax.plot(n, ms("ready_s"), "o-", color="C0", label="agent ready (spawn to first non-99)")
    ax.plot(n, ms("jobs_done_s"), "s-", color="C1", label="all tracked jobs done")
    ax.plot(n, ms("target_s"), "--", color="C3", label="target: 2 x libvirt floor + 1 s")
    ax.plot(n, ms("naive_ready_s"), "D:", color="C4", label="naive: ready + chain sync of all")
    ax.plot(n, ms("floor_s"), "v-", color="C3", label="libvirt floor")
    ax.set_title("From agent start")
    ax2.plot(n, ms("agent_recovery_s"), "^-", color="C2", label="agent's own recovery step")
    ax2.plot(n, ms("floor_s"), "v-", color="C3", label="libvirt floor")
    ax2.plot(n, ms("naive_s"), "D:", color="C4", label="naive chain sync of every drive")
    for key, color in (("agent_recovery_s", "C2"), ("floor_s", "C3"), ("naive_s", "C4")):
        if key in fits:
            f = fits[key]
            ax2.plot([0, max(n)], [f["intercept"] * 1000, (f["intercept"] + f["slope"] * max(n))
                                   * 1000], ":", color=color, linewidth=1,
                     label=f"fit: {f['slope'] * 1000:.2f} ms/VM (R^2 {f['r2']:.2f})")
    ax2.set_title("The parts that depend on N")
    for a in (ax, ax2):
        a.set_xlabel(f"running VMs (k = {sizes[0]['k']} with a tracked job)")
        a.set_ylabel("ms")
        a.set_xlim(0, max(n) * 1.05)
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3)
        a.legend(fontsize=7.5)
    fig.suptitle("Recovery time against N")
    return _save(fig, path)


def storage_scale(sizes: list[dict], path: str) -> str:
    n = [s["n"] for s in sizes]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(n, [s["storage_opens"]["no_job_vms"] for s in sizes], "o-", color="C0",
            label="agent recovery: VMs without job")
    ax.plot(n, [s["storage_opens"]["job_vms"] for s in sizes], "s-", color="C1",
            label=f"agent recovery: the {sizes[0]['k']} VMs with a job (their cleanup)")
    ax.plot(n, [s["naive_opens"] for s in sizes], "D:", color="C4",
            label="naive chain sync of every drive")
    ax.set_xlabel("running VMs")
    ax.set_ylabel("storage calls (inotify opens/creates/renames)")
    ax.set_title("Storage calls during recovery against N")
    ax.set_xlim(0, max(n) * 1.05)
    ax.set_ylim(bottom=-1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def api_scale(points: list[dict], path: str) -> str:
    n = [p["n"] for p in points]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax.plot(n, [p["getAllVmStats"]["p50"] * 1000 for p in points], "o-", label="getAllVmStats p50")
    ax.plot(n, [p["getAllVmStats"]["p99"] * 1000 for p in points], "s--", label="getAllVmStats p99")
    ax.plot(n, [p["ping"]["p50"] * 1000 for p in points], "v:", label="Host.ping p50 (floor)")
    ax.axhline(10, color="C3", linestyle="--", linewidth=1, label="target p50 10 ms")
    ax.set_xlabel("VMs")
    ax.set_ylabel("ms")
    ax.set_title("API latency against N")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.plot(n, [p["memory_mib"]["VmRSS"] for p in points], "o-", label="RSS")
    ax2.plot(n, [p["memory_mib"]["VmHWM"] for p in points], "s--", label="peak RSS")
    ax2.axhline(100, color="C3", linestyle="--", linewidth=1, label="target 100 MiB")
    ax2.set_xlabel("VMs")
    ax2.set_ylabel("MiB")
    ax2.set_title("Agent memory against N")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return _save(fig, path)


def merge_throughput(cases: dict, path: str) -> str:
    names = list(cases)
    values = [cases[c]["mb_s"] for c in names]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    bars = ax.barh(names, values, color=["C7", "C7", "C2", "C0", "C1"][:len(names)])
    for i, c in enumerate(names):   # every repetition as a dot
        runs = [r["mb_s"] for r in cases[c].get("runs", [])]
        ax.plot(runs, [i] * len(runs), "k.", markersize=4)
    offline = cases.get("qemu-img commit (offline)", {}).get("mb_s")
    if offline:
        ax.axvline(0.9 * offline, color="C3", linestyle="--", linewidth=1,
                   label="target: 0.9 x offline commit")
        ax.legend(fontsize=8, loc="lower right")
    for bar, v, c in zip(bars, values, names):
        right = max([v] + [r["mb_s"] for r in cases[c].get("runs", [])])
        ax.text(right * 1.02, bar.get_y() + bar.get_height() / 2, f"median {v:.0f}",
                va="center", fontsize=8)
    ax.set_xlim(0, max(r["mb_s"] for c in names for r in cases[c].get("runs", [{"mb_s": 0}]))
                * 1.25)
    ax.invert_yaxis()
    ax.set_xlabel("MB/s (O_DIRECT, same file system); dots: each repetition")
    ax.set_title("Merge throughput against the physical limit")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def completion_cdf(modes: dict, poll_interval, path: str) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for mode, s in modes.items():
        lat = sorted(v * 1000 for v in s["latencies"])
        if not lat:
            continue
        ax.step([lat[0]] + lat, [0.0] + [(i + 1) / len(lat) for i in range(len(lat))],
                where="post", label=f"{mode} (n={len(lat)})")
    ax.axvline(100, color="C3", linestyle="--", linewidth=1, label="target p50 100 ms")
    ax.axvline(1000, color="C3", linestyle=":", linewidth=1, label="target p99 1 s")
    ax.set_xscale("log")
    ticks = [2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    every = [v * 1000 for s in modes.values() for v in s["latencies"]]
    if every:
        ax.set_xlim(min(every) / 1.5, max(max(every) * 1.5, 1500))
    ax.set_xlabel("ms from QEMU's COMPLETED event to the job's DONE (log scale)")
    ax.set_ylabel("fraction of merges")
    ax.set_title(f"Completion latency, job poll interval {poll_interval} s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def storm(d: dict, path: str) -> str:
    """Per-job completion latency (CDF) for each agent configuration, and
    the API p50/p99 idle against during the storm."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    for i, (name, c) in enumerate(d["configs"].items()):
        lat = sorted(j["latency_s"] * 1000 for r in d["reps"] for j in r[name]["jobs"])
        if lat:
            ax.step(lat, [(k + 1) / len(lat) for k in range(len(lat))], where="post",
                    color=f"C{i}", label=f"agent {name} ({c['mb_s']:.0f} MB/s, "
                                         f"{c['ratio']:.2f}x offline)")
    ax.axvline(500, color="C3", linestyle="--", linewidth=1, label="target p99 500 ms")
    ax.set_xlabel("ms from libvirt's COMPLETED / READY to the agent's DONE")
    ax.set_ylabel("fraction of jobs")
    ax.set_title(f"{d['count']} merges at once: completion latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    labels, idle, busy = [], [], []
    for name, c in d["configs"].items():
        for verb in ("Host.getAllVmStats", "VM.getStats"):
            for q in ("p50", "p99"):
                labels.append(f"{verb.split('.')[1]} {q}\n{name}")
                idle.append(c["idle"][verb][q] * 1000)
                busy.append(c["storm"][verb][q] * 1000)
    x = range(len(labels))
    ax2.bar([i - 0.2 for i in x], idle, 0.4, label="idle agent", color="C7")
    ax2.bar([i + 0.2 for i in x], busy, 0.4, label="during the storm", color="C1")
    ax2.axhline(20, color="C3", linestyle="--", linewidth=1, label="target getAllVmStats p99")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(labels, fontsize=6.5, rotation=35, ha="right")
    ax2.set_ylabel("ms")
    ax2.set_title(f"API latency, {d['count'] + d['fleet']} VMs")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=7.5)
    return _save(fig, path)


def snapshot_freeze(d: dict, path: str) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    drives = list(d["drives"])
    for i, side in enumerate(("agent", "floor")):
        for j, n in enumerate(drives):
            times = [t * 1000 for t in d["drives"][n][side]["times"]]
            x = j * 3 + i
            ax.boxplot(times, positions=[x], widths=0.7, patch_artist=True,
                       boxprops={"facecolor": f"C{i}", "alpha": 0.6})
    ax.set_xticks([j * 3 + i for j in range(len(drives)) for i in range(2)])
    ax.set_xticklabels([f"{'VM.snapshot' if i == 0 else 'libvirt floor'}\n{n} drive(s)"
                        for n in drives for i in range(2)], fontsize=8)
    ax.set_ylabel("ms per call")
    ax.set_ylim(bottom=0)
    ax.set_title("Snapshot: VM.snapshot against snapshotCreateXML")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def drive_config(d: dict, path: str) -> str:
    names = [n for n, c in d["configs"].items() if "error" not in c]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.27
    for k, (key, label) in enumerate((("write", "guest write"), ("internal", "live internal"),
                                      ("active", "live active"))):
        ax.bar([i + (k - 1) * width for i in range(len(names))],
               [d["configs"][n][key] for n in names], width, label=label, color=f"C{k}")
    ax.axhline(d["offline"], color="C3", linestyle="--", linewidth=1,
               label=f"offline qemu-img commit ({d['offline']:.0f})")
    ax.axhline(d["dd_copy"], color="C7", linestyle=":", linewidth=1,
               label=f"dd copy ({d['dd_copy']:.0f})")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"cache/io {n}" for n in names])
    ax.set_ylabel("MB/s (median)")
    ax.set_title("Drive configuration: guest writes and live commits")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    return _save(fig, path)


def pivots(d: dict, path: str) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (mode, r) in enumerate(d["modes"].items()):
        times = sorted(t * 1000 for t in r["times"])
        ax.plot(range(1, len(times) + 1), times, "o-", color=f"C{i}", label=mode)
    ax.set_xlabel("pivot, in order of completion")
    ax.set_ylabel("ms from the call to the live XML showing it")
    ax.set_title(f"{d['count']} pivots at once")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
