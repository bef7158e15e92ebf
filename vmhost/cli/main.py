"""`vmhost` command: serve the agent, or run the demo."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from vmhost.config import Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmhost", description="vmhost host agent")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the agent")
    serve.add_argument("--listen", default=Config.listen, help="HOST:PORT (default %(default)s)")
    serve.add_argument("--state-dir", default=Config.state_dir)
    serve.add_argument("--libvirt-uri", default=Config.libvirt_uri)
    serve.add_argument("--monitor-interval", type=float, default=Config.monitor_interval)
    serve.add_argument("--job-poll-interval", type=float, default=Config.job_poll_interval)
    serve.add_argument("--pivot-retries", type=int, default=Config.pivot_retries)
    serve.add_argument("--no-block-job-events", dest="block_job_events", action="store_false",
                       help="ignore libvirt's block job events: poll only (for measurements)")
    serve.add_argument("--log-level", default=Config.log_level)
    demo = sub.add_parser("demo", help="create a VM, snapshot it twice, show its chain")
    demo.add_argument("--state-dir", default="/var/lib/vmhost-demo")
    demo.add_argument("--keep", action="store_true", help="leave the VM and volumes")
    args = parser.parse_args(argv)
    if args.command == "serve":
        config = Config(listen=args.listen, state_dir=args.state_dir,
                        libvirt_uri=args.libvirt_uri, monitor_interval=args.monitor_interval,
                        job_poll_interval=args.job_poll_interval,
                        pivot_retries=args.pivot_retries,
                        block_job_events=args.block_job_events, log_level=args.log_level)
        return serve_forever(config)
    from vmhost.cli.demo import run_demo
    return run_demo(args.state_dir, keep=args.keep)


def serve_forever(config: Config) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config.address
    except ValueError as e:
        print(f"vmhost: {e}", file=sys.stderr)
        return 2
    from vmhost.agent import Agent
    agent = Agent(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stop.set())
    agent.start()
    stop.wait()
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
