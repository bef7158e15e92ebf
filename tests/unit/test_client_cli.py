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
    from vmhost.api.transport import http as server_module
    monkeypatch.setattr(server_module, "LINGER_BYTES", 0)
    server = start_server(agent, max_body=1000)
    try:
        with Client(f"http://127.0.0.1:{server.port}/jsonrpc", timeout=10, validate=False) as client:
            with pytest.raises(RpcError, match="exceeds the limit of 1000 bytes"):
                client.call("Host.ping", pad="x" * (8 << 20))
    finally:
        server.stop()


def test_a_connection_reset_while_connecting_is_a_transport_error(agent, monkeypatch):
    # An agent killed while a client connects: http.client connects inside
    # request(); there is no socket, so no answer to read.
    import http.client

    def reset(self):
        raise ConnectionResetError(104, "Connection reset by peer")
    server = start_server(agent)
    try:
        with Client(f"http://127.0.0.1:{server.port}/jsonrpc", timeout=10) as client:
            monkeypatch.setattr(http.client.HTTPConnection, "connect", reset)
            with pytest.raises(TransportError, match="cannot talk to .*reset by peer"):
                client.call("Host.ping")
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
    (["Vm", "create"], "unknown verb 'Vm.create' (namespaces: Host, Image, Lease, SDM, StorageDomain, VM, Volume)"),
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


# --- VM merge --wait and snapshot remove, against a fake agent ---------------------------

BASE = "aaaaaaaa-0000-4000-8000-000000000001"
MID = "aaaaaaaa-0000-4000-8000-000000000002"
LEAF = "aaaaaaaa-0000-4000-8000-000000000003"
JOB = "bbbbbbbb-0000-4000-8000-000000000001"
DRIVE = {"domainID": SD, "imageID": IMG, "volumeID": LEAF}

# vmJobs as the agent shows it on successive VM.getStats: (state, cur, end)
INTERNAL = [("commit", 0, 0), ("commit", 50, 200), ("commit", 200, 200), ("cleanup", 200, 200)]
ACTIVE = [("commit", 10, 100), ("ready", 100, 100), ("pivot", 100, 100), ("cleanup", 100, 100)]


class RecordingAgent:
    """A fake agent whose verbs (`handlers()`) record every call they get."""
    calls: list[tuple[str, dict]]

    def handlers(self) -> dict:
        raise NotImplementedError

    def table(self):
        def recorded(verb, handler):
            def handle(params):
                self.calls.append((verb, params))
                return handler(params)
            return handle
        return {verb: recorded(verb, handler) for verb, handler in self.handlers().items()}

    def verbs(self):
        return [verb for verb, _ in self.calls]


class MergeAgent(RecordingAgent):
    """A fake agent running one merge job: each VM.getStats shows the next
    step of `steps`, then the job ends as `ending` says (DONE, ABORTED, or
    FAILED: it stays in vmJobs with an error, as the real one does)."""

    def __init__(self, steps=INTERNAL, ending="DONE", chain=(BASE, MID, LEAF),
                 history=True, unknown_polls=0):
        self.steps = list(steps)
        self.ending = ending
        self.chain = list(chain)
        self.keep_history = history
        self.unknown_polls = unknown_polls  # answers without vmJobs first (recovery)
        self.calls: list[tuple[str, dict]] = []
        self.job: dict | None = None
        self.history: list[dict] = []

    def handlers(self):
        return {
            "VM.merge": self._merge,
            "VM.getStats": self._stats,
            "Host.getJobHistory": lambda p: list(self.history),
            "Host.getVMFullList": self._full_list,
            "Volume.delete": lambda p: True,
            "VM.abortMerge": lambda p: {"jobUUID": p["jobUUID"], "state": "aborted"},
        }

    def _merge(self, p):
        self.job = {"id": p.get("jobUUID", JOB), "base": p["baseVolUUID"],
                    "top": p["topVolUUID"], "step": 0}
        return self.job["id"]

    def _stats(self, p):
        stats = {"vmId": p["vmID"], "status": "Up"}
        if self.unknown_polls:
            self.unknown_polls -= 1
            return [stats]
        stats["vmJobs"] = {}
        job = self.job
        if job is None:
            return [stats]
        entry = {"id": job["id"], "jobType": "block", "blockJobType": "commit", "drive": "vda",
                 "imgUUID": IMG, "bandwidth": 0, "baseVolUUID": job["base"],
                 "topVolUUID": job["top"]}
        if job["step"] < len(self.steps):
            state, cur, end = self.steps[job["step"]]
            job["step"] += 1
            stats["vmJobs"][job["id"]] = {**entry, "state": state, "cur": str(cur), "end": str(end)}
        elif self.ending == "FAILED":
            stats["vmJobs"][job["id"]] = {**entry, "state": "failed", "cur": "0", "end": "0",
                                          "error": "blockCommit failed: disk on fire"}
        else:
            self._end(job)
        return [stats]

    def _end(self, job):
        if self.ending == "DONE":
            self.chain.remove(job["top"])
        if self.keep_history:
            self.history.append({"id": job["id"], "state": self.ending, "vmId": VM})
        self.job = None

    def _full_list(self, p):
        chain = [{"domainID": SD, "imageID": IMG, "volumeID": v, "path": f"/x/{v}"}
                 for v in self.chain]
        return [{"vmId": VM, "devices": [
            {"device": "cdrom"},
            {"device": "disk", "name": "vda", "domainID": SD, "imageID": IMG,
             "volumeID": self.chain[-1], "volumeChain": chain}]}]


@pytest.fixture
def fast_polls(monkeypatch):
    monkeypatch.setattr(cli, "POLL_INTERVAL", 0)


def serve(fake):
    return start_server(fake)


@pytest.fixture
def merge_agent(request, fast_polls):
    fake = MergeAgent(**getattr(request, "param", {}))
    server = serve(fake)
    fake.url = f"http://127.0.0.1:{server.port}/jsonrpc"
    yield fake
    server.stop()


def merge_argv(url, top=MID, *extra):
    return ["--url", url, "VM", "merge", f"vmID={VM}", f"drive={json.dumps(DRIVE)}",
            f"baseVolUUID={BASE}", f"topVolUUID={top}", *extra]


def test_progress_line():
    assert cli.progress_line({"cur": "45", "end": "100", "state": "commit"}) == \
        "[#####.....]  45%  commit"
    assert cli.progress_line({"cur": "0", "end": "0", "state": "commit"}) == \
        "[..........]   0%  commit"
    assert cli.progress_line({"cur": "7", "end": "7", "state": "ready"}) == \
        "[##########] 100%  ready"
    assert cli.progress_line({"cur": "x", "end": "", "state": "pivot"}) == \
        "[..........]   0%  pivot"


def test_merge_without_wait_prints_the_job(capsys, merge_agent):
    code, out, err = run(capsys, *merge_argv(merge_agent.url, MID, "bandwidth=5",
                                             f"jobUUID={JOB}"))
    assert (code, json.loads(out), err) == (0, JOB, "")
    assert merge_agent.calls == [("VM.merge", {
        "vmID": VM, "drive": DRIVE, "baseVolUUID": BASE, "topVolUUID": MID, "bandwidth": 5,
        "jobUUID": JOB})]


def test_merge_wait_internal_done(capsys, merge_agent):
    code, out, err = run(capsys, *merge_argv(merge_agent.url, MID, "--wait"))
    assert code == 0
    assert json.loads(out) == {"jobUUID": JOB, "state": "done"}
    assert err.startswith("\r[..........]   0%  commit\r[###.......]  25%  commit")
    assert "\r[##########] 100%  commit" in err and err.endswith("cleanup\n")
    assert merge_agent.verbs() == ["VM.merge"] + ["VM.getStats"] * 5 + ["Host.getJobHistory"]
    assert merge_agent.chain == [BASE, LEAF]


@pytest.mark.parametrize("merge_agent", [{"steps": ACTIVE}], indirect=True)
def test_merge_wait_active_shows_each_state(capsys, merge_agent):
    code, out, err = run(capsys, *merge_argv(merge_agent.url, LEAF, "--wait"))
    assert code == 0 and json.loads(out)["state"] == "done"
    assert [part.split()[-1] for part in err.strip().split("\r") if part] == \
        ["commit", "ready", "pivot", "cleanup"]


@pytest.mark.parametrize("merge_agent", [{"ending": "FAILED"}], indirect=True)
def test_merge_wait_failed(capsys, merge_agent):
    code, out, err = run(capsys, *merge_argv(merge_agent.url, MID, "--wait"))
    assert code == 1
    assert json.loads(out) == {"jobUUID": JOB, "state": "failed",
                               "error": "blockCommit failed: disk on fire"}
    assert f"merge job {JOB} failed: blockCommit failed: disk on fire\n" in err
    assert f"vmhost-client VM dismissJob vmID={VM} jobUUID={JOB}" in err


@pytest.mark.parametrize("merge_agent", [{"ending": "ABORTED"}], indirect=True)
def test_merge_wait_aborted(capsys, merge_agent):
    code, out, err = run(capsys, *merge_argv(merge_agent.url, MID, "--wait"))
    assert code == 1
    assert json.loads(out) == {"jobUUID": JOB, "state": "aborted"}
    assert f"merge job {JOB} was aborted; the chain is unchanged" in err
    assert merge_agent.chain == [BASE, MID, LEAF]


@pytest.mark.parametrize("merge_agent", [{"history": False}], indirect=True)
def test_merge_outcome_from_the_chain_when_the_history_is_gone(capsys, merge_agent):
    # The history lives in the agent's memory; after a restart the chain tells.
    code, out, _ = run(capsys, *merge_argv(merge_agent.url, MID, "--wait"))
    assert (code, json.loads(out)) == (0, {"jobUUID": JOB, "state": "done"})
    assert merge_agent.verbs()[-2:] == ["Host.getJobHistory", "Host.getVMFullList"]


@pytest.mark.parametrize("merge_agent", [{"unknown_polls": 3}], indirect=True)
def test_merge_wait_is_not_fooled_by_missing_vmjobs(capsys, merge_agent):
    # No vmJobs at all (jobs not checked yet after a restart) is not "the job left".
    code, out, _ = run(capsys, *merge_argv(merge_agent.url, MID, "--wait"))
    assert (code, json.loads(out)["state"]) == (0, "done")
    assert merge_agent.verbs().count("VM.getStats") == 3 + len(INTERNAL) + 1


def test_merge_wait_rides_out_recovery(capsys, fast_polls):
    # The agent restarts during the wait: it answers 99 until it recovered.
    fake = MergeAgent()
    refusals = []

    def is_ready():
        if fake.job is not None and len(refusals) < 2:
            refusals.append(True)
            return False
        return True

    server = ApiServer(("127.0.0.1", 0), Dispatcher(load_schema(), fake.table(), is_ready))
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/jsonrpc"
        code, out, _ = run(capsys, *merge_argv(url, MID, "--wait"))
    finally:
        server.stop()
    assert code == 0 and json.loads(out)["state"] == "done"
    assert len(refusals) == 2
    assert fake.verbs().count("VM.getStats") == len(INTERNAL) + 1


def test_ctrl_c_stops_waiting_not_the_merge(capsys, merge_agent, monkeypatch):
    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_pause", interrupt)
    code, out, err = run(capsys, *merge_argv(merge_agent.url, MID, "--wait"))
    assert (code, out) == (130, "")
    assert err.startswith("\r[..........]   0%  commit\n")  # the bar's line is ended
    assert f"stopped waiting; merge job {JOB} goes on in the agent." in err
    assert (f"To abort it: vmhost-client --url {merge_agent.url} VM abortMerge vmID={VM} "
            f"jobUUID={JOB}") in err
    assert "VM.abortMerge" not in merge_agent.verbs()


def test_merge_wait_usage_errors(capsys, merge_agent):
    with pytest.raises(SystemExit) as e:
        cli.main(merge_argv(merge_agent.url, MID, "--follow"))
    assert e.value.code == 2
    assert "unknown option '--follow' (options here: --wait)" in capsys.readouterr().err
    code, _, err = run(capsys, "--url", merge_agent.url, "VM", "merge", f"vmID={VM}", "--wait")
    assert code == 1 and "error -32602" in err  # checked by the schema, nothing sent
    assert merge_agent.calls == []


def remove_argv(url, volume, *extra):
    return ["--url", url, "snapshot", "remove", f"vmID={VM}", f"imageID={IMG}",
            f"volumeID={volume}", *extra]


def merge_call(fake):
    return next(params for verb, params in fake.calls if verb == "VM.merge")


@pytest.mark.parametrize("merge_agent", [{"steps": ACTIVE}], indirect=True)
def test_snapshot_remove_leaf_is_an_active_merge(capsys, merge_agent):
    code, out, err = run(capsys, *remove_argv(merge_agent.url, LEAF))
    assert code == 0, err
    assert json.loads(out) == [BASE, MID]
    params = merge_call(merge_agent)
    assert params == {"vmID": VM, "drive": DRIVE, "baseVolUUID": MID, "topVolUUID": LEAF,
                      "jobUUID": params["jobUUID"]}
    assert merge_agent.calls[-1] == ("Volume.delete", {
        "storagedomainID": SD, "imageID": IMG, "volumeID": LEAF})


def test_snapshot_remove_internal_volume(capsys, merge_agent):
    code, out, _ = run(capsys, *remove_argv(merge_agent.url, MID, "--wait", "bandwidth=7"))
    assert code == 0
    assert json.loads(out) == [BASE, LEAF]
    params = merge_call(merge_agent)
    assert (params["drive"], params["baseVolUUID"], params["topVolUUID"], params["bandwidth"]) == \
        (DRIVE, BASE, MID, 7)
    assert merge_agent.calls[-1] == ("Volume.delete", {
        "storagedomainID": SD, "imageID": IMG, "volumeID": MID})
    # The chain was read before the merge, after it, and once by no one else.
    assert merge_agent.verbs()[0] == "Host.getVMFullList"


def test_snapshot_remove_refuses_the_base(capsys, merge_agent):
    with pytest.raises(SystemExit) as e:
        cli.main(remove_argv(merge_agent.url, BASE))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (f"volume {BASE} is the base of the chain and cannot be removed; "
            f"remove its child {MID} instead") in err
    assert merge_agent.verbs() == ["Host.getVMFullList"]


@pytest.mark.parametrize("merge_agent", [{"ending": "FAILED"}, {"ending": "ABORTED"}],
                         indirect=True)
def test_snapshot_remove_deletes_nothing_when_the_merge_does_not_succeed(capsys, merge_agent):
    code, out, err = run(capsys, *remove_argv(merge_agent.url, MID))
    assert code == 1
    assert json.loads(out)["state"] in ("failed", "aborted")
    assert f"volume {MID} was not deleted" in err
    assert "Volume.delete" not in merge_agent.verbs()


def test_snapshot_remove_ctrl_c_says_what_is_left_to_do(capsys, merge_agent, monkeypatch):
    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_pause", interrupt)
    code, _, err = run(capsys, *remove_argv(merge_agent.url, MID))
    assert code == 130
    job = merge_call(merge_agent)["jobUUID"]
    assert f"VM abortMerge vmID={VM} jobUUID={job}" in err
    assert f"Volume delete storagedomainID={SD} imageID={IMG} volumeID={MID}" in err
    assert "Volume.delete" not in merge_agent.verbs()


@pytest.mark.parametrize("argv_tail,message", [
    ([f"imageID={VOL}", f"volumeID={MID}"], f"VM {VM} has no drive with image {VOL}"),
    ([f"imageID={IMG}", f"volumeID={VOL}"], f"volume {VOL} is not in the chain"),
])
def test_snapshot_remove_unknown_drive_or_volume(capsys, merge_agent, argv_tail, message):
    code, out, err = run(capsys, "--url", merge_agent.url, "snapshot", "remove", f"vmID={VM}",
                         *argv_tail)
    assert (code, out) == (1, "")
    assert message in err
    assert merge_agent.verbs() == ["Host.getVMFullList"]


@pytest.mark.parametrize("argv_tail,message", [
    ([f"imageID={IMG}"], "missing volumeID=..."),
    ([f"imageID={IMG}", f"volumeID={MID}", "size=3"], "unknown parameter 'size'"),
    ([f"imageID={IMG}", f"volumeID={MID}", "bandwidth=-1"], "bandwidth must be a non-negative"),
    ([f"imageID={IMG}", f"volumeID={MID}", "--force"], "unknown option '--force'"),
    ([f"imageID={IMG}", MID], "expected key=value"),
])
def test_snapshot_remove_usage_errors(capsys, merge_agent, argv_tail, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["--url", merge_agent.url, "snapshot", "remove", f"vmID={VM}", *argv_tail])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert merge_agent.calls == []


# --- snapshot remove of an image no VM runs: a cold merge ---------------------------------

class ColdAgent(RecordingAgent):
    """A fake agent for cold merges: volumes BASE <- MID <- LEAF (GEN 4 each);
    each Host.getJobs shows the next of `statuses` ((status, progress)); past
    them the job ends as `ending` says ("done", "failed", or "gone": the agent
    forgot the job, with `gen_after` as the base's GEN then)."""

    def __init__(self, statuses=(("pending", 0), ("running", 40), ("running", 90)),
                 ending="done", gen_after=5):
        self.statuses, self.ending, self.gen_after = list(statuses), ending, gen_after
        self.parents = {BASE: BLANK, MID: BASE, LEAF: MID}
        self.legal = {BASE, MID, LEAF}
        self.calls: list[tuple[str, dict]] = []
        self.job: dict | None = None

    def handlers(self):
        return {
            "SDM.merge": self._merge,
            "Host.getJobs": self._jobs,
            "Host.getVMFullList": lambda p: [],
            "Volume.getInfo": self._info,
            "StorageDomain.getVolumes": lambda p: sorted(self.parents),
            "Volume.delete": self._delete,
        }

    def _info(self, p):
        vol = p["volumeID"]
        gen = self.gen_after if (vol == self._base() and self.job and self.job["ended"]) else 4
        return {"uuid": vol, "parent": self.parents[vol], "generation": gen,
                "legality": "LEGAL" if vol in self.legal else "ILLEGAL"}

    def _base(self):
        return self.job["subchain"]["base_id"] if self.job else None

    def _merge(self, p):
        self.job = {"id": p["job_id"], "subchain": p["subchain_info"], "step": 0, "ended": False}
        return True

    def _jobs(self, p):
        job = self.job
        if job["step"] < len(self.statuses):
            status, progress = self.statuses[job["step"]]
            job["step"] += 1
            return {job["id"]: {"id": job["id"], "status": status, "progress": progress,
                                "description": "cold merge", "job_type": "storage"}}
        job["ended"] = True
        if self.ending == "gone":
            return {}
        top = job["subchain"]["top_id"]
        if self.ending == "done":
            self.legal.discard(top)
            for vol, parent in self.parents.items():
                if parent == top:
                    self.parents[vol] = job["subchain"]["base_id"]
            info = {"status": "done", "progress": 100}
        else:
            info = {"status": "failed", "progress": 40,
                    "error": {"code": 52, "message": "commit: no space left"}}
        return {job["id"]: {"id": job["id"], "description": "cold merge", "job_type": "storage",
                            **info}}

    def _delete(self, p):
        del self.parents[p["volumeID"]]
        return True


BLANK = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def cold_agent(request, fast_polls):
    fake = ColdAgent(**getattr(request, "param", {}))
    server = serve(fake)
    fake.url = f"http://127.0.0.1:{server.port}/jsonrpc"
    yield fake
    server.stop()


def cold_argv(url, volume, *extra):
    return ["--url", url, "snapshot", "remove", f"storagedomainID={SD}", f"imageID={IMG}",
            f"volumeID={volume}", *extra]


@pytest.mark.parametrize("volume,base,chain", [(LEAF, MID, [BASE, MID]), (MID, BASE, [BASE, LEAF])])
def test_snapshot_remove_without_a_vm_is_a_cold_merge(capsys, cold_agent, volume, base, chain):
    code, out, err = run(capsys, *cold_argv(cold_agent.url, volume))
    assert code == 0, err
    assert json.loads(out) == chain
    params = next(p for verb, p in cold_agent.calls if verb == "SDM.merge")
    assert params["subchain_info"] == {"sd_id": SD, "img_id": IMG, "top_id": volume,
                                       "base_id": base, "base_generation": 4}
    assert "[####......]  40%  running" in err and err.endswith("\n")
    assert ("Volume.delete", {"storagedomainID": SD, "imageID": IMG, "volumeID": volume}) in \
        cold_agent.calls


@pytest.mark.parametrize("cold_agent", [{"ending": "gone", "gen_after": 5}], indirect=True)
def test_cold_merge_forgotten_by_the_agent_is_judged_by_the_base_gen(capsys, cold_agent):
    code, out, err = run(capsys, *cold_argv(cold_agent.url, LEAF))
    assert code == 0, err
    assert "Volume.delete" in cold_agent.verbs()


@pytest.mark.parametrize("cold_agent", [{"ending": "gone", "gen_after": 4},
                                        {"ending": "failed"}], indirect=True)
def test_cold_merge_not_done_deletes_nothing(capsys, cold_agent):
    code, out, err = run(capsys, *cold_argv(cold_agent.url, LEAF))
    assert code == 1
    assert f"volume {LEAF} was not deleted" in err
    assert ("no space left" in err) or ("no longer known" in err)
    assert "Volume.delete" not in cold_agent.verbs()


def test_cold_snapshot_remove_usage(capsys, cold_agent, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["--url", cold_agent.url, "snapshot", "remove", f"imageID={IMG}",
                  f"volumeID={MID}"])
    assert e.value.code == 2 and "storagedomainID=..." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(cold_argv(cold_agent.url, BASE))
    assert "is the base of the chain" in capsys.readouterr().err
    # A VM that is not on this host (down) with a domain given: a cold merge.
    cold_agent.calls.clear()
    code, _, err = run(capsys, "--url", cold_agent.url, "snapshot", "remove", f"vmID={VM}",
                       f"storagedomainID={SD}", f"imageID={IMG}", f"volumeID={LEAF}")
    assert code == 0, err
    assert cold_agent.verbs()[:2] == ["Host.getVMFullList", "Volume.getInfo"]
    assert "SDM.merge" in cold_agent.verbs()

    def interrupt(seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_pause", interrupt)
    cold_agent.parents = {BASE: BLANK, MID: BASE, LEAF: MID}
    cold_agent.job = None
    code, _, err = run(capsys, *cold_argv(cold_agent.url, LEAF))
    assert code == 130 and "Host abortJob job_id=" in err and "Volume delete" in err
