"""Question 5: the shape of growth with the number of VMs.

Reads what recovery.py and api.py measured in this run (no new measurement),
fits straight lines against N and plots them:

- recovery time (agent ready, the agent's own recovery step, all jobs done,
  the libvirt floor) against N: linear in VMs, and by how much per VM;
- storage calls of VMs without a job against N: flat (zero), with the VMs
  that have a job (their fixed number k) flat too;
- Host.getAllVmStats latency and agent RSS against N.
"""
from __future__ import annotations

import argparse
import json
import os

import plots
from common import ROOT, default_out_dir, linear_fit, main_guard, md_table, save_result


def load(out_dir: str, name: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, f"{name}.json")) as f:
            return json.load(f)["data"]
    except FileNotFoundError:
        return None


def recovery_fits(sizes: list[dict]) -> dict:
    n = [s["n"] for s in sizes]
    keys = ("ready_s", "agent_recovery_s", "jobs_done_s", "floor_s", "naive_s")
    fits = {k: linear_fit(n, [s[k] for s in sizes]) for k in keys
            if all(s[k] is not None for s in sizes)}
    fits["no_job_storage"] = linear_fit(n, [s["storage_opens"]["no_job_vms"] for s in sizes])
    fits["job_storage"] = linear_fit(n, [s["storage_opens"]["job_vms"] for s in sizes])
    fits["naive_storage"] = linear_fit(n, [s["naive_opens"] for s in sizes])
    return fits


def api_fits(points: list[dict]) -> dict:
    n = [p["n"] for p in points]
    return {"stats_p50_s": linear_fit(n, [p["getAllVmStats"]["p50"] for p in points]),
            "rss_mib": linear_fit(n, [p["memory_mib"]["VmRSS"] for p in points])}


def fit_row(name: str, f: dict, unit: str, scale: float, digits: int) -> list[str]:
    return [name, f"{f['intercept'] * scale:.{digits}f} {unit}".rstrip(),
            f"{f['slope'] * scale:.{digits + 1}f} {unit}".rstrip(), f"{f['r2']:.2f}"]


def findings(recovery: dict | None, rfits: dict | None, api: dict | None,
             afits: dict | None) -> list[str]:
    """What the lines say, in numbers from this run."""
    out = []
    if rfits and recovery:
        sizes = recovery["sizes"]
        top = sizes[-1]
        rec = rfits.get("agent_recovery_s")
        if rec:
            per_vm = rec["slope"] * 1000
            if per_vm > 0 and rec["r2"] >= 0.8:
                shape = (f"grows linearly, {per_vm:.2f} ms per VM (R^2 {rec['r2']:.2f}): at N = "
                         f"{top['n']} about {per_vm * top['n']:.0f} ms of the "
                         f"{top['ready_s'] * 1000:.0f} ms to ready")
            else:
                shape = (f"shows no growth above this machine's noise (fit {per_vm:.2f} ms per "
                         f"VM, R^2 {rec['r2']:.2f}): a fixed ~{rec['intercept'] * 1000:.0f} ms "
                         "dominates it and the per-VM work is a fraction of a millisecond")
            out.append(
                f"The agent's own recovery step {shape}. The libvirt floor grows "
                f"{rfits['floor_s']['slope'] * 1000:.2f} ms per VM (R^2 "
                f"{rfits['floor_s']['r2']:.2f}). Time to ready is process start-up "
                f"({(top['ready_s'] - (top['agent_recovery_s'] or 0)) * 1000:.0f} ms at N = "
                f"{top['n']}) plus that step: flat in N at these sizes.")
        no_job = [s["storage_opens"]["no_job_vms"] for s in sizes]
        job = [s["storage_opens"]["job_vms"] for s in sizes]
        naive = [s["naive_opens"] for s in sizes]
        out.append(
            f"Storage calls of VMs without a job: {', '.join(f'{v:.0f}' for v in no_job)} at N = "
            f"{', '.join(str(s['n']) for s in sizes)}: flat at zero however many such VMs there "
            f"are. The {sizes[0]['k']} VMs with a job: {', '.join(f'{v:.0f}' for v in job)} "
            f"(slope {rfits['job_storage']['slope']:.2f} per VM of N). The naive sync: "
            f"{', '.join(f'{v:.0f}' for v in naive)} calls, i.e. "
            f"{rfits['naive_storage']['slope']:.1f} calls and "
            f"{rfits['naive_s']['slope'] * 1000:.1f} ms per VM.")
    if afits and api:
        f = afits["stats_p50_s"]
        out.append(
            f"Host.getAllVmStats p50 grows {f['slope'] * 1e6:.0f} us per VM (R^2 {f['r2']:.2f})"
            f" from {f['intercept'] * 1000:.2f} ms: linear, and 10 ms would be reached near "
            + (f"{(0.010 - f['intercept']) / f['slope']:.0f} VMs." if f["slope"] > 0 else
               "never at this slope."))
        r = afits["rss_mib"]
        out.append(f"Agent RSS: {r['intercept']:.1f} MiB with no VM, {r['slope'] * 1024:.0f} KiB "
                   "per VM.")
    return out


def markdown(rfits: dict | None, afits: dict | None, notes: list[str], images: list[str],
             reports: str, rec_sizes: str = "?", api_sizes: str = "?") -> str:
    rows = []
    label = {"ready_s": "recovery: agent ready", "agent_recovery_s":
             "recovery: the agent's own recovery step", "jobs_done_s":
             "recovery: all tracked jobs done", "floor_s": "recovery: libvirt floor",
             "naive_s": "recovery: naive chain sync of every drive"}
    for key, name in label.items():
        if rfits and key in rfits:
            rows.append(fit_row(name, rfits[key], "ms", 1000, 1))
    if rfits:
        for key, name in (("no_job_storage", "storage calls, VMs without job"),
                          ("job_storage", "storage calls, VMs with job (k fixed)"),
                          ("naive_storage", "storage calls, naive chain sync")):
            rows.append(fit_row(name, rfits[key], "", 1, 1))
    if afits:
        rows.append(fit_row("Host.getAllVmStats p50", afits["stats_p50_s"], "ms", 1000, 2))
        rows.append(fit_row("agent RSS", afits["rss_mib"], "MiB", 1, 2))
    table = md_table(["quantity", "at N = 0 (intercept)", "per VM (slope)", "R^2"], rows)
    method = (f"Least-squares lines through the medians of sections 1 (N = {rec_sizes} running "
              f"VMs) and 4 (N = {api_sizes}). R^2 is undefined for a constant series and shown "
              "as 1.")
    pics = "\n\n".join(f"![{os.path.basename(p)}]({os.path.relpath(p, reports)})"
                       for p in images)
    return ("## 5. Scale shape\n\n" + table + "\n\n" + method + "\n\n"
            + "\n\n".join(notes) + "\n\n" + pics + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=default_out_dir())
    p.add_argument("--reports", default=os.path.join(ROOT, "reports"))
    args = p.parse_args()
    recovery, api = load(args.out, "recovery"), load(args.out, "api")
    rfits = afits = None
    images = []
    if recovery and len(recovery["sizes"]) >= 2:
        rfits = recovery_fits(recovery["sizes"])
        images.append(plots.recovery_scale(recovery["sizes"], rfits,
                                           os.path.join(args.reports, "scale_recovery.png")))
        images.append(plots.storage_scale(recovery["sizes"],
                                          os.path.join(args.reports, "scale_storage.png")))
    if api and len(api["points"]) >= 2:
        afits = api_fits(api["points"])
        images.append(plots.api_scale(api["points"], os.path.join(args.reports, "scale_api.png")))
    notes = findings(recovery, rfits, api, afits)
    save_result(args.out, "scale", {"recovery_fits": rfits, "api_fits": afits, "images": images,
                                    "findings": notes},
                markdown(rfits, afits, notes, images, args.reports,
                         ", ".join(str(s["n"]) for s in (recovery or {}).get("sizes", [])),
                         ", ".join(str(p["n"]) for p in (api or {}).get("points", []))))
    return 0


if __name__ == "__main__":
    main_guard(main)
