"""Run a `vmhost serve` child process: used by the demo, the tests and the benchmarks."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from vmhost.client import Client, RpcError, TransportError

RECOVERING = 99


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    def __init__(self, state_dir: str, port: int | None = None, log_path: str | None = None,
                 extra_args: list[str] | None = None, env: dict | None = None):
        self.state_dir = state_dir
        self.port = port or free_port()
        self.log_path = log_path or os.path.join(state_dir, "agent.log")
        self.extra_args = extra_args or []
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}/jsonrpc"
        self.client = Client(self.url)

    def start(self) -> "AgentProcess":
        os.makedirs(self.state_dir, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmhost.cli.main", "serve", "--listen",
             f"127.0.0.1:{self.port}", "--state-dir", self.state_dir, *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(self.env or {})})
        log.close()
        return self

    def wait_listening(self, timeout: float = 30) -> None:
        self._wait(lambda: self.client.call("Host.ping"), timeout, "listen")

    def wait_ready(self, timeout: float = 60) -> None:
        self._wait(lambda: self.client.call("Host.getVMList"), timeout, "become ready")

    def _wait(self, probe, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}; log {self.log_path}")
            try:
                probe()
                return
            except RpcError as e:
                if e.code != RECOVERING:
                    raise
                last = e
            except (OSError, TransportError) as e:
                last = e
            time.sleep(0.05)
        raise TimeoutError(f"agent did not {what} within {timeout}s: {last}")

    def kill9(self) -> None:
        """Die like a crash: SIGKILL, no clean-up."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()
