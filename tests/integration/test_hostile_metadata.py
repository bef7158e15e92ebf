"""Hostile free text through the real API (issue 11): Volume.create with a
desc or diskType holding line separators, controls, '=' or key payloads
either succeeds and Volume.getInfo gives the value back exactly, or fails
with a clear invalid-parameter error naming the field. Every other volume of
the image stays readable, and a running VM's chain keeps working."""
from __future__ import annotations

import os
import shutil
import unicodedata
import uuid

import pytest

from conftest import TEST_BASE, Env, _destroy_test_domains, start_agent
from vmhost.client import Client, RpcError
from vmhost.ids import BLANK_UUID
from vmhost.storage.metadata import MAX_DESCRIPTION, MAX_DISKTYPE

MiB = 1 << 20
U = lambda: str(uuid.uuid4())  # noqa: E731

SEPARATORS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
              "\u2028", "\u2029"]
HOSTILE = [
    *(f"a{sep}CAP=1" for sep in SEPARATORS),
    *(f"{sep}LEGALITY=ILLEGAL{sep}PUUID={BLANK_UUID}{sep}EOF{sep}" for sep in SEPARATORS),
    "=", "VOLTYPE=INTERNAL", "\x00", "a\x00b", "\x7f", "\x9f", "%", "%0A", "%E2%80%A8",
    "\ufeff", "\u202e", "\U0001f600", "",
    "\u2028" * MAX_DESCRIPTION, "x" * (MAX_DESCRIPTION + 1), "\ud800", "a\udfffb",
]
INVALID_PARAMS = (-32602, 1000)   # the schema's refusal, the service's InvalidParameter


def storable(field: str, text: str) -> bool:
    limit, least = (MAX_DESCRIPTION, 0) if field == "desc" else (MAX_DISKTYPE, 1)
    return least <= len(text) <= limit and not any(unicodedata.category(c) == "Cs" for c in text)


@pytest.fixture(scope="module")
def world(libvirtd):
    workdir = os.path.join(TEST_BASE, f"hostile-md-{uuid.uuid4().hex[:8]}")
    storage_root = os.path.join(workdir, "storage")
    os.makedirs(storage_root, mode=0o755)
    os.chmod(workdir, 0o755)
    e = Env(agent=start_agent(os.path.join(workdir, "state")), sd=U(),
            storage_root=storage_root, conn=libvirtd)
    try:
        e.call("StorageDomain.create", storagedomainID=e.sd, domainType="localfs",
               typeArgs=storage_root, name="hostile")
        e.img = U()
        e.base = e.create_volume(e.img)
        e.vm = e.create_vm([(e.img, e.base)])
        # No client-side schema check: the agent itself must refuse.
        e.raw = Client(e.agent.url, validate=False)
        yield e
    finally:
        e.agent.stop()
        _destroy_test_domains(libvirtd)
        shutil.rmtree(workdir, ignore_errors=True)


def info(world, vol: str) -> dict:
    return world.call("Volume.getInfo", storagedomainID=world.sd, imageID=world.img, volumeID=vol)


@pytest.mark.parametrize("field", ["desc", "diskType"])
def test_hostile_text_round_trips_or_is_refused(world, field):
    before = {vol: info(world, vol) for vol in
              world.call("StorageDomain.getVolumes", storagedomainID=world.sd, imageID=world.img)}
    created = {}
    for text in HOSTILE:
        vol = U()
        params = dict(storagedomainID=world.sd, imageID=world.img, volumeID=vol, size=MiB,
                      volFormat="RAW", preallocate="SPARSE", diskType="DATA", desc="d")
        params[field] = text
        key = "description" if field == "desc" else "disktype"
        try:
            world.raw.call("Volume.create", **params)
        except RpcError as e:
            assert not storable(field, text), f"{ascii(text)} refused: {e}"
            assert e.code in INVALID_PARAMS and field in e.message, e
            continue
        assert storable(field, text), f"{ascii(text)} accepted"
        got = info(world, vol)
        assert got[key] == text, ascii(text)
        # Nothing else came from the text.
        other = "disktype" if field == "desc" else "description"
        assert (got[other], got["capacity"], got["legality"], got["voltype"], got["parent"],
                got["format"]) == ({"desc": "DATA", "diskType": "d"}[field], str(MiB), "LEGAL",
                                   "LEAF", BLANK_UUID, "RAW"), ascii(text)
        created[vol] = text
    assert len(created) == sum(storable(field, t) for t in HOSTILE)
    # The image stays readable: every volume, old and new, as it was written.
    for vol, was in before.items():
        assert info(world, vol) == was
    for vol, text in created.items():
        assert info(world, vol)["description" if field == "desc" else "disktype"] == text


def test_running_vm_snapshots_onto_a_hostile_volume(world):
    text = "top\u2028CAP=1\nVOLTYPE=INTERNAL\x85="
    top = U()
    world.raw.call("Volume.create", storagedomainID=world.sd, imageID=world.img, volumeID=top,
                   size=64 * MiB, volFormat="COW", diskType="DATA\x0bX", desc=text,
                   srcImgUUID=world.img, srcVolUUID=world.base)
    world.call("VM.snapshot", vmID=world.vm, snapDrives=[
        {"domainID": world.sd, "imageID": world.img, "baseVolumeID": world.base,
         "volumeID": top}])
    assert world.agent_chain(world.vm, world.img) == [world.base, top]
    assert world.call("Volume.getInfo", storagedomainID=world.sd, imageID=world.img,
                      volumeID=world.base)["voltype"] == "INTERNAL"
    got = info(world, top)
    assert (got["description"], got["disktype"], got["capacity"], got["parent"]) == \
        (text, "DATA\x0bX", str(64 * MiB), world.base)
