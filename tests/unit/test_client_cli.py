"""vmhost.client and vmhost-client against a live ApiServer."""
from __future__ import annotations

import json
import socket
import threading

import pytest

from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.schema import load_schema
from vmhost.api.server import ApiServer
from vmhost.cli import client as cli
from vmhost.client import Client, RpcError, TransportError
from vmhost.errors import NoSuchVM

SD = "11111111-1111-4111-8111-111111111111"
IMG = "22222222-2222-4222-8222-222222222222"
VOL = "33333333-3333-4333-8333-333333333333"
VM = "4a4a4a4a-4444-4444-8444-44444444abcd"


class Agent:
    """A few verbs, answering from canned data and recording what arrived
    (and on which connection: one handler thread per connection)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.threads: list[str] = []

    def table(self):
        return {
            "Host.ping": self._answer("Host.ping", True),
            "Host.getVMList": self._answer("Host.getVMList", [VM]),
            "VM.getStats": lambda p: self._record("VM.getStats", p, [{"vmId": p["vmID"], "status": "Up"}]),
            "VM.destroy": self._destroy,
            "Volume.create": lambda p: self._record("Volume.create", p, {"uuid": p["volumeID"]}),
            "StorageDomain.create": self._answer("StorageDomain.create", {"name": "x"}),
        }

    def _answer(self, verb, result):
        return lambda p: self._record(verb, p, result)

    def _record(self, verb, params, result):
        self.calls.append((verb, params))
        self.threads.append(threading.current_thread().name)
        return result

    def _destroy(self, params):
        self._record("VM.destroy", params, None)
        raise NoSuchVM(params["vmID"])


@pytest.fixture
def agent():
    return Agent()


def start_server(agent, port=0, max_body=1 << 20):
    server = ApiServer(("127.0.0.1", port), Dispatcher(load_schema(), agent.table()), max_body=max_body)
    server.start()
    return server


@pytest.fixture
def server(agent):
    server = start_server(agent)
    yield server
    server.stop()


@pytest.fixture
def url(server):
    return f"http://127.0.0.1:{server.port}/jsonrpc"


@pytest.fixture
def client(url):
    with Client(url, timeout=10) as client:
        yield client


@pytest.fixture
def closed_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return port


# --- client library ---------------------------------------------------------------

def test_call(client, agent):
    assert client.call("VM.getStats", vmID=VM) == [{"vmId": VM, "status": "Up"}]
    assert client.call("Host.ping") is True
    assert agent.calls == [("VM.getStats", {"vmID": VM}), ("Host.ping", {})]


def test_error_from_the_agent(client):
    with pytest.raises(RpcError) as e:
        client.call("VM.destroy", vmID=VM)
    assert (e.value.code, e.value.message) == (1, f"Virtual machine does not exist: {VM}")
    assert str(e.value) == f"error 1: Virtual machine does not exist: {VM}"


def test_validates_before_sending(client, agent):
    with pytest.raises(RpcError) as e:
        client.call("VM.getStats", vmID="../x")
    assert (e.value.code, e.value.message) == (-32602, "vmID: '../x' is not a valid UUID")
    with pytest.raises(RpcError) as e:
        client.call("VM.explode")
    assert (e.value.code, e.value.message) == (-32601, "unknown method 'VM.explode'")
    assert agent.calls == []


def test_without_validation_the_agent_validates(url, agent):
    with Client(url, timeout=10, validate=False) as client:
        with pytest.raises(RpcError) as e:
            client.call("VM.getStats", vmID="../x")
        assert e.value.code == -32602
        with pytest.raises(RpcError) as e:
            client.call("Volume.delete")  # in the schema, not served by this agent
        assert e.value.code == -32601
    assert agent.calls == []


def test_a_param_named_method_is_possible(client):
    with pytest.raises(RpcError, match="unknown parameter 'method'"):
        client.call("Host.ping", method="x")


def test_reuses_one_connection(client, agent):
    for _ in range(3):
        client.call("Host.ping")
    assert len(set(agent.threads)) == 1


def test_reconnects_after_the_agent_closed_the_connection(agent):
    server = start_server(agent)
    port = server.port
    with Client(f"http://127.0.0.1:{port}/jsonrpc", timeout=10) as client:
        client.call("Host.ping")
        server.stop()  # closes the idle keep-alive connection
        server = start_server(agent, port=port)
        try:
            assert client.call("Host.getVMList") == [VM]
        finally:
            server.stop()
    assert [c[0] for c in agent.calls] == ["Host.ping", "Host.getVMList"]
    assert len(set(agent.threads)) == 2


def test_batch(client, agent):
    results = client.batch([("Host.ping", {}), ("VM.destroy", {"vmID": VM}), ("VM.getStats", {"vmID": VM})])
    assert results[0] is True
    assert isinstance(results[1], RpcError) and results[1].code == 1
    assert results[2] == [{"vmId": VM, "status": "Up"}]
    assert len(set(agent.threads)) == 1
    assert client.batch([]) == []


def test_batch_is_validated_before_sending(client, agent):
    with pytest.raises(RpcError, match="vmID"):
        client.batch([("Host.ping", {}), ("VM.getStats", {"vmID": 1})])
    assert agent.calls == []


def test_oversized_request_is_an_rpc_error(agent):
    server = start_server(agent, max_body=1000)
    try:
        with Client(f"http://127.0.0.1:{server.port}/jsonrpc", timeout=10, validate=False) as client:
            with pytest.raises(RpcError) as e:
                client.call("Host.ping", pad="x" * 5000)
            assert e.value.code == -32600
            assert "exceeds the limit of 1000 bytes" in e.value.message
            assert client.call("Host.ping") is True
    finally:
        server.stop()


def test_refusal_is_read_even_if_sending_failed(agent, monkeypatch):
    # Without the server's lingering drain, the agent resets the connection
    # while the client is still sending; its 413 answer is still readable.
    from vmhost.api import server as server_module
    monkeypatch.setattr(server_module, "LINGER_BYTES", 0)
    server = start_server(agent, max_body=1000)
    try:
        with Client(f"http://127.0.0.1:{server.port}/jsonrpc", timeout=10, validate=False) as client:
            with pytest.raises(RpcError, match="exceeds the limit of 1000 bytes"):
                client.call("Host.ping", pad="x" * (8 << 20))
    finally:
        server.stop()


def test_wrong_path_is_an_rpc_error(server):
    with Client(f"http://127.0.0.1:{server.port}/rpc", timeout=10) as client:
        with pytest.raises(RpcError, match="no such path '/rpc'"):
            client.call("Host.ping")


def test_unreachable_agent(closed_port):
    with Client(f"http://127.0.0.1:{closed_port}/jsonrpc", timeout=10) as client:
        with pytest.raises(TransportError, match="cannot talk to"):
            client.call("Host.ping")


def test_bad_url():
    with pytest.raises(ValueError, match="unsupported URL"):
        Client("ftp://host/x")


# --- CLI ------------------------------------------------------------------------------

def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_call(capsys, url, agent):
    code, out, err = run(capsys, "--url", url, "VM", "getStats", f"vmID={VM}")
    assert code == 0 and err == ""
    assert out == json.dumps([{"vmId": VM, "status": "Up"}], indent=2) + "\n"
    assert agent.calls == [("VM.getStats", {"vmID": VM})]


def test_cli_without_params(capsys, url):
    assert run(capsys, "--url", url, "Host", "getVMList") == (0, json.dumps([VM], indent=2) + "\n", "")


def test_cli_types_values_by_schema(capsys, url, agent):
    code, out, _ = run(capsys, "--url", url, "Volume", "create", f"storagedomainID={SD}",
                       f"imageID={IMG}", f"volumeID={VOL}", "size=1073741824", "volFormat=COW",
                       "preallocate=2", "desc=123", "diskType=true")
    assert code == 0 and json.loads(out) == {"uuid": VOL}
    assert agent.calls == [("Volume.create", {
        "storagedomainID": SD, "imageID": IMG, "volumeID": VOL, "size": 1073741824,
        "volFormat": "COW", "preallocate": 2, "desc": "123", "diskType": "true"})]


def test_cli_parses_json_values(capsys, url, agent):
    code, _, _ = run(capsys, "--url", url, "Host", "getVMList", f'vmList=["{VM}"]', "onlyUUID=true")
    assert code == 0
    assert agent.calls == [("Host.getVMList", {"vmList": [VM], "onlyUUID": True})]


def test_cli_string_params_stay_strings(capsys, url, agent):
    code, _, _ = run(capsys, "--url", url, "StorageDomain", "create", f"storagedomainID={SD}",
                     "domainType=4", "typeArgs=/srv/sd", "name=null", "version=5")
    assert code == 0
    assert agent.calls == [("StorageDomain.create", {
        "storagedomainID": SD, "domainType": 4, "typeArgs": "/srv/sd", "name": "null", "version": 5})]


def test_cli_agent_error(capsys, url):
    code, out, err = run(capsys, "--url", url, "VM", "destroy", f"vmID={VM}")
    assert (code, out) == (1, "")
    assert err == f"error 1: Virtual machine does not exist: {VM}\n"


def test_cli_invalid_params_are_caught_before_sending(capsys, url, agent):
    code, out, err = run(capsys, "--url", url, "VM", "getStats", "vmID=../../etc")
    assert (code, out) == (1, "")
    assert err == "error -32602: vmID: '../../etc' is not a valid UUID\n"
    assert agent.calls == []


def test_cli_no_validate_lets_the_agent_judge(capsys, url):
    code, _, err = run(capsys, "--url", url, "--no-validate", "VM", "getStats", "vmID=bad", "x=1")
    assert code == 1 and err.startswith("error -32602: ")


def test_cli_unreachable_agent(capsys, closed_port):
    code, out, err = run(capsys, "--url", f"http://127.0.0.1:{closed_port}/jsonrpc", "Host", "ping")
    assert (code, out) == (1, "")
    assert err.startswith("error: cannot talk to")


@pytest.mark.parametrize("argv,message", [
    (["VM", "explode"], "unknown verb 'VM.explode' (VM verbs:"),
    (["Vm", "create"], "unknown verb 'Vm.create' (namespaces: Host, StorageDomain, VM, Volume)"),
    (["VM", "getStats", "vmID"], "expected key=value, got 'vmID'"),
    (["VM", "getStats", "=x"], "expected key=value, got '=x'"),
    (["VM", "getStats", f"vmID={VM}", f"vmID={VM}"], "parameter 'vmID' given twice"),
    (["VM"], "the following arguments are required: verb"),
    ([], "the following arguments are required"),
])
def test_cli_usage_errors_exit_2(capsys, url, agent, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["--url", url, *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert agent.calls == []


def test_cli_special_commands_get_their_own_arguments(capsys, url, monkeypatch, agent):
    seen = []

    def merge(client, verb, args):
        seen.append((verb, args))
        if "--bad" in args:
            raise cli.UsageError("--bad is not an option")
        return client.call("Host.ping")

    monkeypatch.setitem(cli.COMMANDS, "VM.merge", merge)
    code, out, _ = run(capsys, "--url", url, "VM", "merge", f"vmID={VM}", "--wait")
    assert (code, out) == (0, "true\n")
    assert seen == [("VM.merge", [f"vmID={VM}", "--wait"])]
    with pytest.raises(SystemExit) as e:
        cli.main(["--url", url, "VM", "merge", "--bad"])
    assert e.value.code == 2 and "--bad is not an option" in capsys.readouterr().err
