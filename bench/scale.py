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
from common import ROOT, default_out_dir, fmt_ms, linear_fit, main_guard, md_table, save_result


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


def markdown(rfits: dict | None, afits: dict | None, images: list[str], reports: str) -> str:
    rows = []
    label = {"ready_s": "agent ready", "agent_recovery_s": "agent's own recovery step",
             "jobs_done_s": "all tracked jobs done", "floor_s": "libvirt floor",
             "naive_s": "naive chain sync of every drive"}
    for key, name in label.items():
        if rfits and key in rfits:
            f = rfits[key]
            rows.append([f"recovery: {name}", f"{fmt_ms(f['intercept'], 0)} ms",
                         f"{f['slope'] * 1000:.2f} ms", f"{f['r2']:.3f}"])
    if rfits:
        for key, name in (("no_job_storage", "storage calls, VMs without job"),
                          ("job_storage", "storage calls, VMs with job (k fixed)"),
                          ("naive_storage", "storage calls, naive chain sync")):
            f = rfits[key]
            rows.append([name, f"{f['intercept']:.1f}", f"{f['slope']:.2f}", f"{f['r2']:.3f}"])
    if afits:
        f = afits["stats_p50_s"]
        rows.append(["Host.getAllVmStats p50", f"{fmt_ms(f['intercept'], 2)} ms",
                     f"{f['slope'] * 1000:.3f} ms", f"{f['r2']:.3f}"])
        f = afits["rss_mib"]
        rows.append(["agent RSS", f"{f['intercept']:.1f} MiB", f"{f['slope'] * 1024:.0f} KiB",
                     f"{f['r2']:.3f}"])
    table = md_table(["quantity", "at N = 0 (intercept)", "per VM (slope)", "R^2"], rows)
    notes = ("Least-squares lines through the medians measured in sections 1 and 4 (N = 10, 25, "
             "50; the API fit includes N = 0). R^2 near 1 with a small slope: linear in VMs. "
             "A slope of 0 for the storage calls of VMs without a job: the count does not "
             "grow with VMs that have nothing to repair (an R^2 of 1 on a constant series "
             "means a perfect flat line).")
    pics = "\n\n".join(f"![{os.path.basename(p)}]({os.path.relpath(p, reports)})"
                       for p in images)
    return "## 5. Scale shape\n\n" + table + "\n\n" + notes + "\n\n" + pics + "\n"


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
    save_result(args.out, "scale", {"recovery_fits": rfits, "api_fits": afits, "images": images},
                markdown(rfits, afits, images, args.reports))
    return 0


if __name__ == "__main__":
    main_guard(main)
