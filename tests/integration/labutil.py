"""Helpers for tests on `vmhost lab` (several hosts on this machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT, wait_for
from vmhost.client import Client


def lab_cli(lab_dir: str, *args: str, timeout: float = 180) -> str:
    done = subprocess.run([sys.executable, "-m", "vmhost.cli.main", "lab", "--dir", lab_dir, *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, f"lab {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def lab_dir(workdir):
    path = os.path.join(workdir, "lab")
    yield path
    # Whatever happened, nothing of the lab may outlive the test.
    subprocess.run([sys.executable, "-m", "vmhost.cli.main", "lab", "--dir", path, "down"],
                   env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)


def wait_acquired(url: str, sd: str, timeout: float = 60) -> None:
    with Client(url, timeout=10) as c:
        wait_for(lambda: c.call("Host.getStorageRepoStats", domains=[sd])[sd]["acquired"],
                 timeout, f"{url} to acquire its host id in {sd}")


def lab_up(lab_dir: str, storage: str, hosts: int) -> list[dict]:
    return json.loads(lab_cli(lab_dir, "up", "--hosts", str(hosts), "--storage", storage,
                              "--json"))["hosts"]


def shared_domain(hosts: list[dict], storage: str) -> str:
    """A posixfs domain created by the first host, connected by the others, joined by all."""
    sd = str(uuid.uuid4())
    with Client(hosts[0]["url"], timeout=30) as c:
        c.call("StorageDomain.create", storagedomainID=sd, domainType=6, typeArgs=storage,
               name="shared")
    for h in hosts[1:]:
        with Client(h["url"], timeout=30) as c:
            c.call("StorageDomain.connect", storagedomainID=sd, domainType=6, typeArgs=storage)
    for h in hosts:
        wait_acquired(h["url"], sd)
    return sd


def retry(attempt, timeout: float, what: str, interval: float = 1.0):
    """Call attempt() until it returns a truthy value, `interval` apart, as an engine
    retries a verb (each attempt may be costly: a VM.create starts a QEMU)."""
    deadline = time.monotonic() + timeout
    while not (value := attempt()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return value
