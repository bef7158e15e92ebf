"""vmhost.client and vmhost-client over stomp:// and stomps://."""
from __future__ import annotations

import json
import socket

import pytest

from stomphelpers import STATS, VM, make_server, table
from stomphelpers import bus, certs, server, tls_server  # noqa: F401 (fixtures)
from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.schema import load_schema
from vmhost.api.server import ApiServer
from vmhost.cli import client as cli
from vmhost.client import Client, RpcError, TransportError

JOB = "5b5b5b5b-5555-4555-8555-55555555abcd"


@pytest.fixture
def no_tls_env(monkeypatch):
    for name in ("VMHOST_TLS_CERT", "VMHOST_TLS_KEY", "VMHOST_TLS_CA"):
        monkeypatch.delenv(name, raising=False)


def test_calls_batches_and_errors(server):
    with Client(f"stomp://127.0.0.1:{server.port}", timeout=10) as client:
        assert client.call("Host.ping2") is True
        assert client.call("Host.getAllVmStats") == STATS
        ping, stats = client.batch([("Host.ping", {}), ("VM.getStats", {"vmID": VM})])
        assert ping is True and stats[0]["vmId"] == VM
    with Client(f"stomp://127.0.0.1:{server.port}", timeout=10, validate=False) as client:
        with pytest.raises(RpcError) as e:
            client.call("No.such")
        assert e.value.code == -32601
        assert client.call("Host.ping") is True  # the connection goes on


def test_events_over_stomp_are_the_bus_events(server, bus):
    with Client(f"stomp://127.0.0.1:{server.port}", timeout=10) as client:
        with client.events(timeout=10) as stream:  # live when it returns
            bus.publish({"event": "job", "vmId": VM, "jobId": JOB, "drive": "vda",
                         "from": "COMMIT", "to": "READY", "reason": "", "error": None})
            bus.publish({"event": "domain", "domainID": "sd", "status": "VALID", "reason": ""})
            job = next(stream)
            assert job == {"event": "job", "vmId": VM, "jobId": JOB, "drive": "vda",
                           "from": "COMMIT", "to": "READY", "reason": "", "error": None,
                           "seq": 1}
            assert stream.last_id == "1"
            assert next(stream) == {"event": "domain", "domainID": "sd", "status": "VALID",
                                    "reason": "", "seq": 2}


def test_event_stream_ends_when_the_agent_stops(bus):
    server = make_server(bus)
    stream = Client(f"stomp://127.0.0.1:{server.port}", timeout=10).events(timeout=10)
    server.stop()
    with pytest.raises(StopIteration):
        next(stream)


def test_event_stream_timeout(server):
    with Client(f"stomp://127.0.0.1:{server.port}", timeout=10).events(timeout=0.5) as stream:
        with pytest.raises(TransportError, match="nothing from"):
            next(stream)


def test_refusal_past_the_cap_is_a_transport_error(bus):
    server = make_server(bus, max_connections=1)
    held = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        with Client(f"stomp://127.0.0.1:{server.port}", timeout=10) as client:
            with pytest.raises(TransportError, match="too many connections"):
                client.call("Host.ping")
    finally:
        held.close()
        server.stop()


def test_stomps_with_certificates(tls_server, certs):
    with Client(f"stomps://127.0.0.1:{tls_server.port}", timeout=10, tls_cert=certs["client_cert"],
                tls_key=certs["client_key"], tls_ca=certs["ca"]) as client:
        assert client.call("Host.ping2") is True


def test_stomps_without_a_client_certificate_is_refused(tls_server, certs):
    with Client(f"stomps://127.0.0.1:{tls_server.port}", timeout=10, tls_ca=certs["ca"]) as client:
        with pytest.raises(TransportError):
            client.call("Host.ping")


def test_plain_stomp_to_the_tls_port_says_why(tls_server):
    with Client(f"stomp://127.0.0.1:{tls_server.port}", timeout=10) as client:
        with pytest.raises(TransportError, match="stomps://"):
            client.call("Host.ping")


def test_url_checks(certs):
    with pytest.raises(ValueError, match="use a stomps:// URL"):
        Client("stomp://127.0.0.1:1", tls_ca=certs["ca"])
    with pytest.raises(ValueError, match="unsupported URL"):
        Client("ftp://127.0.0.1:1")


def test_cli_over_stomp_and_stomps(server, tls_server, certs, capsys, no_tls_env):
    assert cli.main(["--url", f"stomp://127.0.0.1:{server.port}", "Host", "ping2"]) == 0
    assert json.loads(capsys.readouterr().out) is True
    assert cli.main(["--url", f"stomps://127.0.0.1:{tls_server.port}", "--tls-cert",
                     certs["client_cert"], "--tls-key", certs["client_key"], "--tls-ca",
                     certs["ca"], "VM", "getStats", f"vmID={VM}"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["vmId"] == VM


def test_cli_tls_options_and_stomp_urls(capsys, no_tls_env, certs):
    with pytest.raises(SystemExit):
        cli.main(["--url", "stomps://127.0.0.1:1", "Host", "ping"])
    assert "a stomps URL needs --tls-cert" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--url", "stomp://127.0.0.1:1", "--tls-ca", certs["ca"], "Host", "ping"])
    assert "is plain STOMP" in capsys.readouterr().err


def test_a_kept_connection_closed_by_a_restarted_agent_is_opened_again(bus):
    first = make_server(bus)
    port = first.port
    client = Client(f"stomp://127.0.0.1:{port}", timeout=10)
    try:
        assert client.call("Host.ping") is True
        first.stop()
        second = ApiServer(("127.0.0.1", port), Dispatcher(load_schema(), table()))
        second.start()
        try:
            assert client.call("Host.ping2") is True
        finally:
            second.stop()
        with pytest.raises(TransportError, match="cannot talk to"):
            client.call("Host.ping")  # nobody there: no endless retry
    finally:
        client.close()
