"""The JSON-RPC 2.0 Dispatcher, driven with bytes as a transport would."""
from __future__ import annotations

import json
import logging

import pytest

from vmhost.api.jsonrpc import Dispatcher, encode_error
from vmhost.api.schema import load_schema
from vmhost.errors import NoSuchVM

VM = "4a4a4a4a-4444-4444-8444-44444444abcd"


class Table(dict):
    """A handler table that records calls."""

    def __init__(self):
        super().__init__({
            "Host.ping": lambda p: self._record("Host.ping", p, True),
            "VM.getStats": lambda p: self._record("VM.getStats", p, [{"vmId": p["vmID"], "status": "Up"}]),
            "VM.destroy": self._destroy,
            "VM.pause": self._boom,
            "VM.cont": lambda p: self._record("VM.cont", p, object()),
            "Host.getAllVmStats": lambda p: self._record("Host.getAllVmStats", p, [float("nan")]),
        })
        self.calls: list[tuple[str, dict]] = []

    def _record(self, verb, params, result):
        self.calls.append((verb, params))
        return result

    def _destroy(self, params):
        self.calls.append(("VM.destroy", params))
        raise NoSuchVM(params["vmID"])

    def _boom(self, params):
        self.calls.append(("VM.pause", params))
        raise RuntimeError("secret detail: /etc/shadow")


@pytest.fixture
def table():
    return Table()


@pytest.fixture
def ready():
    return {"value": True}


@pytest.fixture
def dispatcher(table, ready):
    return Dispatcher(load_schema(), table, is_ready=lambda: ready["value"])


def rpc(dispatcher, message):
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    answer = dispatcher.handle_bytes(body)
    return None if answer is None else json.loads(answer)


def req(method, params=None, id=1):
    message = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        message["params"] = params
    return message


def error(answer):
    assert "result" not in answer, answer
    return answer["error"]["code"], answer["error"]["message"]


def test_call(dispatcher, table):
    assert rpc(dispatcher, req("VM.getStats", {"vmID": VM}, id=7)) == {
        "jsonrpc": "2.0", "id": 7, "result": [{"vmId": VM, "status": "Up"}]}
    assert table.calls == [("VM.getStats", {"vmID": VM})]


def test_params_may_be_omitted(dispatcher):
    assert rpc(dispatcher, req("Host.ping"))["result"] is True


@pytest.mark.parametrize("request_id", ["abc", 0, -5, 2**70, None])
def test_id_is_echoed(dispatcher, request_id):
    assert rpc(dispatcher, req("Host.ping", {}, id=request_id))["id"] == request_id


@pytest.mark.parametrize("body,detail", [
    (b"{", "parse error"),
    (b"", "parse error"),
    (b'{"jsonrpc": "2.0", "method": "Host.ping", "id": 1,}', "parse error"),
    (b'\xff\xfe{"jsonrpc": "2.0"}', "not UTF-8"),
    (b'{"jsonrpc": "2.0", "method": "Host.ping", "id": NaN}', "NaN is not valid JSON"),
    (b"[" * 100_000, "parse error"),
])
def test_parse_error(dispatcher, body, detail):
    answer = rpc(dispatcher, body)
    assert answer["id"] is None
    code, message = error(answer)
    assert code == -32700 and detail in message


@pytest.mark.parametrize("message,detail", [
    (1, "expected a JSON object"),
    ("Host.ping", "expected a JSON object"),
    (None, "expected a JSON object"),
    ({"method": "Host.ping", "id": 1}, '"jsonrpc" must be "2.0"'),
    ({"jsonrpc": "1.0", "method": "Host.ping", "id": 1}, '"jsonrpc" must be "2.0"'),
    ({"jsonrpc": 2.0, "method": "Host.ping", "id": 1}, '"jsonrpc" must be "2.0"'),
    ({"jsonrpc": "2.0", "id": 1}, '"method" must be a string'),
    ({"jsonrpc": "2.0", "method": ["Host.ping"], "id": 1}, '"method" must be a string'),
    ({"jsonrpc": "2.0", "method": "VM.getStats", "params": [VM], "id": 1},
     'positional "params" (an array) are not supported'),
    ({"jsonrpc": "2.0", "method": "Host.ping", "params": "x", "id": 1}, '"params" must be an object'),
    ({"jsonrpc": "2.0", "method": "Host.ping", "params": None, "id": 1}, '"params" must be an object'),
])
def test_invalid_request(dispatcher, table, message, detail):
    answer = rpc(dispatcher, message)
    code, text = error(answer)
    assert code == -32600 and detail in text
    assert table.calls == []
    assert answer["id"] == (message.get("id") if isinstance(message, dict) else None)


@pytest.mark.parametrize("bad_id", [True, 1.5, 1.0, [1], {"a": 1}])
def test_bad_id_type(dispatcher, table, bad_id):
    answer = rpc(dispatcher, req("Host.ping", {}, id=bad_id))
    assert answer["id"] is None
    code, text = error(answer)
    assert code == -32600 and "id must be" in text
    assert table.calls == []


def test_invalid_request_without_id_is_still_answered(dispatcher):
    answer = rpc(dispatcher, {"jsonrpc": "1.0", "method": "Host.ping"})
    assert answer["id"] is None and error(answer)[0] == -32600


def test_unknown_method(dispatcher):
    code, message = error(rpc(dispatcher, req("VM.explode", {"vmID": VM})))
    assert code == -32601 and message == "unknown method 'VM.explode'"


def test_schema_verb_without_handler_is_unknown(dispatcher):
    code, message = error(rpc(dispatcher, req("Volume.create", {})))
    assert code == -32601 and "'Volume.create'" in message


def test_handler_without_schema_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"\['VM.explode'\]"):
        Dispatcher(load_schema(), {"VM.explode": lambda p: None})


@pytest.mark.parametrize("params,message", [
    ({}, "missing required parameter 'vmID'"),
    ({"vmID": "../../x"}, "vmID: '../../x' is not a valid UUID"),
    ({"vmID": VM, "foo": 1}, "unknown parameter 'foo'"),
])
def test_invalid_params(dispatcher, table, params, message):
    assert error(rpc(dispatcher, req("VM.getStats", params))) == (-32602, message)
    assert table.calls == []


def test_vmhost_error_keeps_its_code(dispatcher):
    answer = rpc(dispatcher, req("VM.destroy", {"vmID": VM}, id="d"))
    assert answer == {"jsonrpc": "2.0", "id": "d", "error": {
        "code": 1, "message": f"Virtual machine does not exist: {VM}"}}


def test_internal_error_is_code_100_and_logged_not_sent(dispatcher, caplog):
    with caplog.at_level(logging.ERROR, logger="vmhost.api.jsonrpc"):
        body = dispatcher.handle_bytes(json.dumps(req("VM.pause", {"vmID": VM})).encode())
    answer = json.loads(body)
    assert error(answer) == (100, "General Exception: internal error (see agent log)")
    for leak in (b"secret", b"shadow", b"Traceback", b"RuntimeError", b"jsonrpc.py"):
        assert leak not in body
    [record] = [r for r in caplog.records if r.exc_info]
    assert "VM.pause" in record.getMessage()
    assert record.exc_info[0] is RuntimeError


@pytest.mark.parametrize("verb", ["VM.cont", "Host.getAllVmStats"])
def test_unencodable_result_is_code_100(dispatcher, verb, caplog):
    params = {"vmID": VM} if verb == "VM.cont" else {}
    with caplog.at_level(logging.ERROR):
        answer = rpc(dispatcher, req(verb, params, id=3))
    assert answer["id"] == 3
    assert error(answer)[0] == 100


def test_keeps_serving_after_failures(dispatcher):
    rpc(dispatcher, b"{")
    rpc(dispatcher, req("VM.pause", {"vmID": VM}))
    rpc(dispatcher, req("VM.cont", {"vmID": VM}))
    assert rpc(dispatcher, req("Host.ping"))["result"] is True


# --- notifications and batches ------------------------------------------------

def test_notification_runs_but_gets_no_answer(dispatcher, table):
    assert dispatcher.handle_bytes(json.dumps(
        {"jsonrpc": "2.0", "method": "VM.getStats", "params": {"vmID": VM}}).encode()) is None
    assert table.calls == [("VM.getStats", {"vmID": VM})]


@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "method": "VM.destroy", "params": {"vmID": VM}},   # VmhostError
    {"jsonrpc": "2.0", "method": "VM.pause", "params": {"vmID": VM}},     # internal error
    {"jsonrpc": "2.0", "method": "VM.explode"},                           # unknown method
    {"jsonrpc": "2.0", "method": "VM.getStats", "params": {"vmID": 1}},   # invalid params
])
def test_failed_notification_gets_no_answer(dispatcher, message, caplog):
    assert dispatcher.handle_bytes(json.dumps(message).encode()) is None


def test_batch(dispatcher, table):
    answer = rpc(dispatcher, [
        req("Host.ping", id=1),
        {"jsonrpc": "2.0", "method": "VM.getStats", "params": {"vmID": VM}},  # notification
        req("VM.destroy", {"vmID": VM}, id=2),
        req("VM.getStats", {"vmID": "bad"}, id=3),
        "junk",
        req("VM.explode", id=4),
    ])
    assert [a["id"] for a in answer] == [1, 2, 3, None, 4]
    assert answer[0]["result"] is True
    assert [a["error"]["code"] for a in answer[1:]] == [1, -32602, -32600, -32601]
    assert [c[0] for c in table.calls] == ["Host.ping", "VM.getStats", "VM.destroy"]


def test_batch_of_notifications_gets_no_answer(dispatcher, table):
    note = {"jsonrpc": "2.0", "method": "Host.ping"}
    assert dispatcher.handle_bytes(json.dumps([note, note]).encode()) is None
    assert len(table.calls) == 2


def test_empty_batch(dispatcher):
    answer = rpc(dispatcher, [])
    assert isinstance(answer, dict) and answer["id"] is None
    assert error(answer) == (-32600, "invalid request: empty batch")


def test_batch_of_invalid_requests(dispatcher):
    answer = rpc(dispatcher, [1, 2])
    assert [error(a)[0] for a in answer] == [-32600, -32600]


def test_one_unencodable_result_does_not_spoil_the_batch(dispatcher, caplog):
    answer = rpc(dispatcher, [req("VM.cont", {"vmID": VM}, id=1), req("Host.ping", id=2)])
    assert error(answer[0])[0] == 100
    assert answer[1]["result"] is True


# --- readiness gate -------------------------------------------------------------

def test_not_ready_answers_99_except_ping(dispatcher, table, ready):
    ready["value"] = False
    assert error(rpc(dispatcher, req("VM.getStats", {"vmID": VM}))) == (
        99, "Recovering from crash or Initializing")
    assert rpc(dispatcher, req("Host.ping"))["result"] is True
    assert [c[0] for c in table.calls] == ["Host.ping"]
    ready["value"] = True
    assert rpc(dispatcher, req("VM.getStats", {"vmID": VM}))["result"][0]["status"] == "Up"


def test_not_ready_still_reports_protocol_errors(dispatcher, ready):
    ready["value"] = False
    assert error(rpc(dispatcher, req("VM.explode")))[0] == -32601
    assert error(rpc(dispatcher, b"{"))[0] == -32700


def test_failing_readiness_check_is_an_internal_error(table, caplog):
    def is_ready():
        raise OSError("cannot tell")
    dispatcher = Dispatcher(load_schema(), table, is_ready=is_ready)
    assert error(rpc(dispatcher, req("VM.getStats", {"vmID": VM})))[0] == 100
    assert rpc(dispatcher, req("Host.ping"))["result"] is True


# --- encoding ---------------------------------------------------------------------

def test_lone_surrogate_in_id_is_echoed_safely(dispatcher):
    body = b'{"jsonrpc": "2.0", "method": "Host.ping", "id": "\\ud800"}'
    answer = dispatcher.handle_bytes(body)
    assert json.loads(answer)["id"] == "\ud800"


def test_encode_error():
    assert json.loads(encode_error(-32600, "nope", 5)) == {
        "jsonrpc": "2.0", "id": 5, "error": {"code": -32600, "message": "nope"}}
