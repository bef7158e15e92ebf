#!/usr/bin/env python3
"""Turn the rows the fault tests wrote (JSON lines) and the fuzz counts into
reports/faults.md, and print it."""
from __future__ import annotations

import collections
import json
import os
import sys


def main(rows_path: str, fuzz_path: str, out_path: str) -> int:
    rows = [json.loads(line) for line in open(rows_path) if line.strip()]
    by = collections.defaultdict(list)
    for r in rows:
        by[r["scenario"]].append(r)
    out = ["# vmhost fault report", ""]
    matrix = by.pop("crash-matrix", [])
    points = sorted({r["point"] for r in matrix})
    killed = sum(r["outcome"] == "killed" for r in matrix)
    out += ["## Crash matrix: SIGKILL at every named point x merge type", "",
            f"{len(points)} points x 2 merge types = {len(matrix)} runs; the agent died at the "
            f"point in {killed} of them (the others are points the merge type never reaches, "
            "e.g. pivot points in an internal merge); all converged with data intact.", "",
            "| point | merge | agent | converged | seconds to converge | final job | chain | data ok | leaks |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(matrix, key=lambda r: (r["point"], r["kind"])):
        out.append(_row(r))
    for name, title in (("random-kill", "Random SIGKILL rounds (seeded)"),
                        ("libvirtd-restart", "libvirtd restarted mid-merge"),
                        ("storage-outage", "Storage unreachable during cleanup"),
                        ("qemu-crash", "QEMU killed mid-merge, VM started again"),
                        ("pivot-window", "Agent and QEMU killed in the pivot window, "
                                         "engine path (reconcile, start, synchronizeDisks)"),
                        ("failed-pivot", "Agent killed inside a failed pivot"),
                        ("vm-gone", "VM gone mid-merge: its storage work as an image repair"),
                        ("snapshot-crash", "Agent killed inside VM.snapshot"),
                        ("delete-crash", "Agent killed inside Volume.delete"),
                        ("cold-merge-crash", "Cold merge: SIGKILL at every cold-merge point"),
                        ("fleet-failover", "Lab host powered off mid-merge, engine path on "
                                           "another host (agent = create or reconcile+create; "
                                           "seconds from power-off to the VM up)"),
                        ("fleet-cold-takeover", "Lab host's cold merge finished by another host "
                                                "under the image lease (agent = killed or "
                                                "poweroff; seconds until the job is done there)")):
        rs = by.pop(name, [])
        out += ["", f"## {title}: {len(rs)} run(s), {sum(r['converged'] for r in rs)} converged",
                "", "| case | merge | agent | converged | seconds | final job | chain | data ok | leaks |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [_row(r) for r in rs]
    expiry = by.pop("lease-expiry", [])
    if expiry:
        out += ["", "## Lease expiry: a lab host powered off, another takes its lease", "",
                "sanlock frees a dead host's leases after 8 x io_timeout + 60 s.", "",
                "| io_timeout (s) | seconds from power-off |", "|---|---|"]
        out += [f"| {r['ioTimeout']} | {r['seconds']} |" for r in expiry]
    try:
        fuzz = json.load(open(fuzz_path))
    except FileNotFoundError:
        fuzz = None
    out += ["", "## API fuzzing", ""]
    if fuzz:
        out += ["| what | count |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in fuzz.items() if not isinstance(v, (dict, list))]
    else:
        out.append("(no fuzz results)")
    stomp_path = os.path.join(os.path.dirname(fuzz_path), "stomp-fuzz.json")
    out += ["", "## STOMP frame fuzzing", ""]
    try:
        stomp = json.load(open(stomp_path))
        out += ["| what | count |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in stomp.items() if not isinstance(v, (dict, list))]
    except FileNotFoundError:
        out.append("(no STOMP fuzz results)")
    text = "\n".join(out) + "\n"
    with open(out_path, "w") as f:
        f.write(text)
    print(text)
    return 0


def _row(r: dict) -> str:
    return (f"| {r['point']} | {r['kind']} | {r['outcome']} | {'yes' if r['converged'] else 'NO'} "
            f"| {r['seconds']} | {r['final']} | {'merged' if r['merged'] else 'unchanged'} "
            f"| {'yes' if r['data_ok'] else 'NO'} | {r['leaks']} |")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
