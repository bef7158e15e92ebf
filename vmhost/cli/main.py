"""`vmhost` command: serve the agent, run the demo, show the configuration,
make test certificates, print the systemd unit, run a lab of hosts."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from importlib import resources

from vmhost import config as configmod


def _serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="run the agent")
    _config_flags(p)
    p.add_argument("--adopt-identity", metavar="AGENT_ID",
                   help="take over this agent id (a UUID) when the state dir's host-id file "
                        "is lost or damaged and running VMs carry it (see README)")
    return p


def _config_flags(p: argparse.ArgumentParser) -> None:
    """Flags override the TOML file; None means 'not given'."""
    d = configmod.Config()
    p.add_argument("--config", help=f"TOML file (default {configmod.DEFAULT_CONFIG_FILE} if present)")
    p.add_argument("--listen", help=f"HOST:PORT (default {d.listen})")
    p.add_argument("--state-dir", help=f"default {d.state_dir}")
    p.add_argument("--libvirt-uri", help=f"default {d.libvirt_uri}")
    p.add_argument("--host-id", dest="sanlock_host_id", type=int,
                   help="this host's sanlock host id on shared domains, 1-2000 (default none)")
    p.add_argument("--monitor-interval", type=float, help=f"seconds (default {d.monitor_interval})")
    p.add_argument("--monitor-timeout", type=float, help=f"seconds (default {d.monitor_timeout})")
    p.add_argument("--job-poll-interval", type=float,
                   help=f"seconds (default {d.job_poll_interval})")
    p.add_argument("--pivot-budget", type=float,
                   help=f"seconds of failing pivots before abort (default {d.pivot_budget})")
    p.add_argument("--final-job-ttl", type=float,
                   help=f"seconds a finished job stays in vmJobs once shown (default {d.final_job_ttl})")
    p.add_argument("--no-block-job-events", dest="block_job_events", action="store_const",
                   const=False, help="ignore libvirt's block job events: poll only")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server key (PEM)")
    p.add_argument("--tls-ca", help="CA that signs the clients' certificates (PEM)")
    p.add_argument("--insecure", action="store_const", const=True,
                   help="allow plain HTTP on a non-loopback address")
    p.add_argument("--log-level", help=f"default {d.log_level}")
    p.add_argument("--log-format", choices=["text", "json"], help=f"default {d.log_format}")


_FLAG_SETTINGS = ("listen", "state_dir", "libvirt_uri", "sanlock_host_id", "monitor_interval",
                  "monitor_timeout", "job_poll_interval", "pivot_budget", "final_job_ttl",
                  "block_job_events", "tls_cert",
                  "tls_key", "tls_ca", "insecure", "log_level", "log_format")


def effective_config(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(args.config, {k: getattr(args, k) for k in _FLAG_SETTINGS})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmhost", description="vmhost host agent")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    demo = sub.add_parser("demo", help="snapshots, merges, a crash mid-merge, recovery: the whole story")
    demo.add_argument("--state-dir", help="default /var/lib/vmhost-demo, "
                      "/var/lib/vmhost-demo-fleet with --fleet")
    demo.add_argument("--keep", action="store_true",
                      help="leave the VM and volumes (with --fleet: the lab's hosts running)")
    demo.add_argument("--fleet", action="store_true",
                      help="the failover story on a lab of two hosts: one loses power "
                           "mid-merge, the VM restarts on the other (`vmhost lab`, root)")
    cfg = sub.add_parser("config", help="configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    _config_flags(cfg_sub.add_parser("show", help="print the effective configuration (TOML)"))
    pki = sub.add_parser("pki", help="test certificates")
    pki.add_argument("pki_args", nargs=argparse.REMAINDER, help="init DIR [--force]")
    sub.add_parser("unit", help="print the systemd unit file")
    sub.add_parser("lab", help="several hosts on this machine, for development and tests "
                   "(`vmhost lab --help`)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lab"]:   # parsed by the lab itself: options of its own, before its action
        from vmhost.lab import cli as labcli     # a development tool: not the agent's imports
        return labcli.main(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "demo":
        from vmhost.cli.demo import run_demo
        return run_demo(args.state_dir, keep=args.keep, fleet=args.fleet)
    if args.command == "pki":
        from vmhost.cli import pki as pkimod
        return pkimod.main(args.pki_args)
    if args.command == "unit":
        print(resources.files("vmhost").joinpath("data/vmhost.service").read_text(), end="")
        return 0
    ssl_context = None
    try:
        config = effective_config(args)
        if args.command == "serve":
            from vmhost.api import tls
            tls.check_listen(config.address[0], config.tls, config.insecure)
            ssl_context = tls.server_context_or_none(config.tls_cert, config.tls_key,
                                                     config.tls_ca)
    except ValueError as e:
        print(f"vmhost: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config.to_toml(), end="")
        return 0
    return serve_forever(config, ssl_context, adopt_identity=args.adopt_identity)


EXIT_IDENTITY = 3   # refused to start: the agent identity is lost or damaged


def serve_forever(config: configmod.Config, ssl_context=None,
                  adopt_identity: str | None = None) -> int:
    from vmhost.agent import Agent
    from vmhost.identity import IdentityError
    from vmhost.logs import setup_logging
    setup_logging(config.log_level, config.log_format)
    try:
        agent = Agent(config, ssl_context=ssl_context, adopt_identity=adopt_identity)
    except IdentityError as e:
        print(f"vmhost: refusing to start: {e}", file=sys.stderr)
        return EXIT_IDENTITY
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stop.set())
    agent.start()
    stop.wait()
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
