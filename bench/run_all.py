"""`make bench`: run every benchmark script in turn, then write
reports/bench.md and the PNGs. A script that fails is reported as failed;
the others still run. The raw results (JSON) of the last run stay in
/var/tmp/vmhost-bench/last-run, replaced by the next run:
`python bench/report.py --out /var/tmp/vmhost-bench/last-run --run
/var/tmp/vmhost-bench/last-run/run.json` rewrites the report from them."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import libvirt

from common import (BENCH_BASE, LIBVIRT_URI, ROOT, foreign_vmhost_domains, libvirtd_identity,
                    log, main_guard)

HERE = os.path.dirname(os.path.abspath(__file__))
# `--smoke`: every script small and short (minutes in all), to check the
# pipeline; its numbers are not the report's.
SMOKE = {
    "recovery.py": ["--sizes", "6,12", "--jobs", "3", "--reps", "1"],
    "merge_throughput.py": ["--size-mib", "64", "--reps", "1"],
    "drive_config.py": ["--size-mib", "64", "--reps", "1"],
    "completion.py": ["--merges", "4", "--blocks", "1"],
    "api.py": ["--sizes", "3,6", "--calls", "50", "--rate-seconds", "1"],
    "storm.py": ["--vms", "4", "--size-mib", "32", "--fleet", "2", "--reps", "1",
                 "--idle-seconds", "1"],
    "pivots.py": ["--vms", "4", "--size-mib", "16"],
    "snapshot_freeze.py": ["--reps", "3"],
    "transport.py": ["--vms", "2", "--calls", "100"],
}
SCRIPTS = ["recovery.py", "merge_throughput.py", "drive_config.py", "completion.py", "api.py",
           "storm.py", "pivots.py", "snapshot_freeze.py", "scale.py", "transport.py"]


def foreign_count() -> int | str:
    try:
        conn = libvirt.open(LIBVIRT_URI)
        try:
            return len(foreign_vmhost_domains(conn, "vmhost-bench-"))
        finally:
            conn.close()
    except libvirt.libvirtError:
        return "?"


def run_script(script: str, out_dir: str, extra: list[str]) -> dict:
    log(f"=== {script}")
    entry = {"script": script, "load_before": os.getloadavg()[0],
             "foreign_before": foreign_count()}
    libvirtd = libvirtd_identity()
    started = time.monotonic()
    rc = subprocess.run([sys.executable, os.path.join(HERE, script), "--out", out_dir, *extra],
                        cwd=ROOT).returncode
    entry.update(rc=rc, seconds=time.monotonic() - started, load_after=os.getloadavg()[0],
                 libvirtd_restarted=libvirtd_identity() != libvirtd)
    log(f"=== {script}: {'ok' if rc == 0 else f'FAILED rc={rc}'} in {entry['seconds']:.0f}s")
    return entry


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reports", default=os.path.join(ROOT, "reports"))
    p.add_argument("--only", help="comma-separated scripts to run (default: all)")
    p.add_argument("--smoke", action="store_true",
                   help="every script small and short: checks the pipeline, not a report")
    args = p.parse_args()
    out_dir = os.path.join(BENCH_BASE, "last-run")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    scripts = args.only.split(",") if args.only else SCRIPTS
    run = {"started": time.time(), "out": out_dir, "scripts": []}
    started = time.monotonic()
    for script in scripts:
        extra = ["--reports", args.reports] if script == "scale.py" else []
        if args.smoke:
            extra += SMOKE.get(script, [])
        run["scripts"].append(run_script(script, out_dir, extra))
    run["seconds"] = time.monotonic() - started
    run_path = os.path.join(out_dir, "run.json")
    with open(run_path, "w") as f:
        json.dump(run, f, indent=1)
    rc = subprocess.run([sys.executable, os.path.join(HERE, "report.py"), "--out", out_dir,
                         "--reports", args.reports, "--run", run_path], cwd=ROOT).returncode
    failed = [s["script"] for s in run["scripts"] if s["rc"] != 0]
    if failed:
        log(f"failed: {', '.join(failed)} (their sections say so in reports/bench.md)")
    return 1 if failed or rc else 0


if __name__ == "__main__":
    main_guard(main)
