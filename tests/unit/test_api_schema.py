"""schema.yaml + vmhost.api.schema: what is accepted, and what the error
messages say about what is not."""
from __future__ import annotations

import copy
import importlib.resources

import pytest
import yaml

from vmhost.api.schema import (InvalidParams, Schema, SchemaError, UnknownVerb, load_schema,
                               shipped_schema_text)

SD = "11111111-1111-4111-8111-111111111111"
IMG = "22222222-2222-4222-8222-222222222222"
VOL = "33333333-3333-4333-8333-333333333333"
VM = "4a4a4a4a-4444-4444-8444-44444444abcd"
BLANK = "00000000-0000-0000-0000-000000000000"

VM_PARAMS = {
    "vmName": "web-01",
    "memSize": 1024,
    "devices": [
        {"device": "disk", "type": "disk", "domainID": SD, "imageID": IMG, "volumeID": VOL,
         "format": "cow", "iface": "virtio", "shared": "false", "propagateErrors": "off"},
        {"device": "memballoon", "type": "balloon", "specParams": {"model": "virtio"}},
    ],
    "resumeBehavior": "auto_resume",
    "kvmEnable": "true",          # engine keys vmhost ignores pass through
    "custom": {"x": [1, 2]},
}

VALID = [
    ("Host.ping", {}),
    ("Host.ping2", {}),
    ("Host.getCapabilities", {}),
    ("Host.getVMList", {}),
    ("Host.getVMList", {"fullStatus": True, "vmList": [VM], "onlyUUID": False}),
    ("Host.getAllVmStats", {}),
    ("Host.getVMFullList", {"vmList": []}),
    ("Host.getStorageRepoStats", {"domains": [SD]}),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": "localfs",
                              "typeArgs": "/var/lib/vmhost/sd", "name": "local"}),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "/srv/a..b",
                              "name": "x" * 50, "domainClass": 1, "version": "5",
                              "storagepoolID": BLANK}),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 6, "typeArgs": "/srv/shared",
                              "name": "shared"}),
    ("StorageDomain.connect", {"storagedomainID": SD, "domainType": "posixfs",
                               "typeArgs": "/srv/shared"}),
    ("Lease.create", {"lease": {"sd_id": SD, "lease_id": VM}, "job_id": IMG}),
    ("Lease.info", {"lease": {"sd_id": SD, "lease_id": VM}}),
    ("Lease.delete", {"lease": {"sd_id": SD, "lease_id": VM}}),
    ("StorageDomain.disconnect", {"storagedomainID": SD}),
    ("StorageDomain.getInfo", {"storagedomainID": SD}),
    ("StorageDomain.getVolumes", {"storagedomainID": SD, "imageID": IMG}),
    ("Volume.create", {"storagedomainID": SD, "imageID": IMG, "volumeID": VOL,
                       "size": 1073741824, "volFormat": "RAW"}),
    ("Volume.create", {"storagedomainID": SD, "imageID": IMG, "volumeID": VOL,
                       "size": "1073741824", "volFormat": 4, "preallocate": 2,
                       "diskType": "DATA", "desc": "d" * 210, "srcImgUUID": BLANK,
                       "srcVolUUID": BLANK, "storagepoolID": BLANK, "initialSize": "0"}),
    ("Volume.getInfo", {"storagedomainID": SD, "imageID": IMG, "volumeID": VOL}),
    ("Volume.delete", {"storagedomainID": SD, "imageID": IMG, "volumeID": VOL,
                       "postZero": False, "force": True}),
    ("VM.create", {"vmID": VM, "vmParams": VM_PARAMS}),
    ("VM.create", {"vmID": VM, "vmParams": {"vmName": "a", "memSize": 16, "devices": []}}),
    ("VM.destroy", {"vmID": VM}),
    ("VM.pause", {"vmID": VM}),
    ("VM.cont", {"vmID": VM}),
    ("VM.getStats", {"vmID": VM}),
    ("VM.snapshot", {"vmID": VM, "snapDrives": [
        {"domainID": SD, "imageID": IMG, "baseVolumeID": VOL, "volumeID": BLANK}],
        "frozen": True}),
    ("VM.merge", {"vmID": VM, "drive": {"domainID": SD, "imageID": IMG, "volumeID": VOL},
                  "baseVolUUID": VOL, "topVolUUID": VOL}),
    ("VM.merge", {"vmID": VM, "drive": {"domainID": SD, "imageID": IMG, "volumeID": VOL,
                                        "poolID": SD, "device": "disk"},
                  "baseVolUUID": VOL, "topVolUUID": VOL, "bandwidth": 10, "jobUUID": VM}),
    ("VM.abortMerge", {"vmID": VM, "jobUUID": VM}),
    ("VM.dismissJob", {"vmID": VM, "jobUUID": VM}),
    ("Host.getPendingWork", {}),
    ("Host.getJobHistory", {}),
    ("VM.synchronizeDisks", {"vmID": VM}),
    ("Image.reconcileVolumeChain", {"storagedomainID": SD, "imageID": IMG, "leafVolID": VOL}),
    ("SDM.merge", {"job_id": VM, "subchain_info": {"sd_id": SD, "img_id": IMG, "base_id": VOL,
                                                   "top_id": VOL, "base_generation": 3}}),
    ("Host.getJobs", {}),
    ("Host.getJobs", {"job_type": "storage", "job_ids": [VM]}),
    ("Host.abortJob", {"job_id": VM}),
    ("Host.deleteJob", {"job_id": VM}),
]


@pytest.fixture(scope="module")
def schema() -> Schema:
    return load_schema()


def test_lists_every_verb(schema):
    assert set(schema.verbs()) == {v for v, _ in VALID}
    assert schema.verbs() == sorted(schema.verbs())


def test_loaded_once():
    assert load_schema() is load_schema()


def test_shipped_schema_passes_the_meta_schema_check():
    # load_schema() skips the check at start-up (it cost ~40 ms of every start):
    # here it runs on every change of schema.yaml.
    schema = Schema.from_yaml(shipped_schema_text(), check=True)
    assert schema.verbs() == load_schema().verbs()


def test_the_check_can_be_skipped_only_on_request():
    broken = "verbs:\n  Host.ping:\n    description: x\n    params: {a: {type: 7}}\n"
    with pytest.raises(SchemaError):
        Schema.from_yaml(broken)
    assert Schema.from_yaml(broken, check=False).verbs() == ["Host.ping"]


@pytest.mark.parametrize("verb,params", VALID, ids=[v for v, _ in VALID])
def test_accepts_valid_params(schema, verb, params):
    schema.validate(verb, copy.deepcopy(params))


def _vm_create(**vm_params_changes):
    vm_params = copy.deepcopy(VM_PARAMS)
    vm_params.update(vm_params_changes)
    return {"vmID": VM, "vmParams": vm_params}


def _with_disk(**changes):
    params = _vm_create()
    disk = params["vmParams"]["devices"][0]
    disk.update(changes)
    for key, value in changes.items():
        if value is None:
            del disk[key]
    return params


def _volume(**changes):
    params = {"storagedomainID": SD, "imageID": IMG, "volumeID": VOL,
              "size": 1024, "volFormat": "COW"}
    params.update(changes)
    return params


INVALID = [
    # UUIDs
    ("VM.destroy", {"vmID": "x"}, "vmID: 'x' is not a valid UUID"),
    ("VM.destroy", {"vmID": "../../etc/passwd"}, "vmID: '../../etc/passwd' is not a valid UUID"),
    ("VM.destroy", {"vmID": VM.upper()}, f"vmID: '{VM.upper()}' is not a valid UUID"),
    ("VM.destroy", {"vmID": VM + "\n"}, "vmID: " + repr(VM + "\n") + " is not a valid UUID"),
    ("VM.destroy", {"vmID": VM[:-1] + "/"}, "is not a valid UUID"),
    ("VM.destroy", {"vmID": 42}, "vmID: 42 is not a valid UUID"),
    ("VM.destroy", {"vmID": None}, "vmID: null is not a valid UUID"),
    ("Volume.getInfo", {"storagedomainID": SD, "imageID": "../" + IMG[3:], "volumeID": VOL},
     "imageID: '../" + IMG[3:] + "' is not a valid UUID"),
    ("VM.create", _with_disk(imageID="x"), "vmParams.devices[0].imageID: 'x' is not a valid UUID"),
    ("VM.create", _with_disk(imageID=None), "missing required parameter 'vmParams.devices[0].imageID'"),
    ("VM.snapshot", {"vmID": VM, "snapDrives": [
        {"domainID": SD, "imageID": IMG, "baseVolumeID": "..", "volumeID": VOL}]},
     "snapDrives[0].baseVolumeID: '..' is not a valid UUID"),
    ("Host.getVMList", {"vmList": [VM, "nope"]}, "vmList[1]: 'nope' is not a valid UUID"),
    # missing / unknown
    ("VM.destroy", {}, "missing required parameter 'vmID'"),
    ("VM.destroy", {"vmID": VM, "foo": 1}, "unknown parameter 'foo'"),
    ("Host.ping", {"x": 1}, "unknown parameter 'x'"),
    ("VM.create", {"vmID": VM}, "missing required parameter 'vmParams'"),
    ("VM.create", {"vmID": VM, "vmParams": {"memSize": 64, "devices": []}},
     "missing required parameter 'vmParams.vmName'"),
    ("VM.create", _with_disk(device=None), "missing required parameter 'vmParams.devices[0].device'"),
    ("VM.snapshot", {"vmID": VM, "snapDrives": [
        {"domainID": SD, "imageID": IMG, "baseVolumeID": VOL, "volumeID": VOL, "bogus": 1}]},
     "unknown parameter 'snapDrives[0].bogus'"),
    ("Volume.create", {"storagedomainID": SD, "imageID": IMG, "volumeID": VOL, "size": 1},
     "missing required parameter 'volFormat'"),
    # wrong types and ranges
    ("VM.create", _vm_create(memSize="1024"), "vmParams.memSize: expected integer, got string '1024'"),
    ("VM.create", _vm_create(memSize=1024.0), "vmParams.memSize: expected integer, got number 1024.0"),
    ("VM.create", _vm_create(memSize=True), "vmParams.memSize: expected integer, got boolean true"),
    ("VM.create", _vm_create(memSize=8), "vmParams.memSize: 8 is less than the minimum 16"),
    ("VM.create", _vm_create(memSize=65537), "vmParams.memSize: 65537 is greater than the maximum 65536"),
    ("VM.create", _vm_create(vmName="my vm"), "vmParams.vmName: 'my vm' is not a valid VM name"),
    ("VM.create", _vm_create(vmName="../x"), "vmParams.vmName: '../x' is not a valid VM name"),
    ("VM.create", _vm_create(vmName=".."), "vmParams.vmName: '..' is not a valid VM name"),
    ("VM.create", _vm_create(vmName=""), "vmParams.vmName: '' is not a valid VM name"),
    ("VM.create", _vm_create(vmName="a" * 65), "is not a valid VM name"),
    ("VM.create", _vm_create(devices={}), "vmParams.devices: expected array, got object {}"),
    ("VM.create", _vm_create(devices=["disk"]), "vmParams.devices[0]: expected object, got string 'disk'"),
    ("VM.create", _with_disk(format="qcow2"),
     "vmParams.devices[0].format: 'qcow2' is not a valid disk format (expected one of 'cow', 'raw')"),
    ("VM.create", _vm_create(resumeBehavior="pause"),
     "vmParams.resumeBehavior: 'pause' is not a valid resume behavior "
     "(expected one of 'auto_resume', 'leave_paused', 'kill')"),
    ("VM.create", _vm_create(allowIllegal="yes"), "vmParams.allowIllegal: expected boolean, got string 'yes'"),
    ("VM.create", {"vmID": VM, "vmParams": []}, "vmParams: expected object, got array []"),
    ("VM.snapshot", {"vmID": VM, "snapDrives": []}, "snapDrives: must have at least 1 item"),
    ("VM.snapshot", {"vmID": VM, "snapDrives": [{}], "frozen": "no"}, "missing required parameter"),
    ("Volume.create", _volume(size=0), "size: 0 is not a valid size in bytes"),
    ("Volume.create", _volume(size=-1), "size: -1 is not a valid size in bytes"),
    ("Volume.create", _volume(size="0"), "size: '0' is not a valid size in bytes"),
    ("Volume.create", _volume(size="1G"), "size: '1G' is not a valid size in bytes"),
    ("Volume.create", _volume(size=" 1"), "size: ' 1' is not a valid size in bytes"),
    ("Volume.create", _volume(size=1.5), "size: 1.5 is not a valid size in bytes"),
    ("Volume.create", _volume(size=True), "size: true is not a valid size in bytes"),
    ("Volume.create", _volume(volFormat="QCOW2"),
     "volFormat: 'QCOW2' is not a valid volume format (expected one of 'COW', 'RAW', 4, 5)"),
    ("Volume.create", _volume(volFormat="4"), "volFormat: '4' is not a valid volume format"),
    ("Volume.create", _volume(preallocate="THIN"), "preallocate: 'THIN' is not a valid preallocation type"),
    ("Volume.create", _volume(desc="d" * 211), "desc: 'ddd"),
    ("Volume.create", _volume(desc="d" * 211), "is too long (at most 210 characters)"),
    ("Volume.create", _volume(srcVolUUID=""), "srcVolUUID: '' is not a valid UUID"),
    ("Volume.delete", {"storagedomainID": SD, "imageID": IMG, "volumeID": VOL, "force": 1},
     "force: expected boolean, got integer 1"),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": "nfs", "typeArgs": "/a", "name": "n"},
     "domainType: 'nfs' is not a valid storage domain type (expected one of 'localfs', 4, 'posixfs', 6)"),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "relative/dir", "name": "n"},
     "typeArgs: 'relative/dir' is not a valid absolute path"),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "/srv/../etc", "name": "n"},
     "typeArgs: '/srv/../etc' is not a valid absolute path"),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "/srv/..", "name": "n"},
     "is not a valid absolute path"),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "/srv\n/../etc", "name": "n"},
     "is not a valid absolute path"),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "/a\x00b", "name": "n"},
     "is not a valid absolute path"),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "/a", "name": ""},
     "name: '' is too short (at least 1 character)"),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "/a", "name": "n" * 51},
     "is too long (at most 50 characters)"),
    ("StorageDomain.create", {"storagedomainID": SD, "domainType": 4, "typeArgs": "/a", "name": "n",
                              "version": [5]}, "version: expected integer or string, got array [5]"),
    ("Host.getVMList", {"vmList": VM}, f"vmList: expected array, got string '{VM}'"),
    ("Host.getVMList", {"onlyUUID": "true"}, "onlyUUID: expected boolean, got string 'true'"),
    ("Host.getStorageRepoStats", {"domains": None}, "domains: expected array, got null"),
]


@pytest.mark.parametrize("verb,params,message", INVALID, ids=[m[:40] for _, _, m in INVALID])
def test_rejects_with_message_naming_the_field(schema, verb, params, message):
    with pytest.raises(InvalidParams) as e:
        schema.validate(verb, params)
    assert message in e.value.message
    assert str(e.value) == e.value.message


def test_params_must_be_an_object(schema):
    with pytest.raises(InvalidParams, match=r"^params: expected object, got array \[\]$"):
        schema.validate("Host.ping", [])


def test_long_values_are_cut_short_in_messages(schema):
    with pytest.raises(InvalidParams) as e:
        schema.validate("VM.destroy", {"vmID": "x" * 100_000})
    assert e.value.message.startswith("vmID: 'xxx")
    assert e.value.message.endswith("x... is not a valid UUID")
    assert len(e.value.message) < 100


def test_unknown_verb(schema):
    assert not schema.has("VM.explode")
    with pytest.raises(UnknownVerb, match="unknown method 'VM.explode'"):
        schema.validate("VM.explode", {})
    with pytest.raises(UnknownVerb):
        schema.param_schema("VM.explode", "vmID")


def test_recovery_gate_flags(schema):
    assert schema.allowed_while_recovering("Host.ping")
    assert not schema.allowed_while_recovering("VM.create")
    assert not schema.allowed_while_recovering("Host.getCapabilities")


def test_param_schema_resolves_refs(schema):
    vm_id = schema.param_schema("VM.destroy", "vmID")
    assert vm_id["type"] == "string" and "pattern" in vm_id
    assert schema.param_schema("Volume.create", "volFormat")["enum"] == ["COW", "RAW", 4, 5]
    parent = schema.param_schema("Volume.create", "srcVolUUID")
    assert parent["type"] == "string" and "blank" in parent["description"]
    assert schema.param_schema("Volume.create", "desc")["type"] == "string"
    assert schema.param_schema("VM.destroy", "nope") is None


def test_every_verb_is_documented(schema):
    for verb in schema.verbs():
        spec = schema.spec(verb)
        assert spec.description, verb
        assert spec.returns.get("description"), verb


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_alternatives_have_titles():
    # anyOf/oneOf errors are only readable through the title (see _describe).
    doc = yaml.safe_load(importlib.resources.files("vmhost.api").joinpath("schema.yaml").read_text())
    for node in _walk(doc):
        if "anyOf" in node or "oneOf" in node:
            assert node.get("title"), node


MINIMAL = """
$defs: {}
verbs:
  Foo.bar:
    description: test
    params:
      x: {type: integer}
    required: [x]
"""


def test_schema_from_yaml():
    schema = Schema.from_yaml(MINIMAL)
    assert schema.verbs() == ["Foo.bar"]
    schema.validate("Foo.bar", {"x": 1})
    with pytest.raises(InvalidParams, match="x: expected integer"):
        schema.validate("Foo.bar", {"x": "1"})


@pytest.mark.parametrize("broken,message", [
    (MINIMAL.replace("Foo.bar", "foo_bar"), "is not Namespace.verb"),
    (MINIMAL.replace("required: [x]", "required: [y]"), "required ['y'] not in params"),
    (MINIMAL.replace("description: test", "description: ''"), "missing description"),
    (MINIMAL.replace("type: integer", "type: integr"), "Foo.bar:"),
    (MINIMAL.replace("    required: [x]", "    requird: [x]"), "unknown keys ['requird']"),
])
def test_malformed_schema_is_refused_at_load(broken, message):
    with pytest.raises(SchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Schema.from_yaml(broken)


def test_shipped_schema_is_read_through_a_json_cache_named_by_its_digest():
    import os

    from vmhost.api import schema as mod
    text = "verbs:\n  Host.ping:\n    description: cache test\n    params: {}\n"
    digest = mod.hashlib.sha256(text.encode()).hexdigest()[:20]
    cache = os.path.join(os.path.dirname(mod.__file__), "__pycache__", f"schema.{digest}.json")
    try:
        assert mod._shipped_document(text) == yaml.safe_load(text)   # parsed, then cached
        with open(cache) as f:
            assert "cache test" in f.read()
        with open(cache, "w") as f:
            f.write('{"verbs": {"Host.ping": {"description": "from the cache"}}}')
        assert mod._shipped_document(text)["verbs"]["Host.ping"]["description"] == \
            "from the cache"
        with open(cache, "w") as f:
            f.write("{not json")                                      # torn: the YAML wins
        assert mod._shipped_document(text) == yaml.safe_load(text)
    finally:
        if os.path.exists(cache):
            os.unlink(cache)


def test_agent_start_imports_neither_yaml_nor_jsonschema_nor_cryptography():
    """Start-up cost: the schema comes from its JSON cache, validators are
    built on first use, cryptography only with TLS (a subprocess: this test
    process imported all three)."""
    import subprocess
    import sys
    code = ("import sys, vmhost.agent, vmhost.cli.main; from vmhost.api import tls; "
            "from vmhost.api.schema import load_schema; "
            "tls.check_listen('127.0.0.1', False, False); "
            "tls.server_context_or_none(None, None, None); "
            "load_schema().validate('Host.getVMList', {}); "
            "print(sorted(m for m in ('yaml', 'jsonschema', 'cryptography') if m in sys.modules))")
    for _ in range(2):   # the first run may write the cache
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
    assert out.strip() == "[]"
