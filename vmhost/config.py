"""Every tunable of the agent in one typed place."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Config:
    listen: str = "127.0.0.1:54321"
    state_dir: str = "/var/lib/vmhost"
    libvirt_uri: str = "qemu:///system"
    monitor_interval: float = 5.0     # seconds between domain checks
    monitor_timeout: float = 10.0     # a domain read slower than this makes it INVALID
    max_request_bytes: int = 1 << 20  # larger JSON-RPC bodies are refused (413)
    job_poll_interval: float = 1.0    # seconds between polls of a running block job
    block_job_events: bool = True     # poll at once on libvirt's BLOCK_JOB_2 event
    pivot_retries: int = 5            # failed pivots before a merge is aborted
    pivot_timeout: float = 10.0       # seconds to wait for the live XML after a pivot
    workers: int = 8                  # threads running scheduled work
    retry_backoff_max: float = 30.0   # ceiling of the retry backoff, seconds
    log_level: str = "INFO"

    @property
    def address(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"--listen wants HOST:PORT, got {self.listen!r}")
        return host.strip("[]"), int(port)
