#!/usr/bin/env python3
"""Run a command as a child subreaper and reap every orphan promptly.

QEMU daemonizes, so its process is re-parented; on machines whose PID 1 reaps
zombies slowly, libvirt then sees a destroyed VM as alive for ~2 s. Running
libvirtd under a subreaper makes orphaned QEMU processes our children, and we
reap them at once.
"""
import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: subreaper.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("subreaper: prctl failed", file=sys.stderr)
    child = os.fork()
    if child == 0:
        os.execvp(sys.argv[1], sys.argv[1:])
    # Forward termination to the main child so `kill <subreaper>` stops it.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: os.kill(child, s))
    status = 0
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            return status
        except InterruptedError:
            continue
        if pid == child:
            status = os.waitstatus_to_exitcode(st)


if __name__ == "__main__":
    sys.exit(main())
