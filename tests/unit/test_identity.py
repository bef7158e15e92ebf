"""The agent identity decision (vmhost.identity) with a fake libvirt listing."""
from __future__ import annotations

import json
import os
import uuid

import libvirt
import pytest

from vmhost import identity
from vmhost.identity import AgentVm, IdentityError, resolve
from vmhost.virt import domxml

U = lambda: str(uuid.uuid4())  # noqa: E731
SD = U()                  # a storage domain in the state dir's registry
KNOWN = {SD}


def vm(name: str, agent_id: str, domain: str = SD) -> AgentVm:
    return AgentVm(U(), name, agent_id, frozenset({domain}))


class Listing:
    """A fake libvirt: the VMs it runs, how often it was asked, and whether
    it answers at all."""

    def __init__(self, vms=(), down: bool = False):
        self.vms, self.down, self.calls = list(vms), down, 0

    def __call__(self) -> list[AgentVm]:
        self.calls += 1
        if self.down:
            raise libvirt.libvirtError("cannot connect to libvirtd")
        return list(self.vms)


def id_file(tmp_path) -> str:
    return os.path.join(tmp_path, "host-id")


def test_valid_file_is_the_identity_and_libvirt_is_not_asked(tmp_path):
    agent_id = U()
    with open(id_file(tmp_path), "w") as f:
        f.write(agent_id + "\n")
    listing = Listing(down=True)
    assert resolve(str(tmp_path), listing, KNOWN) == agent_id
    assert listing.calls == 0


def test_fresh_host_makes_an_id_and_keeps_it(tmp_path):
    listing = Listing()
    made = resolve(str(tmp_path), listing, KNOWN)
    assert listing.calls == 1
    with open(id_file(tmp_path)) as f:
        assert f.read() == made + "\n"
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]   # written via atomic_write
    assert resolve(str(tmp_path), Listing(down=True), KNOWN) == made


def test_missing_file_with_running_vms_refuses_naming_file_ids_and_way_out(tmp_path):
    old = U()
    listing = Listing([vm("vm-a", old), vm("vm-b", old)])
    with pytest.raises(IdentityError) as e:
        resolve(str(tmp_path), listing, KNOWN)
    msg = str(e.value)
    for word in (id_file(tmp_path), "missing", old, "vm-a", "vm-b", "2 VM(s)",
                 f"--adopt-identity {old}", "Restore"):
        assert word in msg, msg
    assert not os.path.exists(id_file(tmp_path))   # nothing made


def test_missing_file_and_libvirt_down_decides_nothing(tmp_path):
    with pytest.raises(libvirt.libvirtError):
        resolve(str(tmp_path), Listing(down=True), KNOWN)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"\x00" * 16, b"\xff\xfe",
                                     b"ABCDEFAB-ABCD-ABCD-ABCD-ABCDEFABCDEF\n",
                                     b"00000000-0000-0000-0000-00000000000\n"])
@pytest.mark.parametrize("vms", [0, 1])
def test_corrupt_file_is_always_refused_never_replaced(tmp_path, content, vms):
    with open(id_file(tmp_path), "wb") as f:
        f.write(content)
    old = U()
    listing = Listing([vm("vm-a", old)][:vms])
    with pytest.raises(IdentityError) as e:
        resolve(str(tmp_path), listing, KNOWN)
    msg = str(e.value)
    assert id_file(tmp_path) in msg and "does not hold an agent id" in msg, msg
    assert (f"--adopt-identity {old}" in msg) if vms else ("remove" in msg), msg
    with open(id_file(tmp_path), "rb") as f:
        assert f.read() == content


def test_unreadable_file_is_refused_even_when_libvirt_is_down(tmp_path):
    os.mkdir(id_file(tmp_path))     # EISDIR: as unreadable as it gets, for root too
    with pytest.raises(IdentityError) as e:
        resolve(str(tmp_path), Listing(down=True), KNOWN)
    msg = str(e.value)
    assert "cannot be read" in msg and id_file(tmp_path) in msg and "--adopt-identity" in msg


def test_adopt_restores_the_identity_the_vms_carry(tmp_path):
    old = U()
    listing = Listing([vm("vm-a", old)])
    assert resolve(str(tmp_path), listing, KNOWN, adopt=old) == old
    with open(id_file(tmp_path)) as f:
        assert f.read() == old + "\n"
    # Then a plain start uses it, and adopting the same id again is harmless.
    assert resolve(str(tmp_path), listing, KNOWN) == old
    assert resolve(str(tmp_path), listing, KNOWN, adopt=old) == old


def test_adopt_replaces_a_corrupt_file(tmp_path):
    with open(id_file(tmp_path), "w") as f:
        f.write("garbage")
    new = U()
    assert resolve(str(tmp_path), Listing(), KNOWN, adopt=new) == new
    assert resolve(str(tmp_path), Listing(down=True), KNOWN) == new


@pytest.mark.parametrize("case", ["bad-uuid", "other-valid-file", "not-carried"])
def test_adopt_refusals(tmp_path, case):
    old, other = U(), U()
    listing = Listing([vm("vm-a", old)])
    adopt = other
    if case == "bad-uuid":
        adopt = "../../etc"
    elif case == "other-valid-file":
        with open(id_file(tmp_path), "w") as f:
            f.write(old + "\n")
    with pytest.raises(IdentityError) as e:
        resolve(str(tmp_path), listing, KNOWN, adopt=adopt)
    msg = str(e.value)
    words = {"bad-uuid": ["--adopt-identity", "UUID"],
             "other-valid-file": [old, other, "does not replace"],
             "not-carried": [other, old, "vm-a", "unmanaged"]}[case]
    for word in words:
        assert word in msg, msg
    if case != "other-valid-file":
        assert not os.path.exists(id_file(tmp_path))


def test_vms_on_domains_this_state_dir_does_not_know_are_another_agents(tmp_path, caplog):
    # Several agents on one libvirtd (as in the tests): a fresh agent starts,
    # naming the VMs it leaves alone.
    theirs = U()
    listing = Listing([vm("vm-x", theirs, domain=U())])
    with caplog.at_level("WARNING", logger="vmhost.identity"):
        made = resolve(str(tmp_path), listing, KNOWN)
    assert made != theirs
    assert theirs in caplog.text and "vm-x" in caplog.text and "--adopt-identity" in caplog.text
    # ... but one VM on a known domain is enough to refuse.
    os.unlink(id_file(tmp_path))
    listing.vms.append(vm("vm-y", theirs))
    with pytest.raises(IdentityError, match="vm-y"):
        resolve(str(tmp_path), listing, KNOWN)
    # Adopting an id only VMs of other domains carry is refused only if VMs
    # of ours carry another one.
    assert resolve(str(tmp_path), Listing([vm("vm-x", U(), domain=U())]), KNOWN,
                   adopt=theirs) == theirs


def _domain_xml(payload: str | None) -> str:
    meta = ("" if payload is None else
            f"<metadata><vmhost:vm xmlns:vmhost='{domxml.METADATA_NS}'>{payload}</vmhost:vm>"
            "</metadata>")
    return f"<domain type='kvm'><name>x</name>{meta}</domain>"


def test_record_is_read_leniently_from_domain_metadata():
    agent, sd = U(), U()
    record = {"version": 99, "hostId": agent, "drives": [{"domainID": sd}, "broken", {}]}
    got = identity.record_of(_domain_xml(json.dumps(record)))
    assert got["hostId"] == agent and identity._drive_domains(got) == {sd}
    assert identity._drive_domains({"drives": "broken"}) == frozenset()
    for payload in ("not json", "[1]", None):
        assert identity.record_of(_domain_xml(payload)) == {}
