"""Mutual TLS: `vmhost pki init`, a real ApiServer with the server context,
the client library and vmhost-client; refusals, and that the agent keeps
serving after each."""
from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import stat
import time

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from vmhost.api.transport import acceptor as acceptor_module
from vmhost.api.transport import http as http_module
from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.schema import load_schema
from vmhost.api.server import ApiServer
from vmhost.api.tls import (TlsError, check_listen, client_context, is_loopback,
                            server_context, server_context_or_none)
from vmhost.cli import client as cli
from vmhost.cli import pki
from vmhost.client import Client, RpcError, TransportError
from countingbus import CountingBus

JOB = "5b5b5b5b-5555-4555-8555-55555555abcd"


# --- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return pki.init(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """A second, unrelated CA with its own server and client certificates."""
    return pki.init(str(tmp_path_factory.mktemp("other-pki")))


@pytest.fixture
def bus() -> CountingBus:
    return CountingBus()


@pytest.fixture(autouse=True)
def quick_peer_check(monkeypatch):
    monkeypatch.setattr(http_module, "PEER_CHECK_INTERVAL", 0.05)


def make_server(certs, bus, host="127.0.0.1", context=None) -> ApiServer:
    dispatcher = Dispatcher(load_schema(), {"Host.ping": lambda p: True,
                                            "Host.getVMList": lambda p: []})
    context = context or server_context(certs["server_cert"], certs["server_key"], certs["ca"])
    server = ApiServer((host, 0), dispatcher, events=bus, ssl_context=context)
    server.start()
    return server


@pytest.fixture
def server(certs, bus):
    server = make_server(certs, bus)
    yield server
    server.stop()


def url(server, host="127.0.0.1") -> str:
    return f"https://{host}:{server.port}/jsonrpc"


def good_client(server, certs, host="127.0.0.1") -> Client:
    return Client(url(server, host), timeout=10, tls_cert=certs["client_cert"],
                  tls_key=certs["client_key"], tls_ca=certs["ca"])


def logged(caplog, text: str, timeout: float = 5) -> logging.LogRecord:
    """The first record containing `text`, waiting for it: the server logs a
    refusal after the client has had it."""
    deadline = time.monotonic() + timeout
    while True:
        for record in caplog.records:
            if text in record.getMessage():
                return record
        assert time.monotonic() < deadline, f"nothing logged with {text!r}"
        time.sleep(0.02)


def assert_serves(server, certs) -> None:
    """A client with the right certificate still gets answers."""
    with good_client(server, certs) as client:
        assert client.call("Host.ping") is True


# --- pki init ---------------------------------------------------------------------------

def test_pki_init_writes_a_ca_and_two_certificates(tmp_path):
    paths = pki.init(str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path / "new")) == sorted(pki.FILES)
    assert paths == {"ca": str(tmp_path / "new" / "ca.pem"),
                     "server_cert": str(tmp_path / "new" / "server.pem"),
                     "server_key": str(tmp_path / "new" / "server-key.pem"),
                     "client_cert": str(tmp_path / "new" / "client.pem"),
                     "client_key": str(tmp_path / "new" / "client-key.pem")}
    for key in ("server_key", "client_key"):
        assert stat.S_IMODE(os.stat(paths[key]).st_mode) == 0o600
        assert b"PRIVATE KEY" in open(paths[key], "rb").read()
    ca = x509.load_pem_x509_certificate(open(paths["ca"], "rb").read())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server_cert = x509.load_pem_x509_certificate(open(paths["server_cert"], "rb").read())
    san = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    assert server_cert.issuer == ca.subject
    eku = server_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    client_cert = x509.load_pem_x509_certificate(open(paths["client_cert"], "rb").read())
    eku = client_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # Both contexts accept what was made (keys match, CA parses).
    server_context(paths["server_cert"], paths["server_key"], paths["ca"])
    client_context(paths["client_cert"], paths["client_key"], paths["ca"])


def test_pki_init_refuses_to_overwrite_unless_forced(tmp_path):
    directory = str(tmp_path)
    (tmp_path / "client.pem").write_text("mine")
    with pytest.raises(FileExistsError, match="client.pem.*--force"):
        pki.init(directory)
    assert os.listdir(directory) == ["client.pem"]  # nothing written
    assert (tmp_path / "client.pem").read_text() == "mine"
    pki.init(directory, force=True)
    assert (tmp_path / "client.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert sorted(os.listdir(directory)) == sorted(pki.FILES)  # no temporary files left


def test_pki_main(tmp_path, capsys):
    directory = str(tmp_path / "d")
    assert pki.main(["init", directory]) == 0
    out = capsys.readouterr().out
    assert "ca.pem" in out and "--tls-cert" in out
    assert pki.main(["init", directory]) == 1
    assert "already exist" in capsys.readouterr().err
    assert pki.main(["init", directory, "--force"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        pki.main([])
    assert exit_info.value.code == 2


# --- the right client -----------------------------------------------------------------------

def test_client_with_the_right_certificate_works(server, certs):
    with good_client(server, certs) as client:
        assert client.call("Host.ping") is True
        assert client.call("Host.getVMList") == []  # the same keep-alive connection
        assert client.batch([("Host.ping", {}), ("Host.getVMList", {})]) == [True, []]
    with good_client(server, certs, host="localhost") as client:  # the DNS name in the cert
        assert client.call("Host.ping") is True


def test_events_over_tls(server, certs, bus):
    with good_client(server, certs) as client:
        with client.events(timeout=10) as stream:
            assert bus.wait_open(1)
            # A silent stream stays open (the check for a closed client
            # runs every 0.05 s and must not take silence for a close).
            time.sleep(0.5)
            assert bus.open == 1
            bus.publish({"event": "job", "jobId": JOB, "to": "DONE"})
            event = next(stream)
            assert event["event"] == "job" and event["jobId"] == JOB
            assert stream.last_id == str(event["seq"])
            # Calls go on on the other connection meanwhile.
            assert client.call("Host.ping") is True
        # The server notices the client closed the stream.
        assert bus.wait_open(0)


def test_stop_ends_tls_streams_and_connections(certs, bus):
    server = make_server(certs, bus)
    client = good_client(server, certs)
    assert client.call("Host.ping") is True  # an idle keep-alive connection
    stream = client.events(timeout=10)
    assert bus.wait_open(1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    with pytest.raises((StopIteration, TransportError)):
        next(stream)
    assert bus.wait_open(0)
    stream.close()
    client.close()


# --- refusals ---------------------------------------------------------------------------------

def test_no_client_certificate_is_refused(server, certs, caplog):
    caplog.set_level(logging.INFO, logger="vmhost.api.transport.acceptor")
    with Client(url(server), timeout=10, tls_ca=certs["ca"]) as client:
        # The alert saying why reaches the client (not lost to a reset).
        with pytest.raises(TransportError, match="certificate required"):
            client.call("Host.ping")
        with pytest.raises(TransportError, match="certificate required"):
            client.events(timeout=5)
    assert logged(caplog, "no client certificate").levelno == logging.WARNING
    assert_serves(server, certs)


def test_no_client_certificate_is_refused_over_tls_1_2(certs, bus):
    context = server_context(certs["server_cert"], certs["server_key"], certs["ca"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # here the client learns it in its handshake
    server = make_server(certs, bus, context=context)
    try:
        with Client(url(server), timeout=10, tls_ca=certs["ca"]) as client:
            with pytest.raises(TransportError):
                client.call("Host.ping")
        assert_serves(server, certs)
    finally:
        server.stop()


def test_client_certificate_from_another_ca_is_refused(server, certs, other_certs, caplog):
    caplog.set_level(logging.INFO, logger="vmhost.api.transport.acceptor")
    with Client(url(server), timeout=10, tls_cert=other_certs["client_cert"],
                tls_key=other_certs["client_key"], tls_ca=certs["ca"]) as client:
        with pytest.raises(TransportError, match="unknown ca"):
            client.call("Host.ping")
    assert logged(caplog, "client certificate is not accepted").levelno == logging.WARNING
    assert_serves(server, certs)


def test_server_certificate_from_another_ca_is_refused_by_the_client(server, certs, other_certs):
    with Client(url(server), timeout=10, tls_cert=certs["client_cert"],
                tls_key=certs["client_key"], tls_ca=other_certs["ca"]) as client:
        with pytest.raises(TransportError, match="certificate verify failed"):
            client.call("Host.ping")
    assert_serves(server, certs)


def test_client_checks_the_host_name(certs, bus):
    # The certificate is for localhost, 127.0.0.1 and ::1, not 127.0.0.2.
    server = make_server(certs, bus, host="127.0.0.2")
    try:
        with good_client(server, certs, host="127.0.0.2") as client:
            with pytest.raises(TransportError, match="certificate verify failed"):
                client.call("Host.ping")
    finally:
        server.stop()


def test_plain_http_to_the_tls_port_is_refused(server, certs):
    with Client(f"http://127.0.0.1:{server.port}/jsonrpc", timeout=10) as client:
        with pytest.raises(RpcError, match="HTTPS only"):
            client.call("Host.ping")
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "Host.ping", "params": {}}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in head
    error = json.loads(payload)["error"]
    assert error["code"] == -32600 and "https://" in error["message"]
    assert b"true" not in payload  # the call was not made
    assert_serves(server, certs)


def test_garbage_to_the_tls_port_is_closed(server, certs):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"\x00\x01\x02 not tls")
        assert sock.recv(100) == b""
    assert_serves(server, certs)


# --- handshake timeouts ----------------------------------------------------------------------------

def test_a_silent_client_does_not_block_others(server, certs, monkeypatch):
    # Long enough that waiting for it would show.
    monkeypatch.setattr(acceptor_module, "HANDSHAKE_TIMEOUT", 30.0)
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    half = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    half.sendall(b"\x16\x03\x01")  # the start of a handshake record, then nothing
    try:
        started = time.monotonic()
        assert_serves(server, certs)
        assert time.monotonic() - started < 5
    finally:
        for sock in [*silent, half]:
            sock.close()


@pytest.mark.parametrize("first_bytes", [b"", b"\x16\x03\x01"])
def test_a_client_that_never_finishes_the_handshake_is_closed(server, certs, monkeypatch, caplog,
                                                              first_bytes):
    caplog.set_level(logging.INFO, logger="vmhost.api.transport.acceptor")
    monkeypatch.setattr(acceptor_module, "HANDSHAKE_TIMEOUT", 0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(first_bytes)
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 5
    assert logged(caplog, "within 0.5s").levelno == logging.INFO
    assert_serves(server, certs)


def test_the_handshake_deadline_is_for_all_of_it(server, certs, monkeypatch):
    """A client trickling a valid ClientHello byte by byte (each read well
    within the timeout) is still closed when the whole deadline passes."""
    monkeypatch.setattr(acceptor_module, "HANDSHAKE_TIMEOUT", 1.0)
    context = client_context(certs["client_cert"], certs["client_key"], certs["ca"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 40
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        started = time.monotonic()
        closed = False
        for byte in hello:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > 6:
                break
        if not closed:
            sock.settimeout(10)
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 6
    assert_serves(server, certs)


# --- contexts and their errors ---------------------------------------------------------------------------

def test_server_context_requires_client_certificates(certs):
    context = server_context(certs["server_cert"], certs["server_key"], certs["ca"])
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    client = client_context(certs["client_cert"], certs["client_key"], certs["ca"])
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_context_errors_name_the_file(certs, tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TlsError, match=f"TLS server certificate {missing}: no such file"):
        server_context(missing, certs["server_key"], certs["ca"])
    with pytest.raises(TlsError, match=f"TLS server key {missing}: no such file"):
        server_context(certs["server_cert"], missing, certs["ca"])
    with pytest.raises(TlsError, match=f"TLS CA file {missing}: no such file"):
        server_context(certs["server_cert"], certs["server_key"], missing)
    with pytest.raises(TlsError, match=f"{certs['client_key']} does not match the certificate "
                                       f"{certs['server_cert']}"):
        server_context(certs["server_cert"], certs["client_key"], certs["ca"])
    with pytest.raises(TlsError, match=f"TLS CA file {certs['server_key']}: no PEM certificate"):
        server_context(certs["server_cert"], certs["server_key"], certs["server_key"])
    with pytest.raises(TlsError, match=f"TLS server key {certs['ca']}: not a PEM private key"):
        server_context(certs["server_cert"], certs["ca"], certs["ca"])
    with pytest.raises(TlsError, match=f"{tmp_path}: is a directory"):
        server_context(str(tmp_path), certs["server_key"], certs["ca"])
    with pytest.raises(TlsError, match=f"TLS client certificate {missing}: no such file"):
        client_context(missing, certs["client_key"], certs["ca"])


def test_unreadable_file_is_named(certs, tmp_path, monkeypatch):
    # Root reads any file whatever its mode, so the EACCES is simulated at open().
    import builtins
    key = str(tmp_path / "key.pem")
    real_open = builtins.open

    def guarded(path, *a, **kw):
        if str(path) == key:
            raise PermissionError(13, "Permission denied", key)
        return real_open(path, *a, **kw)
    monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(TlsError, match=f"TLS server key {key}: permission denied"):
        server_context(certs["server_cert"], key, certs["ca"])


def test_server_context_or_none(certs):
    assert server_context_or_none(None, None, None) is None
    assert server_context_or_none(certs["server_cert"], certs["server_key"], certs["ca"]) is not None
    with pytest.raises(TlsError, match="go together; missing --tls-key, --tls-ca"):
        server_context_or_none(certs["server_cert"], None, "")


def test_client_refuses_tls_files_for_plain_http(certs):
    with pytest.raises(ValueError, match="use an https:// URL"):
        Client("http://127.0.0.1:1/jsonrpc", tls_ca=certs["ca"])


# --- check_listen -----------------------------------------------------------------------------------

MESSAGE = ("refusing to listen on 0.0.0.0 without TLS: give --tls-cert/--tls-key/--tls-ca, "
           "or --insecure to accept plain HTTP on a non-loopback address")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost",
                                  "LOCALHOST", "::ffff:127.0.0.1"])
def test_loopback_may_listen_without_tls(host):
    assert is_loopback(host)
    check_listen(host, tls=False, insecure=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.5", "10.0.0.1", "fe80::1",
                                  "example.com", "128.0.0.1"])
def test_other_addresses_need_tls_or_insecure(host):
    assert not is_loopback(host)
    with pytest.raises(ValueError, match="refusing to listen on .* without TLS: give "
                                         "--tls-cert/--tls-key/--tls-ca, or --insecure"):
        check_listen(host, tls=False, insecure=False)
    check_listen(host, tls=True, insecure=False)
    check_listen(host, tls=False, insecure=True)


def test_check_listen_message():
    with pytest.raises(ValueError) as info:
        check_listen("0.0.0.0", tls=False, insecure=False)
    assert str(info.value) == MESSAGE


# --- vmhost-client ------------------------------------------------------------------------------------

@pytest.fixture
def no_tls_env(monkeypatch):
    for name in ("VMHOST_TLS_CERT", "VMHOST_TLS_KEY", "VMHOST_TLS_CA"):
        monkeypatch.delenv(name, raising=False)


def test_cli_over_tls(server, certs, capsys, no_tls_env):
    assert cli.main(["--url", url(server), "--tls-cert", certs["client_cert"],
                     "--tls-key", certs["client_key"], "--tls-ca", certs["ca"],
                     "Host", "ping"]) == 0
    assert json.loads(capsys.readouterr().out) is True


def test_cli_reads_tls_files_from_the_environment(server, certs, capsys, monkeypatch):
    monkeypatch.setenv("VMHOST_TLS_CERT", certs["client_cert"])
    monkeypatch.setenv("VMHOST_TLS_KEY", certs["client_key"])
    monkeypatch.setenv("VMHOST_TLS_CA", certs["ca"])
    assert cli.main(["--url", url(server), "Host", "ping"]) == 0
    assert json.loads(capsys.readouterr().out) is True


def test_cli_https_without_tls_options_is_a_usage_error(capsys, no_tls_env, certs):
    with pytest.raises(SystemExit) as info:
        cli.main(["--url", "https://127.0.0.1:1/jsonrpc", "--tls-ca", certs["ca"], "Host", "ping"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "an https URL needs --tls-cert, --tls-key and --tls-ca" in err
    assert "missing --tls-cert, --tls-key" in err


def test_cli_tls_options_with_plain_http_is_a_usage_error(capsys, no_tls_env, certs):
    with pytest.raises(SystemExit) as info:
        cli.main(["--url", "http://127.0.0.1:1/jsonrpc", "--tls-ca", certs["ca"], "Host", "ping"])
    assert info.value.code == 2
    assert "--tls-ca is for https URLs" in capsys.readouterr().err


def test_cli_ignores_tls_environment_for_plain_http(certs, monkeypatch, capsys):
    monkeypatch.setenv("VMHOST_TLS_CA", certs["ca"])
    # Nothing listens on port 1: a connection error (1), not a usage error (2).
    assert cli.main(["--url", "http://127.0.0.1:1/jsonrpc", "Host", "ping"]) == 1
    assert "cannot talk to" in capsys.readouterr().err


def test_cli_bad_tls_file_is_a_usage_error_naming_it(capsys, no_tls_env, certs, tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(SystemExit) as info:
        cli.main(["--url", "https://127.0.0.1:1/jsonrpc", "--tls-cert", missing,
                  "--tls-key", certs["client_key"], "--tls-ca", certs["ca"], "Host", "ping"])
    assert info.value.code == 2
    assert f"TLS client certificate {missing}: no such file" in capsys.readouterr().err


def test_cli_refused_certificate_is_a_connection_error(server, certs, other_certs, capsys,
                                                       no_tls_env):
    assert cli.main(["--url", url(server), "--tls-cert", other_certs["client_cert"],
                     "--tls-key", other_certs["client_key"], "--tls-ca", certs["ca"],
                     "Host", "ping"]) == 1
    assert "error: cannot talk to" in capsys.readouterr().err
    assert_serves(server, certs)
