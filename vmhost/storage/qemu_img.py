"""The one adapter to qemu-img (and qemu-io for data checks).

One function per command, argv lists (no shell), JSON output parsed; failures
become QemuImgError naming the command and qemu-img's own message.

Every command has a deadline: the time left to the storage operation it runs
in (vmhost.storage.executor.remaining), else DEFAULT_TIMEOUT. Past it the child
is killed (SIGKILL ends a wait on NFS or FUSE); a child that still does not
exit is left to a reaper thread, so the caller never waits on it.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import threading
from typing import Any, Callable

from vmhost.storage import executor

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
DEFAULT_TIMEOUT = 600
KILL_GRACE = 1.0            # seconds to wait for a killed child before leaving it to a reaper


class QemuImgError(Exception):
    def __init__(self, cmd: list[str], rc: int, err: str):
        self.cmd, self.rc, self.err = cmd, rc, err.strip()
        super().__init__(f"{cmd[0]} {cmd[1]} failed (rc={rc}): {self.err}")


class QemuImgTimeout(QemuImgError):
    """The command did not finish by its deadline and was killed."""


class Stop(Exception):
    """Raised by an output handler to end the command: the child is killed
    and Stop is raised to the caller (an aborted job)."""


def _spawn(cmd: list[str], timeout: float | None = None,
           on_output: Callable[[str], None] | None = None,
           die_with_parent: bool = False) -> subprocess.CompletedProcess:
    """Run cmd to completion within its deadline (see the module docstring).
    `on_output` gets stdout as it comes (the result's stdout is then empty)."""
    limit = executor.remaining(DEFAULT_TIMEOUT)
    if timeout is not None:
        limit = min(limit, timeout)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_die_with_parent if die_with_parent else None)
    try:
        if on_output is None:
            out, err = proc.communicate(timeout=limit)
        else:
            out, err = _follow(proc, on_output, limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=KILL_GRACE)    # reaps it and closes the pipes
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) does not exit after SIGKILL; reaping it later",
                        " ".join(cmd[:2]), proc.pid)
            threading.Thread(target=proc.communicate, daemon=True,
                             name=f"reap/{proc.pid}").start()
        raise QemuImgTimeout(cmd, -9, f"timed out after {limit:g}s, killed") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _follow(proc: subprocess.Popen, on_output: Callable[[str], None],
            limit: float) -> tuple[str, str]:
    """Feed stdout to on_output while it comes; stderr is collected. An
    Exception in on_output is logged (a reporting bug must not stop the
    command); Stop, or anything that is not an Exception (a simulated crash),
    kills the child and is raised here."""
    stop: list[BaseException] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        # os.read returns what is there: qemu-img ends progress lines with \r only.
        while chunk := os.read(proc.stdout.fileno(), 4096):
            try:
                on_output(chunk.decode(errors="replace"))
            except BaseException as e:
                if isinstance(e, Exception) and not isinstance(e, Stop):
                    log.exception("qemu-img output handler failed")
                    continue
                stop.append(e)
                proc.kill()
                return
    reader = threading.Thread(target=read_stdout, daemon=True, name=f"follow/{proc.pid}")
    reader.start()
    assert proc.stderr is not None
    err: list[str] = []
    err_reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    err_reader.start()
    proc.wait(timeout=limit)
    reader.join(KILL_GRACE)
    err_reader.join(KILL_GRACE)
    if stop:
        raise stop[0]
    return "", "".join(err)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the agent dies (PR_SET_PDEATHSIG),
    so a restarted agent never races an orphaned qemu-img on the same images."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG = 1


def _run(cmd: list[str], timeout: float | None = None) -> str:
    p = _spawn(cmd, timeout)
    if p.returncode != 0:
        raise QemuImgError(cmd, p.returncode, p.stderr or p.stdout)
    return p.stdout


def create(path: str, fmt: str, size: int | None = None, backing: str | None = None,
           backing_fmt: str | None = None, preallocation: str | None = None) -> None:
    """Create an image. `backing` is written into the header as given, so a
    bare volume UUID stays a relative name resolved beside the image."""
    cmd = [QEMU_IMG, "create", "-q", "-f", fmt]
    opts = []
    if fmt == "qcow2":
        opts.append("compat=1.1")
    if preallocation:
        opts.append(f"preallocation={preallocation}")
    if opts:
        cmd += ["-o", ",".join(opts)]
    if backing:
        cmd += ["-b", backing, "-F", backing_fmt or "qcow2"]
    cmd.append(path)
    if size is not None:
        cmd.append(str(size))
    _run(cmd)


def info(path: str, backing_chain: bool = False, force_share: bool = True,
         timeout: float | None = None) -> Any:
    """`qemu-img info --output json`; a list (top first) with backing_chain."""
    cmd = [QEMU_IMG, "info", "--output", "json"]
    if force_share:
        cmd.append("-U")
    if backing_chain:
        cmd.append("--backing-chain")
    cmd.append(path)
    return json.loads(_run(cmd, timeout))


def measure(path: str, out_fmt: str = "qcow2", base: str | None = None) -> dict:
    cmd = [QEMU_IMG, "measure", "--output", "json", "-U", "-O", out_fmt, path]
    return json.loads(_run(cmd))


def check(path: str) -> dict:
    """`qemu-img check`; returns the JSON report (rc 2/3 = corruption/leaks still report)."""
    cmd = [QEMU_IMG, "check", "--output", "json", "-U", path]
    p = _spawn(cmd)
    if p.returncode not in (0, 2, 3) or not p.stdout.strip():
        raise QemuImgError(cmd, p.returncode, p.stderr)
    return json.loads(p.stdout)


def commit(top: str, base: str | None = None, drop: bool = False,
           progress: Callable[[float], None] | None = None,
           timeout: float | None = None) -> None:
    """`qemu-img commit -t none`: top's data into its backing file (or `base`).
    With `progress`, qemu-img's `-p` percentages (0.0-100.0) are passed to it
    as they come, from a reader thread. The child dies with the agent (see
    _die_with_parent): a commit must never outlive the job that runs it."""
    cmd = [QEMU_IMG, "commit", "-t", "none", "-p" if progress else "-q"]
    if drop:
        cmd.append("-d")
    if base:
        cmd += ["-b", base]
    cmd.append(top)
    if progress is None:
        _run(cmd, timeout)
        return
    p = _spawn(cmd, timeout, on_output=_progress_parser(progress), die_with_parent=True)
    if p.returncode != 0:
        raise QemuImgError(cmd, p.returncode, p.stderr or p.stdout)


_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def _progress_parser(progress: Callable[[float], None]) -> Callable[[str], None]:
    """qemu-img -p writes `    (12.34/100%)` lines separated by \\r."""
    def on_output(chunk: str) -> None:
        for match in _PROGRESS.finditer(chunk):
            progress(float(match.group(1)))
    return on_output


def rebase(path: str, backing: str, backing_fmt: str = "qcow2", unsafe: bool = False) -> None:
    cmd = [QEMU_IMG, "rebase", "-q", "-t", "none", "-F", backing_fmt, "-b", backing]
    if unsafe:
        cmd.append("-u")
    cmd.append(path)
    _run(cmd)


def resize(path: str, size: int, fmt: str = "qcow2") -> None:
    _run([QEMU_IMG, "resize", "-q", "-f", fmt, path, str(size)])


def compare(a: str, b: str, strict: bool = False) -> bool:
    """True when the guest-visible contents match (rc 0), False on rc 1."""
    cmd = [QEMU_IMG, "compare", "-U"]
    if strict:
        cmd.append("-s")
    cmd += [a, b]
    p = _spawn(cmd)
    if p.returncode in (0, 1):
        return p.returncode == 0
    raise QemuImgError(cmd, p.returncode, p.stderr)


def io(path: str, command: str, fmt: str = "qcow2", force_share: bool = False) -> str:
    """Run one qemu-io command (e.g. 'write -P 0xab 0 1M') on an image not in use."""
    cmd = [QEMU_IO, "-f", fmt]
    if force_share:
        cmd += ["-r", "-U"]   # qemu-io shares an image in use only read-only
    cmd += ["-c", command, path]
    out = _run(cmd)
    # qemu-io reports pattern mismatches on stdout with rc 0.
    if "Pattern verification failed" in out or "failed" in out.lower():
        raise QemuImgError(cmd, 1, out)
    return out
