"""A FUSE passthrough file system that a test can freeze, path by path.

Why: on a hard-mounted NFS or a dead iSCSI path a read or an fsync sleeps in
the kernel until the storage answers. This file system reproduces that for
real: every operation on a path matching a frozen pattern (fnmatch against the
path inside the mount, e.g. "*.meta") blocks in the FUSE daemon until the test
releases it, so the caller sleeps in the kernel exactly like on a hung mount.
Paths that match no pattern keep flowing: freeze only the volume metadata and
QEMU's own I/O to the volume files goes on.

Use from a test (the `hung_env` fixture in conftest.py does all of this):

    fs = FreezeFS(source_dir, mountpoint).start()    # mounted, allow_other
    try:
        with fs.frozen(*METADATA):                    # metadata reads/writes hang
            ...                                       # fs.blocked(): who is hung
        # released: the hung operations complete now
    finally:
        fs.stop()                                     # release, unmount, stop

The daemon runs as its own process (`python freezefs.py SOURCE MOUNTPOINT
SOCKET_NAME`), started by FreezeFS. It is controlled over an abstract UNIX
socket of that name, one line
per command and one line of JSON per answer, answered by a thread of its own
so that control never waits on a frozen FUSE request:

    freeze PATTERN...    add patterns (answer once they are in force)
    release              drop every pattern; blocked operations go on
    blocked              the (operation, path) pairs blocked right now

It needs fusepy (pip, test extras) and libfuse2 + fusermount (Debian `fuse`,
installed by scripts/setup-host.sh). It mounts with allow_other (QEMU runs as
libvirt-qemu) and default_permissions (the kernel checks the file modes, since
the daemon itself runs as root).
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from typing import Iterator

HERE = os.path.abspath(__file__)
# Patterns of a file domain's volume metadata: the .meta files and the
# temporary files atomic_write renames over them.
METADATA = ("*.meta", "*.meta.tmp.*")


# --- the test side -----------------------------------------------------------------

class FreezeFS:
    def __init__(self, source: str, mountpoint: str, start_timeout: float = 20.0):
        self.source, self.mountpoint = source, mountpoint
        # An abstract UNIX socket: no file, no path length limit, gone with the daemon.
        self.socket_name = f"freezefs-{uuid.uuid4().hex}"
        self.log_path = mountpoint.rstrip("/") + ".freezefs.log"
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None

    def start(self) -> "FreezeFS":
        os.makedirs(self.source, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, HERE, self.source, self.mountpoint, self.socket_name],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self._start_timeout
        while not (os.path.ismount(self.mountpoint) and self._answers()):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"freezefs did not mount {self.mountpoint}; "
                                   f"see {self.log_path}: {self._log_tail()}")
            time.sleep(0.02)
        return self

    def freeze(self, *patterns: str) -> None:
        if not patterns:
            raise ValueError("freeze needs at least one path pattern")
        self._command("freeze " + " ".join(patterns))

    def release(self) -> None:
        self._command("release")

    def blocked(self) -> list[tuple[str, str]]:
        return [tuple(pair) for pair in self._command("blocked")]

    @contextlib.contextmanager
    def frozen(self, *patterns: str) -> Iterator["FreezeFS"]:
        self.freeze(*patterns)
        try:
            yield self
        finally:
            self.release()

    def stop(self) -> None:
        """Release everything, unmount, stop the daemon. Idempotent."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):
                self.release()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount", "-u", "-z", self.mountpoint], check=False)
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def _answers(self) -> bool:
        try:
            self.blocked()
            return True
        except OSError:
            return False

    def _command(self, line: str):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect("\0" + self.socket_name)
            s.sendall(line.encode() + b"\n")
            answer = s.makefile("rb").readline()
        if not answer:
            raise RuntimeError(f"freezefs gave no answer to {line!r}")
        reply = json.loads(answer)
        if "error" in reply:
            raise RuntimeError(f"freezefs: {reply['error']}")
        return reply["result"]

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""


# --- the daemon side ----------------------------------------------------------------

class Gate:
    """The frozen patterns, and the operations waiting on them."""

    def __init__(self):
        self._cond = threading.Condition()
        self._patterns: list[str] = []
        self._blocked: list[tuple[str, str]] = []

    def freeze(self, patterns: list[str]) -> None:
        with self._cond:
            self._patterns.extend(patterns)

    def release(self) -> None:
        with self._cond:
            self._patterns.clear()
            self._cond.notify_all()

    def blocked(self) -> list[tuple[str, str]]:
        with self._cond:
            return list(self._blocked)

    def wait(self, op: str, *paths: str | None) -> None:
        with self._cond:
            while any(p and self._matches(p) for p in paths):
                entry = (op, next(p for p in paths if p and self._matches(p)))
                self._blocked.append(entry)
                try:
                    self._cond.wait()
                finally:
                    self._blocked.remove(entry)

    def _matches(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, pat) for pat in self._patterns)


def _passthrough(root: str, gate: Gate):
    from fuse import FuseOSError, Operations

    class Passthrough(Operations):
        """Every call waits at the gate for its path(s), then acts on the same
        path under `root` (fusepy's loopback example, with pread/pwrite)."""
        use_ns = True

        def __call__(self, op, path, *args):
            if op == "rename" or op == "link":
                gate.wait(op, path, args[0])
                return getattr(self, op)(self._full(path), self._full(args[0]))
            gate.wait(op, path)
            return super().__call__(op, self._full(path), *args)

        @staticmethod
        def _full(path: str | None) -> str | None:
            return None if path is None else root + path

        def access(self, path, mode):
            if not os.access(path, mode):
                raise FuseOSError(errno.EACCES)

        chmod = os.chmod

        def chown(self, path, uid, gid):
            os.lchown(path, uid, gid)

        def create(self, path, mode, fi=None):
            return os.open(path, os.O_RDWR | os.O_CREAT, mode)

        def flush(self, path, fh):
            return 0

        def fsync(self, path, datasync, fh):
            (os.fdatasync if datasync else os.fsync)(fh)
            return 0

        def fsyncdir(self, path, datasync, fh):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return 0

        def getattr(self, path, fh=None):
            st = os.fstat(fh) if fh is not None and path is None else os.lstat(path)
            return {k: getattr(st, k) for k in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino", "st_rdev",
                "st_blocks")} | {   # use_ns: times in nanoseconds
                "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                "st_ctime": st.st_ctime_ns}

        def link(self, target, source):
            os.link(source, target)

        def mkdir(self, path, mode):
            os.mkdir(path, mode)

        def mknod(self, path, mode, dev):
            os.mknod(path, mode, dev)

        def open(self, path, flags):
            # O_DIRECT stays in the kernel's FUSE layer (no page cache there);
            # the daemon's own buffers are not aligned for it.
            return os.open(path, flags & ~os.O_DIRECT)

        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(path)]

        readlink = os.readlink

        def release(self, path, fh):
            os.close(fh)
            return 0

        def rename(self, old, new):
            os.rename(old, new)

        rmdir = os.rmdir

        def statfs(self, path):
            st = os.statvfs(path)
            return {k: getattr(st, k) for k in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")}

        def symlink(self, target, source):
            os.symlink(source, target)

        def truncate(self, path, length, fh=None):
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(path, length)

        unlink = os.unlink

        def utimens(self, path, times=None):
            os.utime(path, ns=times)

        def write(self, path, data, offset, fh):
            return os.pwrite(fh, data, offset)

    return Passthrough()


class _Control(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        gate: Gate = self.server.gate          # type: ignore[attr-defined]
        words = self.rfile.readline().decode().split()
        try:
            if words[:1] == ["freeze"] and len(words) > 1:
                result = gate.freeze(words[1:])
            elif words == ["release"]:
                result = gate.release()
            elif words == ["blocked"]:
                result = gate.blocked()
            else:
                raise ValueError(f"unknown command {' '.join(words)!r}")
            reply = {"result": result}
        except Exception as e:
            reply = {"error": str(e)}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


def serve(source: str, mountpoint: str, socket_name: str) -> None:
    from fuse import FUSE

    gate = Gate()
    server = socketserver.ThreadingUnixStreamServer("\0" + socket_name, _Control)
    server.daemon_threads = True
    server.gate = gate                         # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True, name="control").start()
    try:
        FUSE(_passthrough(os.path.realpath(source), gate), mountpoint, foreground=True,
             nothreads=False, allow_other=True, default_permissions=True, use_ino=True,
             big_writes=True, max_write=131072, fsname="freezefs", subtype="freezefs")
    finally:
        gate.release()
        server.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: freezefs.py SOURCE MOUNTPOINT SOCKET_NAME")
    serve(*sys.argv[1:])
