"""The operator surface on a real agent: refusing plain HTTP on a public
address, the effective configuration, Prometheus metrics during and after a
merge, JSON logs of every job transition, job history across a restart, and
mutual TLS."""
from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import Env, _destroy_test_domains, chain_with_data, wait_for
from vmhost.testing.agentproc import AgentProcess, free_port
from vmhost.client import Client, TransportError

MiB = 1 << 20


def vmhost(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmhost.cli.main", *args], capture_output=True,
                          text=True, timeout=60, **kw)


def test_refuses_public_listen_without_tls(workdir):
    p = vmhost("serve", "--listen", f"0.0.0.0:{free_port()}", "--state-dir", workdir)
    assert p.returncode == 2
    assert "0.0.0.0" in p.stderr and "--insecure" in p.stderr and "TLS" in p.stderr


def test_config_show_merges_file_and_flags(workdir):
    path = os.path.join(workdir, "vmhost.toml")
    with open(path, "w") as f:
        f.write('state_dir = "/srv/vmhost"\nmonitor_interval = 2\npivot_budget = 9\n')
    p = vmhost("config", "show", "--config", path, "--pivot-budget", "3")
    assert p.returncode == 0, p.stderr
    assert 'state_dir = "/srv/vmhost"' in p.stdout
    assert "monitor_interval = 2.0" in p.stdout
    assert "pivot_budget = 3.0" in p.stdout               # the flag wins over the file
    assert 'listen = "127.0.0.1:54321"' in p.stdout      # defaults are shown too
    with open(path, "a") as f:
        f.write("colour = 1\n")
    p = vmhost("config", "show", "--config", path)
    assert p.returncode == 2 and "colour" in p.stderr


def scrape(agent) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return 0.0


def test_metrics_during_and_after_a_merge(env, workdir):
    vm, img, (base, mid, leaf), g = chain_with_data(env, workdir)
    before = scrape(env.agent)
    assert metric(before, "vmhost_vms", status="Up") == 1
    assert metric(before, "vmhost_domain_valid", domain=env.sd) == 1
    assert metric(before, "vmhost_merge_jobs_total", outcome="done", kind="internal") == 0
    job = env.call("VM.merge", vmID=vm, drive={"domainID": env.sd, "imageID": img,
                                               "volumeID": leaf},
                   baseVolUUID=base, topVolUUID=mid, bandwidth=4)
    during = wait_for(lambda: (t := scrape(env.agent)) and
                      metric(t, "vmhost_jobs", state="COMMIT") == 1 and t, 20, "COMMIT gauge")
    assert metric(during, "vmhost_api_requests_total", verb="VM.merge") == 1
    env.wait_job_gone(vm, job, 60)
    # The counters follow the job's DONE event, published just after it left vmJobs.
    after = wait_for(lambda: (t := scrape(env.agent)) and metric(
        t, "vmhost_merge_jobs_total", outcome="done", kind="internal") == 1 and t, 10,
        "the DONE counter")
    assert metric(after, "vmhost_jobs", state="COMMIT") == 0
    assert metric(after, "vmhost_merge_duration_seconds_count", kind="internal") == 1
    assert metric(after, "vmhost_merge_duration_seconds_sum", kind="internal") > 0
    assert metric(after, "vmhost_merge_bytes_total", kind="internal") > 0
    assert metric(after, "vmhost_recovery_duration_seconds") > 0
    with pytest.raises(Exception):
        env.call("VM.getStats", vmID=str(uuid.uuid4()))
    assert metric(scrape(env.agent), "vmhost_api_errors_total", verb="VM.getStats", code="1") == 1


def test_json_log_and_job_history_across_restart(workdir, libvirtd):
    storage_root = os.path.join(workdir, "storage")
    os.makedirs(storage_root)
    agent = AgentProcess(os.path.join(workdir, "state"),
                         extra_args=["--monitor-interval", "0.5", "--log-format", "json"])
    agent.start().wait_ready()
    env = Env(agent=agent, sd=str(uuid.uuid4()), storage_root=storage_root, conn=libvirtd)
    try:
        env.call("StorageDomain.create", storagedomainID=env.sd, domainType="localfs",
                 typeArgs=storage_root, name="json-log")
        vm, img, (base, mid, leaf), g = chain_with_data(env, workdir)
        job = env.call("VM.merge", vmID=vm, drive={"domainID": env.sd, "imageID": img,
                                                   "volumeID": leaf},
                       baseVolUUID=mid, topVolUUID=leaf)
        env.wait_job_gone(vm, job, 60)

        def job_records():
            with open(agent.log_path) as f:
                return [r for r in (json.loads(line) for line in f if line.startswith("{"))
                        if r.get("jobID") == job]
        wait_for(lambda: any(r["to"] == "DONE" for r in job_records()), 10, "the DONE line")
        env.agent.kill9()
        records = job_records()
        moves = [(r["from"], r["to"]) for r in records if r.get("jobID") == job]
        assert moves == [(None, "STARTING"), ("STARTING", "COMMIT"), ("COMMIT", "READY"),
                         ("READY", "PIVOT"), ("PIVOT", "CLEANUP"), ("CLEANUP", "DONE")]
        for r in records:
            if r.get("jobID") == job:
                assert r["vmID"] == vm and r["drive"] == "vda" and r["reason"]
        env.agent = AgentProcess(agent.state_dir, extra_args=["--monitor-interval", "0.5"])
        env.agent.start().wait_ready()
        history = [h for h in env.call("Host.getJobHistory") if h["id"] == job]
        assert [h["state"] for h in history] == ["DONE"]
        assert history[0]["vmId"] == vm and history[0]["top"] == leaf
    finally:
        env.agent.stop()
        _destroy_test_domains(libvirtd)


def test_mutual_tls_on_a_real_agent(workdir):
    pki, other = os.path.join(workdir, "pki"), os.path.join(workdir, "other-pki")
    for d in (pki, other):
        p = vmhost("pki", "init", d)
        assert p.returncode == 0, p.stderr
    f = lambda d, n: os.path.join(d, n)  # noqa: E731
    port = free_port()
    agent = AgentProcess(os.path.join(workdir, "state"), port=port, extra_args=[
        "--listen", f"127.0.0.1:{port}", "--tls-cert", f(pki, "server.pem"),
        "--tls-key", f(pki, "server-key.pem"), "--tls-ca", f(pki, "ca.pem")])
    # AgentProcess adds its own --listen first; the later one is the same address.
    agent.url = f"https://localhost:{port}/jsonrpc"
    agent.client = Client(agent.url, tls_cert=f(pki, "client.pem"),
                          tls_key=f(pki, "client-key.pem"), tls_ca=f(pki, "ca.pem"))
    agent.start()
    try:
        agent.wait_ready()
        assert agent.client.call("Host.ping") is True
        refused = [
            Client(agent.url, tls_ca=f(pki, "ca.pem")),                       # no certificate
            Client(agent.url, tls_cert=f(other, "client.pem"),               # another CA
                   tls_key=f(other, "client-key.pem"), tls_ca=f(pki, "ca.pem")),
        ]
        for client in refused:
            with pytest.raises((TransportError, ssl.SSLError, OSError)):
                client.call("Host.ping")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/jsonrpc", data=b"{}", timeout=10)
        assert agent.client.call("Host.getVMList") == []          # still serving
    finally:
        agent.stop()
