"""Bad input against a live agent on the real stack: each request gets a clear
JSON-RPC error naming what was wrong, the agent keeps serving, and nothing on
disk changes."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import uuid

import pytest

from conftest import TEST_BASE, VM_PREFIX, Env, _destroy_test_domains, start_agent, tree_digest

MiB = 1 << 20
U = lambda: str(uuid.uuid4())  # noqa: E731


@pytest.fixture(scope="module")
def world(libvirtd):
    """One agent, a domain, an image with a two-volume chain used by a running VM."""
    workdir = os.path.join(TEST_BASE, f"bad-input-{uuid.uuid4().hex[:8]}")
    storage_root = os.path.join(workdir, "storage")
    os.makedirs(storage_root, mode=0o755)
    os.chmod(workdir, 0o755)
    e = Env(agent=start_agent(os.path.join(workdir, "state")), sd=U(),
            storage_root=storage_root, conn=libvirtd)
    e.call("StorageDomain.create", storagedomainID=e.sd, domainType="localfs",
           typeArgs=storage_root, name="bad-input")
    img = U()
    base = e.create_volume(img)
    vm = e.create_vm([(img, base)])
    leaf = e.snapshot(vm, img, base)
    spare_img = U()
    spare = e.create_volume(spare_img)
    e.ids = dict(img=img, base=base, leaf=leaf, vm=vm, spare_img=spare_img, spare=spare)
    e.digest = lambda: {**tree_digest(storage_root),
                        "registry": tree_digest(os.path.join(workdir, "state"))
                        .get(os.path.join(workdir, "state", "domains.json"))}
    e.before = e.digest()
    yield e
    e.agent.stop()
    _destroy_test_domains(libvirtd)
    shutil.rmtree(workdir, ignore_errors=True)


def post(world, body: bytes, content_type: str = "application/json") -> tuple[int, dict | list]:
    conn = http.client.HTTPConnection("127.0.0.1", world.agent.port, timeout=30)
    try:
        conn.request("POST", "/jsonrpc", body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def rpc(world, method: str, params) -> dict:
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).encode()
    _, reply = post(world, body)
    return reply


def ids(world):
    return world.ids


# (name, method, params-builder, expected code, words the message must contain)
CASES = [
    ("missing-vmID", "VM.getStats", lambda w: {}, -32602, ["vmID"]),
    ("vmID-not-uuid", "VM.getStats", lambda w: {"vmID": "not-a-uuid"}, -32602, ["vmID"]),
    ("vmID-int", "VM.getStats", lambda w: {"vmID": 123}, -32602, ["vmID"]),
    ("vmID-null", "VM.destroy", lambda w: {"vmID": None}, -32602, ["vmID"]),
    ("vmID-unknown", "VM.getStats", lambda w: {"vmID": U()}, 1, ["does not exist"]),
    ("vmID-dotdot", "VM.create", lambda w: {"vmID": "../../etc/passwd", "vmParams": {
        "vmName": "x", "memSize": 64, "devices": []}}, -32602, ["vmID"]),
    ("vm-exists", "VM.create", lambda w: {"vmID": w.ids["vm"], "vmParams": {
        "vmName": VM_PREFIX + "dup", "memSize": 64, "devices": []}}, 4, ["already exists"]),
    ("image-dotdot", "VM.create", lambda w: {"vmID": U(), "vmParams": {
        "vmName": VM_PREFIX + "x", "memSize": 64, "devices": [
            {"device": "disk", "domainID": w.sd, "imageID": "../x", "volumeID": U()}]}},
     -32602, ["vmParams.devices[0].imageID"]),
    ("drive-unknown-domain", "VM.create", lambda w: {"vmID": U(), "vmParams": {
        "vmName": VM_PREFIX + "x", "memSize": 64, "devices": [
            {"device": "disk", "domainID": "11111111-2222-3333-4444-555555555555",
             "imageID": w.ids["spare_img"], "volumeID": w.ids["spare"]}]}},
     358, ["11111111-2222-3333-4444-555555555555"]),
    ("drive-unknown-volume", "VM.create", lambda w: {"vmID": U(), "vmParams": {
        "vmName": VM_PREFIX + "x", "memSize": 64, "devices": [
            {"device": "disk", "domainID": w.sd, "imageID": w.ids["spare_img"],
             "volumeID": "99999999-0000-0000-0000-000000000000"}]}},
     13, ["99999999-0000-0000-0000-000000000000"]),
    ("memSize-string", "VM.create", lambda w: {"vmID": U(), "vmParams": {
        "vmName": VM_PREFIX + "x", "memSize": "lots", "devices": []}}, -32602, ["memSize"]),
    ("vmName-missing", "VM.create", lambda w: {"vmID": U(), "vmParams": {
        "memSize": 64, "devices": []}}, -32602, ["vmName"]),
    ("vmName-markup", "VM.create", lambda w: {"vmID": U(), "vmParams": {
        "vmName": "</name><evil/>", "memSize": 64, "devices": []}}, -32602, ["vmName"]),
    ("sd-relative-path", "StorageDomain.create", lambda w: {
        "storagedomainID": U(), "domainType": "localfs", "typeArgs": "relative/dir",
        "name": "x"}, -32602, ["typeArgs"]),
    ("sd-bad-type", "StorageDomain.create", lambda w: {
        "storagedomainID": U(), "domainType": "nfs", "typeArgs": "/var/tmp", "name": "x"},
     -32602, ["domainType"]),
    ("sd-id-dotdot", "StorageDomain.create", lambda w: {
        "storagedomainID": "../..", "domainType": "localfs", "typeArgs": "/var/tmp",
        "name": "x"}, -32602, ["storagedomainID"]),
    ("sd-exists", "StorageDomain.create", lambda w: {
        "storagedomainID": w.sd, "domainType": "localfs", "typeArgs": w.storage_root,
        "name": "x"}, 365, ["already exists"]),
    ("sd-missing-dir", "StorageDomain.create", lambda w: {
        "storagedomainID": U(), "domainType": 4, "typeArgs": "/nonexistent/vmhost/dir",
        "name": "x"}, 351, ["/nonexistent/vmhost/dir"]),
    ("sd-unknown", "StorageDomain.getInfo", lambda w: {"storagedomainID": U()}, 358, []),
    ("vol-size-zero", "Volume.create", lambda w: {
        "storagedomainID": w.sd, "imageID": U(), "volumeID": U(), "size": 0,
        "volFormat": "COW"}, -32602, ["size"]),
    ("vol-size-negative-string", "Volume.create", lambda w: {
        "storagedomainID": w.sd, "imageID": U(), "volumeID": U(), "size": "-5",
        "volFormat": "COW"}, -32602, ["size"]),
    ("vol-bad-format", "Volume.create", lambda w: {
        "storagedomainID": w.sd, "imageID": U(), "volumeID": U(), "size": MiB,
        "volFormat": "QCOW3"}, -32602, ["volFormat"]),
    ("vol-image-dotdot", "Volume.create", lambda w: {
        "storagedomainID": w.sd, "imageID": "../../../tmp", "volumeID": U(), "size": MiB,
        "volFormat": "COW"}, -32602, ["imageID"]),
    ("vol-exists", "Volume.create", lambda w: {
        "storagedomainID": w.sd, "imageID": w.ids["img"], "volumeID": w.ids["base"],
        "size": MiB, "volFormat": "COW"}, 212, [""]),
    ("vol-parent-missing", "Volume.create", lambda w: {
        "storagedomainID": w.sd, "imageID": w.ids["spare_img"], "volumeID": U(),
        "size": 64 * MiB, "volFormat": "COW", "srcImgUUID": w.ids["spare_img"],
        "srcVolUUID": "77777777-0000-0000-0000-000000000000"},
     13, ["77777777-0000-0000-0000-000000000000"]),
    ("vol-raw-with-parent", "Volume.create", lambda w: {
        "storagedomainID": w.sd, "imageID": w.ids["spare_img"], "volumeID": U(),
        "size": 64 * MiB, "volFormat": "RAW", "srcImgUUID": w.ids["spare_img"],
        "srcVolUUID": w.ids["spare"]}, 1000, ["COW"]),
    ("vol-parent-not-leaf", "Volume.create", lambda w: {
        "storagedomainID": w.sd, "imageID": w.ids["img"], "volumeID": U(),
        "size": 64 * MiB, "volFormat": "COW", "srcImgUUID": w.ids["img"],
        "srcVolUUID": w.ids["base"]}, 1000, ["not a leaf"]),
    ("vol-desc-too-long", "Volume.create", lambda w: {
        "storagedomainID": w.sd, "imageID": U(), "volumeID": U(), "size": MiB,
        "volFormat": "COW", "desc": "x" * 300}, -32602, ["desc"]),
    ("delete-parent", "Volume.delete", lambda w: {
        "storagedomainID": w.sd, "imageID": w.ids["img"], "volumeID": w.ids["base"]},
     204, ["children"]),
    ("delete-in-use", "Volume.delete", lambda w: {
        "storagedomainID": w.sd, "imageID": w.ids["img"], "volumeID": w.ids["leaf"]},
     203, ["running VM"]),
    # An unknown volume is no error: Volume.delete is idempotent (issue 10, finding 8).
    ("delete-unknown-domain", "Volume.delete", lambda w: {
        "storagedomainID": U(), "imageID": w.ids["img"], "volumeID": U()}, 358, []),
    ("info-unknown-domain", "Volume.getInfo", lambda w: {
        "storagedomainID": U(), "imageID": w.ids["img"], "volumeID": w.ids["base"]}, 358, []),
    ("snapshot-wrong-base", "VM.snapshot", lambda w: {"vmID": w.ids["vm"], "snapDrives": [
        {"domainID": w.sd, "imageID": w.ids["img"], "baseVolumeID": w.ids["base"],
         "volumeID": U()}]}, 48, ["baseVolumeID"]),
    ("snapshot-empty", "VM.snapshot", lambda w: {"vmID": w.ids["vm"], "snapDrives": []},
     -32602, ["snapDrives"]),
    ("snapshot-foreign-image", "VM.snapshot", lambda w: {"vmID": w.ids["vm"], "snapDrives": [
        {"domainID": w.sd, "imageID": w.ids["spare_img"], "baseVolumeID": w.ids["spare"],
         "volumeID": U()}]}, 13, [""]),
    ("vmList-bad-id", "Host.getVMList", lambda w: {"vmList": ["x"]}, -32602, ["vmList"]),
    ("unknown-param", "Host.ping", lambda w: {"foo": 1}, -32602, ["foo"]),
    ("unknown-verb", "VM.explode", lambda w: {}, -32601, ["VM.explode"]),
    ("unknown-namespace", "Foo.bar", lambda w: {}, -32601, ["Foo.bar"]),
]


@pytest.mark.parametrize("name,method,params,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_params(world, name, method, params, code, words):
    reply = rpc(world, method, params(world))
    assert "result" not in reply, reply
    err = reply["error"]
    assert err["code"] == code, err
    for word in words:
        assert word in err["message"], err
    assert "Traceback" not in err["message"]
    assert rpc(world, "Host.ping", {})["result"] is True
    assert world.digest() == world.before


RAW = [
    ("malformed-json", b'{"jsonrpc": "2.0", "method": ', -32700),
    ("not-utf8", b'\xff\xfe{"jsonrpc"', -32700),
    ("wrong-version", b'{"jsonrpc": "1.0", "id": 1, "method": "Host.ping"}', -32600),
    ("no-method", b'{"jsonrpc": "2.0", "id": 1}', -32600),
    ("params-array", b'{"jsonrpc": "2.0", "id": 1, "method": "VM.getStats", "params": [1]}',
     None),
    ("empty-batch", b"[]", -32600),
]


@pytest.mark.parametrize("name,body,code", RAW, ids=[r[0] for r in RAW])
def test_bad_envelopes(world, name, body, code):
    _, reply = post(world, body)
    assert reply["error"]["code"] in ((code,) if code else (-32600, -32602)), reply
    assert rpc(world, "Host.ping", {})["result"] is True
    assert world.digest() == world.before


def test_oversized_body_is_refused_without_reading_it(world):
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "Host.ping", "params": {"x": "' \
        + b"a" * (2 * MiB) + b'"}}'
    status, reply = post(world, body)
    assert status == 413
    assert reply["error"]["code"] == -32600
    assert "exceeds the limit" in reply["error"]["message"]
    assert rpc(world, "Host.ping", {})["result"] is True


def test_batch_mixes_errors_and_results(world):
    body = json.dumps([
        {"jsonrpc": "2.0", "id": 1, "method": "Host.ping"},
        {"jsonrpc": "2.0", "id": 2, "method": "VM.getStats", "params": {"vmID": "nope"}},
        {"jsonrpc": "2.0", "id": 3, "method": "VM.getStats", "params": {"vmID": world.ids["vm"]}},
    ]).encode()
    _, replies = post(world, body)
    by_id = {r["id"]: r for r in replies}
    assert by_id[1]["result"] is True
    assert by_id[2]["error"]["code"] == -32602
    assert by_id[3]["result"][0]["vmId"] == world.ids["vm"]
    assert world.digest() == world.before
