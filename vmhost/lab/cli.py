"""`vmhost lab ...`: argument parsing and output only; the work is in vmhost.lab.lab."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from vmhost.lab.lab import DEFAULT_DIR, DEFAULT_IO_TIMEOUT, Lab, LabError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmhost lab",
                                description="several vmhost hosts on this machine (root)")
    p.add_argument("--dir", default=os.environ.get("VMHOST_LAB_DIR", DEFAULT_DIR),
                   help=f"lab state (default $VMHOST_LAB_DIR or {DEFAULT_DIR})")
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start N hosts (idempotent); prints the status")
    up.add_argument("--hosts", type=int, required=True)
    up.add_argument("--storage", help="shared storage directory (default DIR/storage)")
    up.add_argument("--io-timeout", type=int, default=DEFAULT_IO_TIMEOUT,
                    help=f"sanlock io_timeout of the hosts, seconds (default {DEFAULT_IO_TIMEOUT})")
    up.add_argument("--json", action="store_true")
    st = sub.add_parser("status", help="hosts, their URLs and whether they answer")
    st.add_argument("--json", action="store_true")
    sub.add_parser("poweroff", help="power cut: SIGKILL every process of a host at once"
                   ).add_argument("name")
    boot = sub.add_parser("boot", help="start a powered-off host again")
    boot.add_argument("name")
    boot.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE",
                      help="environment of the host's agent for this boot only "
                           "(e.g. VMHOST_FAILPOINT=merge.pivot.after); repeatable")
    sub.add_parser("down", help="stop every host (the storage stays)")
    ex = sub.add_parser("exec", help="run a command inside a host, e.g. sanlock client status")
    ex.add_argument("name")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    return p


def _print_status(status: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    print(f"storage {status['storage']}  (lab {status['labDir']})")
    for h in status["hosts"]:
        print(f"{h['name']:8} id {h['hostId']:<4} {'up  ' if h['up'] else 'DOWN'} "
              f"{h['url']}  {h['libvirtUri']}")


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise LabError(f"--agent-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("vmhost lab: needs root (namespaces, mounts, network links)", file=sys.stderr)
        return 2
    lab = Lab(args.dir)
    try:
        if args.action == "up":
            lab.up(args.hosts, args.storage, args.io_timeout)
            _print_status(lab.status(), args.json)
        elif args.action == "status":
            _print_status(lab.status(), args.json)
        elif args.action == "poweroff":
            if not lab.poweroff(args.name):
                print(f"{args.name} was already off")
        elif args.action == "boot":
            if not lab.boot(args.name, _env_pairs(args.agent_env)):
                print(f"{args.name} was already running")
        elif args.action == "down":
            lab.down()
        elif args.action == "exec":
            if not args.command:
                raise LabError("exec wants a command")
            return subprocess.run(lab.enter_argv(args.name) + args.command).returncode
    except (LabError, TimeoutError) as e:
        print(f"vmhost lab: {e}", file=sys.stderr)
        return 1
    return 0
