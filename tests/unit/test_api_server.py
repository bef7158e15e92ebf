"""The HTTP server and the verb -> service bridge, on a real socket with
fake services."""
from __future__ import annotations

import http.client
import inspect
import json
import logging
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from vmhost.api import bridge
from vmhost.api.bridge import build_table, check_coverage
from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.schema import Schema, load_schema
from vmhost.api.server import ApiServer
from vmhost.errors import InvalidParameter, NoSuchVM

SD = "11111111-1111-4111-8111-111111111111"
IMG = "22222222-2222-4222-8222-222222222222"
VOL = "33333333-3333-4333-8333-333333333333"
VM = "4a4a4a4a-4444-4444-8444-44444444abcd"
BLANK = "00000000-0000-0000-0000-000000000000"


class FakeService:
    """Stands in for one service. Only the methods of `protocol` exist, and
    every call is checked against its signature, so the bridge cannot drift
    from the contract the real services implement."""

    def __init__(self, protocol: type, **answers: Any):
        self._protocol = protocol
        self._answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        signature = inspect.signature(getattr(self._protocol, name))

        def method(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(self, *args, **kwargs)
            self.calls.append((name, {k: v for k, v in bound.arguments.items() if k != "self"}))
            answer = self._answers.get(name)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        return method


def fake_services(**answers: Any) -> SimpleNamespace:
    return SimpleNamespace(
        host=FakeService(bridge.HostService, ping=True, capabilities={"kvm": False, "virtType": "qemu"}),
        storage=FakeService(bridge.StorageService, create_volume={"uuid": VOL}),
        vms=FakeService(bridge.VmService, get_stats=[{"vmId": VM, "status": "Up"}],
                        **answers),
        jobs=FakeService(bridge.JobService, get_jobs={}),
    )


# --- bridge ----------------------------------------------------------------------

def call(services, verb, params):
    return build_table(services)[verb](params)


def test_table_and_schema_list_the_same_verbs():
    assert set(build_table(fake_services())) == set(load_schema().verbs())
    check_coverage(load_schema())


def test_coverage_check_catches_a_verb_without_handler():
    schema = Schema.from_yaml("verbs: {VM.frobnicate: {description: x, params: {}}}")
    with pytest.raises(RuntimeError, match=r"no handler for \['VM.frobnicate'\]"):
        check_coverage(schema)


V = {"storagedomainID": SD, "imageID": IMG, "volumeID": VOL}


# (verb, params, service, method, keyword arguments it must receive)
BRIDGE_CASES = [
    ("Host.ping", {}, "host", "ping", {}),
    ("Host.ping2", {}, "host", "ping", {}),
    ("Host.getCapabilities", {}, "host", "capabilities", {}),
    ("Host.getVMList", {}, "vms", "list", {"full_status": False, "vm_list": None, "only_uuid": False}),
    ("Host.getVMList", {"fullStatus": True, "vmList": [VM], "onlyUUID": True}, "vms", "list",
     {"full_status": True, "vm_list": [VM], "only_uuid": True}),
    ("Host.getAllVmStats", {}, "vms", "all_stats", {}),
    ("Host.getVMFullList", {"fullStatus": True}, "vms", "full_list", {"vm_list": None}),
    ("Host.getVMFullList", {"vmList": [VM]}, "vms", "full_list", {"vm_list": [VM]}),
    ("Host.getStorageRepoStats", {}, "storage", "repo_stats", {"domains": None}),
    ("Host.getStorageRepoStats", {"domains": [SD]}, "storage", "repo_stats", {"domains": [SD]}),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "/srv/sd",
                              "name": "n", "domainClass": 1, "version": 5, "storagepoolID": BLANK},
     "storage", "create_domain", {"sd_uuid": SD, "domain_type": "localfs", "type_args": "/srv/sd", "name": "n"}),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": "localfs", "typeArgs": "/x", "name": "n"},
     "storage", "create_domain", {"sd_uuid": SD, "domain_type": "localfs", "type_args": "/x", "name": "n"}),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 6, "typeArgs": "/x", "name": "n"},
     "storage", "create_domain", {"sd_uuid": SD, "domain_type": "posixfs", "type_args": "/x", "name": "n"}),
    ("StorageDomain.connect", {"storagedomainID": SD, "domainType": 6, "typeArgs": "/x"},
     "storage", "connect_domain", {"sd_uuid": SD, "domain_type": "posixfs", "type_args": "/x"}),
    ("Lease.create", {"lease": {"sd_id": SD, "lease_id": VM}, "job_id": IMG}, "storage",
     "create_lease", {"sd_uuid": SD, "lease_id": VM}),
    ("Lease.info", {"lease": {"sd_id": SD, "lease_id": VM}}, "storage", "lease_info",
     {"sd_uuid": SD, "lease_id": VM}),
    ("Lease.delete", {"lease": {"sd_id": SD, "lease_id": VM}}, "storage", "delete_lease",
     {"sd_uuid": SD, "lease_id": VM}),
    ("StorageDomain.disconnect", {"storagedomainID": SD}, "storage", "disconnect_domain",
     {"sd_uuid": SD}),
    ("StorageDomain.getInfo", {"storagedomainID": SD}, "storage", "domain_info", {"sd_uuid": SD}),
    ("StorageDomain.getVolumes", {"storagedomainID": SD, "imageID": IMG, "storagepoolID": BLANK},
     "storage", "list_volumes", {"sd_uuid": SD, "img_uuid": IMG}),
    ("Volume.create", {**V, "size": "1073741824", "volFormat": "COW"}, "storage", "create_volume",
     {"sd_uuid": SD, "img_uuid": IMG, "vol_uuid": VOL, "size": 1073741824, "vol_format": "COW",
      "preallocate": "SPARSE", "disk_type": "DATA", "desc": "", "src_img_uuid": BLANK, "src_vol_uuid": BLANK}),
    ("Volume.create", {**V, "size": 512, "volFormat": 5, "preallocate": 1, "diskType": "ISOF",
                       "desc": "d", "srcImgUUID": IMG, "srcVolUUID": SD, "initialSize": 1},
     "storage", "create_volume",
     {"sd_uuid": SD, "img_uuid": IMG, "vol_uuid": VOL, "size": 512, "vol_format": "RAW",
      "preallocate": "PREALLOCATED", "disk_type": "ISOF", "desc": "d", "src_img_uuid": IMG,
      "src_vol_uuid": SD}),
    ("Volume.create", {**V, "size": 1, "volFormat": 4, "preallocate": 2}, "storage", "create_volume",
     {"sd_uuid": SD, "img_uuid": IMG, "vol_uuid": VOL, "size": 1, "vol_format": "COW",
      "preallocate": "SPARSE", "disk_type": "DATA", "desc": "", "src_img_uuid": BLANK, "src_vol_uuid": BLANK}),
    ("Volume.getInfo", V, "storage", "volume_info", {"sd_uuid": SD, "img_uuid": IMG, "vol_uuid": VOL}),
    ("Volume.delete", {**V, "postZero": True, "force": True}, "storage", "delete_volume",
     {"sd_uuid": SD, "img_uuid": IMG, "vol_uuid": VOL}),
    ("VM.create", {"vmID": VM, "vmParams": {"vmName": "a", "memSize": 64, "devices": [], "x": 1}},
     "vms", "create", {"vm_id": VM, "vm_params": {"vmName": "a", "memSize": 64, "devices": [], "x": 1}}),
    ("VM.destroy", {"vmID": VM}, "vms", "destroy", {"vm_id": VM}),
    ("VM.pause", {"vmID": VM}, "vms", "pause", {"vm_id": VM}),
    ("VM.cont", {"vmID": VM}, "vms", "cont", {"vm_id": VM}),
    ("VM.getStats", {"vmID": VM}, "vms", "get_stats", {"vm_id": VM}),
    ("VM.snapshot", {"vmID": VM, "snapDrives": [{"domainID": SD, "imageID": IMG, "baseVolumeID": VOL,
                                                 "volumeID": BLANK}], "frozen": True, "snapMemory": ""},
     "vms", "snapshot", {"vm_id": VM, "snap_drives": [{"domainID": SD, "imageID": IMG,
                                                       "baseVolumeID": VOL, "volumeID": BLANK}]}),
    ("VM.merge", {"vmID": VM, "drive": {"domainID": SD, "imageID": IMG, "volumeID": VOL},
                  "baseVolUUID": SD, "topVolUUID": VOL}, "vms", "merge",
     {"vm_id": VM, "drive": {"domainID": SD, "imageID": IMG, "volumeID": VOL}, "base": SD,
      "top": VOL, "bandwidth": 0, "job_id": None}),
    ("VM.merge", {"vmID": VM, "drive": {"domainID": SD, "imageID": IMG, "volumeID": VOL},
                  "baseVolUUID": SD, "topVolUUID": VOL, "bandwidth": 3, "jobUUID": IMG},
     "vms", "merge", {"vm_id": VM, "drive": {"domainID": SD, "imageID": IMG, "volumeID": VOL},
                      "base": SD, "top": VOL, "bandwidth": 3, "job_id": IMG}),
    ("VM.abortMerge", {"vmID": VM, "jobUUID": IMG}, "vms", "abort_merge",
     {"vm_id": VM, "job_id": IMG}),
    ("VM.dismissJob", {"vmID": VM, "jobUUID": IMG}, "vms", "dismiss_job",
     {"vm_id": VM, "job_id": IMG}),
    ("Host.getPendingWork", {}, "host", "pending_work", {}),
    ("Host.getJobHistory", {}, "vms", "job_history", {}),
    ("VM.synchronizeDisks", {"vmID": VM}, "vms", "synchronize_disks", {"vm_id": VM}),
    ("Image.reconcileVolumeChain", {**{k: v for k, v in V.items() if k != "volumeID"},
                                    "leafVolID": VOL, "storagepoolID": BLANK},
     "storage", "reconcile_chain", {"sd_uuid": SD, "img_uuid": IMG, "leaf_uuid": VOL}),
    ("SDM.merge", {"job_id": VM, "subchain_info": {"sd_id": SD, "img_id": IMG, "base_id": SD,
                                                   "top_id": VOL, "base_generation": 2}},
     "jobs", "merge", {"job_id": VM, "subchain": {"sd_id": SD, "img_id": IMG, "base_id": SD,
                                                  "top_id": VOL, "base_generation": 2}}),
    ("Host.getJobs", {}, "jobs", "get_jobs", {"job_type": None, "job_ids": None}),
    ("Host.getJobs", {"job_type": "storage", "job_ids": [VM]}, "jobs", "get_jobs",
     {"job_type": "storage", "job_ids": [VM]}),
    ("Host.abortJob", {"job_id": VM}, "jobs", "abort", {"job_id": VM}),
    ("Host.deleteJob", {"job_id": VM}, "jobs", "delete", {"job_id": VM}),
]


@pytest.mark.parametrize("verb,params,service,method,kwargs", BRIDGE_CASES)
def test_bridge_calls_the_service(verb, params, service, method, kwargs):
    load_schema().validate(verb, params)  # the bridge only ever sees valid params
    services = fake_services()
    call(services, verb, params)
    called = [c for s in ("host", "storage", "vms", "jobs") for c in getattr(services, s).calls]
    assert called == [(method, kwargs)]
    assert getattr(services, service).calls == [(method, kwargs)]


def test_every_verb_is_covered_by_the_bridge_test():
    assert {case[0] for case in BRIDGE_CASES} == set(load_schema().verbs())


def test_none_from_a_service_answers_true():
    services = fake_services()
    assert call(services, "VM.destroy", {"vmID": VM}) is True
    assert call(services, "VM.getStats", {"vmID": VM}) == [{"vmId": VM, "status": "Up"}]


def test_memory_snapshot_is_refused():
    services = fake_services()
    with pytest.raises(InvalidParameter, match="snapMemory"):
        call(services, "VM.snapshot", {"vmID": VM, "snapMemory": "a,b,c", "snapDrives": [
            {"domainID": SD, "imageID": IMG, "baseVolumeID": VOL, "volumeID": BLANK}]})
    assert services.vms.calls == []


# --- HTTP server --------------------------------------------------------------------

@pytest.fixture
def services():
    return fake_services(destroy=NoSuchVM(VM), pause=RuntimeError("secret"))


@pytest.fixture
def ready():
    return {"value": True}


def make_server(services, ready, **kwargs) -> ApiServer:
    dispatcher = Dispatcher(load_schema(), build_table(services), is_ready=lambda: ready["value"])
    return ApiServer(("127.0.0.1", 0), dispatcher, **kwargs)


@pytest.fixture
def server(services, ready):
    with make_server(services, ready) as server:
        yield server


@pytest.fixture
def conn(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    yield conn
    conn.close()


def post(conn, message, path="/jsonrpc", headers=None):
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response, response.read()


def req(method, params=None, id=1):
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}}


def raw(port, data: bytes, half_close: bool = False) -> bytes:
    """Send raw bytes (then EOF if half_close), return everything the server
    sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def json_body(response_bytes: bytes) -> dict:
    return json.loads(response_bytes.partition(b"\r\n\r\n")[2])


def test_port_zero_gets_a_real_port(server):
    assert server.port > 0


def test_call_over_http(conn, services):
    response, body = post(conn, req("VM.getStats", {"vmID": VM}, id=5))
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(body) == {"jsonrpc": "2.0", "id": 5, "result": [{"vmId": VM, "status": "Up"}]}
    assert services.vms.calls == [("get_stats", {"vm_id": VM})]


def test_keep_alive(conn):
    post(conn, req("Host.ping"))
    sock = conn.sock
    response, body = post(conn, req("Host.ping", id=2))
    assert conn.sock is sock and sock is not None
    assert json.loads(body)["id"] == 2


def test_errors_over_http(conn):
    _, body = post(conn, req("VM.destroy", {"vmID": VM}))
    assert json.loads(body)["error"] == {"code": 1, "message": f"Virtual machine does not exist: {VM}"}
    _, body = post(conn, req("VM.getStats", {"vmID": "../etc"}))
    assert json.loads(body)["error"] == {"code": -32602, "message": "vmID: '../etc' is not a valid UUID"}
    response, body = post(conn, b"{nope")
    assert response.status == 200 and json.loads(body)["error"]["code"] == -32700


def test_internal_error_is_hidden_and_server_keeps_serving(conn, caplog):
    with caplog.at_level(logging.ERROR):
        _, body = post(conn, req("VM.pause", {"vmID": VM}))
    assert json.loads(body)["error"]["code"] == 100
    assert b"secret" not in body and b"Traceback" not in body
    assert any(r.exc_info for r in caplog.records)
    _, body = post(conn, req("Host.ping"))
    assert json.loads(body)["result"] is True


def test_not_ready(conn, ready):
    ready["value"] = False
    _, body = post(conn, req("Host.getCapabilities"))
    assert json.loads(body)["error"]["code"] == 99
    _, body = post(conn, req("Host.ping"))
    assert json.loads(body)["result"] is True


def test_notification_gets_204(conn, services):
    response, body = post(conn, {"jsonrpc": "2.0", "method": "VM.cont", "params": {"vmID": VM}})
    assert response.status == 204 and body == b""
    assert services.vms.calls == [("cont", {"vm_id": VM})]
    _, body = post(conn, req("Host.ping"))  # the connection is still usable
    assert json.loads(body)["result"] is True


def test_batch_over_http(conn):
    _, body = post(conn, [req("Host.ping", id=1), req("VM.destroy", {"vmID": VM}, id=2)])
    answers = json.loads(body)
    assert answers[0]["result"] is True and answers[1]["error"]["code"] == 1


def test_other_path_is_404(conn):
    response, body = post(conn, req("Host.ping"), path="/rpc")
    assert response.status == 404
    assert json.loads(body)["error"] == {"code": -32600, "message": "no such path '/rpc'"}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_method_is_405(conn, method):
    conn.request(method, "/jsonrpc")
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 405 and response.getheader("Allow") == "POST"
    assert body["error"]["code"] == -32600 and method in body["error"]["message"]


def test_head_is_405_without_body(conn):
    conn.request("HEAD", "/jsonrpc")
    response = conn.getresponse()
    assert response.status == 405 and response.read() == b""


def test_query_string_is_ignored(conn):
    response, body = post(conn, req("Host.ping"), path="/jsonrpc?x=1")
    assert response.status == 200 and json.loads(body)["result"] is True


def test_wrong_content_type_is_415(conn):
    conn.request("POST", "/jsonrpc", json.dumps(req("Host.ping")), {"Content-Type": "text/plain"})
    response = conn.getresponse()
    assert response.status == 415
    assert "application/json" in json.loads(response.read())["error"]["message"]


def test_content_type_parameters_are_fine(conn):
    response, _ = post(conn, req("Host.ping"), headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status == 200


def test_oversized_body_is_refused_without_reading_it(server):
    # Announce 10 MiB and send none of it: if the server tried to read the
    # body, recv would time out instead of returning the answer.
    answer = raw(server.port, b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 10485760\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in answer
    assert json_body(answer)["error"] == {
        "code": -32600, "message": "request body of 10485760 bytes exceeds the limit of 1048576 bytes"}


def test_max_body_is_configurable(services, ready):
    with make_server(services, ready, max_body=100) as small:
        conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=10)
        response, body = post(conn, req("Host.ping", {"pad": "x" * 200}))
        assert response.status == 413
        assert "exceeds the limit of 100 bytes" in json.loads(body)["error"]["message"]
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=10)
        response, body = post(conn, req("Host.ping"))
        assert response.status == 200
        conn.close()


def test_oversized_body_sent_in_full_still_gets_the_answer(server):
    # 3 MiB does not fit in socket buffers: unless the server discards the
    # rest of the body before closing, the client's send fails or the reset
    # destroys the 413 before it is read.
    for _ in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, body = post(conn, b"x" * (3 << 20))
        conn.close()
        assert response.status == 413
        assert "3145728 bytes" in json.loads(body)["error"]["message"]


def test_oversized_body_with_expect_100_continue(server):
    answer = raw(server.port, b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Expect: 100-continue\r\nContent-Length: 2000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")  # not "100 Continue"
    assert b"100 Continue" not in answer


@pytest.mark.parametrize("headers,status,message", [
    (b"", 411, "Content-Length is required"),
    (b"Content-Length: abc\r\n", 400, "invalid Content-Length"),
    (b"Content-Length: -1\r\n", 400, "invalid Content-Length"),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400, "invalid Content-Length"),
    (b"Transfer-Encoding: chunked\r\n", 411, "chunked bodies are not supported"),
])
def test_bad_length_headers(server, headers, status, message):
    answer = raw(server.port, b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + headers + b"Connection: close\r\n\r\n")
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert message in json_body(answer)["error"]["message"]


def test_truncated_body_is_dropped_quietly(server, conn):
    answer = raw(server.port, b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{\"jsonrpc\"", half_close=True)
    assert answer == b""  # a partial request is not answered (nor parsed)
    _, body = post(conn, req("Host.ping"))
    assert json.loads(body)["result"] is True


def test_garbage_request_line_gets_a_json_error(server):
    answer = raw(server.port, b"GET / HTTP/x.y\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json_body(answer)["error"]["code"] == -32600
    answer = raw(server.port, b"HELLO\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json_body(answer)["error"]["code"] == -32600


def test_requests_are_not_printed_to_stderr(conn, capfd):
    post(conn, req("Host.ping"))
    post(conn, b"{")
    assert "POST" not in capfd.readouterr().err


def test_stop_closes_idle_keep_alive_connections(services, ready):
    server = make_server(services, ready)
    server.start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    post(conn, req("Host.ping"))
    server.stop()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        post(conn, req("Host.ping"))
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_stop_without_start(services, ready):
    make_server(services, ready).stop()
