"""Every tunable of the agent in one typed place.

Sources, later ones winning: the defaults below, a TOML file (`--config`,
default /etc/vmhost/vmhost.toml when it exists), command-line flags.
`vmhost config show` prints the effective result.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing

DEFAULT_CONFIG_FILE = "/etc/vmhost/vmhost.toml"
MAX_SANLOCK_HOST_ID = 2000                   # sanlock's limit on host ids in a lockspace


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class Config:
    # API
    listen: str = "127.0.0.1:54321"          # HOST:PORT
    max_request_bytes: int = 1 << 20         # larger JSON-RPC bodies are refused (413)
    max_connections: int = 256               # API connections (HTTP + STOMP); more are refused
    tls_cert: str = ""                       # server certificate (PEM); TLS when all three are set
    tls_key: str = ""
    tls_ca: str = ""                         # CA that signs client certificates (mutual TLS)
    insecure: bool = False                   # allow plain HTTP on a non-loopback address
    # Paths and libvirt
    state_dir: str = "/var/lib/vmhost"
    libvirt_uri: str = "qemu:///system"
    # Shared storage: this host's sanlock host id in every lockspace it joins, unique
    # among the hosts sharing a domain (1-2000; 0 = none: shared domains cannot be
    # joined). Not the agent's identity UUID (state_dir/host-id).
    sanlock_host_id: int = 0
    sanlock_io_timeout: int = 10             # seconds; a dead host's leases expire after 8x + 60
    # Storage domain monitor
    monitor_interval: float = 5.0            # seconds between domain checks
    monitor_timeout: float = 10.0            # a domain read slower than this makes it INVALID
    # Storage operations (see vmhost/storage/executor.py)
    storage_op_timeout: float = 30.0         # a storage operation past this fails; domain INVALID
    storage_workers: int = 4                 # threads per domain: what a hung domain can park
    storage_queue: int = 16                  # operations waiting per domain before refusals
    # Block jobs
    job_poll_interval: float = 1.0           # seconds between polls of a running block job
    block_job_events: bool = True            # poll at once on libvirt's BLOCK_JOB_2 event
    pivot_budget: float = 300.0              # seconds of failing pivots before a merge is aborted
    pivot_timeout: float = 10.0              # seconds to wait for the live XML after a pivot
    pivot_slots: int = 2                     # VMs paused for a pivot at once (virt/pivotslots.py)
    final_job_ttl: float = 10.0              # seconds a finished job stays in vmJobs once shown
    job_history_size: int = 1000             # finished jobs kept for Host.getJobHistory
    job_history_ttl: float = 7 * 86400.0     # seconds a finished job is kept
    # Storage jobs (cold merge, vmhost/storage/coldmerge.py)
    cold_merge_timeout: float = 6 * 3600.0   # deadline of one qemu-img commit
    storage_job_ttl: float = 3600.0          # seconds a finished job stays in Host.getJobs
    # Scheduler
    workers: int = 8                         # threads running scheduled work
    retry_backoff_max: float = 30.0          # ceiling of the retry backoff, seconds
    # Logging
    log_level: str = "INFO"
    log_format: str = "text"                 # "text" or "json" (one JSON object per line)

    @property
    def address(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not host or int(port) > 65535:
            raise ConfigError(f"listen wants HOST:PORT, got {self.listen!r}")
        return host.strip("[]"), int(port)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key or self.tls_ca)

    def validate(self) -> "Config":
        self.address
        if self.tls and not (self.tls_cert and self.tls_key and self.tls_ca):
            raise ConfigError("TLS needs all of tls_cert, tls_key and tls_ca")
        if not 0 <= self.sanlock_host_id <= MAX_SANLOCK_HOST_ID:
            raise ConfigError(f"sanlock_host_id must be 1-{MAX_SANLOCK_HOST_ID} "
                              f"(0 = none), got {self.sanlock_host_id}")
        if self.sanlock_io_timeout < 1:
            raise ConfigError(f"sanlock_io_timeout must be at least 1, got {self.sanlock_io_timeout}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"{f.name} must not be negative, got {value}")
        if self.pivot_slots < 1:
            raise ConfigError(f"pivot_slots must be at least 1, got {self.pivot_slots}")
        if self.storage_workers < 1 or self.storage_op_timeout <= 0:
            raise ConfigError("storage_workers must be at least 1 and storage_op_timeout "
                              f"positive, got {self.storage_workers} and {self.storage_op_timeout}")
        return self

    def to_toml(self) -> str:
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (int, float)):
                text = repr(value)
            else:
                text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{f.name} = {text}")
        return "\n".join(lines) + "\n"


def load(path: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the TOML file, then `overrides` (flags given on the command line)."""
    values: dict = {}
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    if path:
        try:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(values, source=path or "flags").validate()


def from_dict(values: dict, source: str = "config") -> Config:
    hints = typing.get_type_hints(Config)
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    clean = {}
    for name, value in values.items():
        want = hints[name]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: {name} must be {want.__name__}, got {value!r}")
        clean[name] = value
    return Config(**clean)
