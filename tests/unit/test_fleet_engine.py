"""The engine's failover path (vmhost.testing.fleet.engine_start) against an
ApiServer whose verbs answer as a host does while a dead host's lease lives,
then after it expired: every branch of the path, without a lab."""
from __future__ import annotations

import pytest

from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.schema import load_schema
from vmhost.api.server import ApiServer
from vmhost.errors import AcquireLockFailure, NoSuchVM, PrepareIllegalVolume
from vmhost.testing import fleet

SD = "11111111-1111-4111-8111-111111111111"
IMG = "22222222-2222-4222-8222-222222222222"
BASE = "33333333-3333-4333-8333-333333333333"
LEAF = "44444444-4444-4444-8444-444444444444"
VM = "55555555-5555-4555-8555-555555555555"
HELD = ("lease {vm} on {sd} is held by another host (host id 1, {state}); a dead host's "
        "leases expire 68 s after its last renewal")


class Host:
    """VM.create answers from `answers` (an exception or None = started), one per call."""

    def __init__(self, answers: list, reconcile: list | None = None, vms: list | None = None):
        self.answers, self.reconcile, self.vms = answers, reconcile, vms or []
        self.created_on: list[str] = []

    def table(self):
        return {"VM.create": self.create, "Host.getVMList": lambda p: self.vms,
                "Image.reconcileVolumeChain": self.reconcile_chain}

    def create(self, p):
        self.created_on.append(p["vmParams"]["devices"][0]["volumeID"])
        answer = self.answers.pop(0)
        if answer is not None:
            raise answer
        return {"vmId": p["vmID"]}

    def reconcile_chain(self, p):
        assert p["leafVolID"] == LEAF
        return self.reconcile


def held(state: str) -> AcquireLockFailure:
    return AcquireLockFailure(f"VM {VM}: its lease is held by another host: "
                              + HELD.format(vm=VM, sd=SD, state=state))


def start(host: Host, monkeypatch) -> tuple[fleet.Restart, dict, list[str]]:
    monkeypatch.setattr(fleet, "RETRY_INTERVAL", 0.01)
    server = ApiServer(("127.0.0.1", 0), Dispatcher(load_schema(), host.table()))
    server.start()
    params = {"vmName": "vm", "memSize": 64, "devices": [
        {"device": "disk", "domainID": SD, "imageID": IMG, "volumeID": LEAF}]}
    lines: list[str] = []
    try:
        restart = fleet.engine_start(f"http://127.0.0.1:{server.port}/jsonrpc", VM, params,
                                     SD, IMG, timeout=10, say=lines.append)
    finally:
        server.stop()
    return restart, params, lines


def test_retries_while_the_lease_is_held_saying_each_new_state(monkeypatch):
    host = Host([held("live"), held("fail"), held("fail"), None])
    restart, params, lines = start(host, monkeypatch)
    assert (restart.path, restart.refusals, restart.reconciled) == ("create", 3, None)
    assert host.created_on == [LEAF] * 4 and params["devices"][0]["volumeID"] == LEAF
    assert lines[0].startswith("VM.create refused (651): the VM lease is held by host id 1 "
                               "(sanlock: live, renewing its host id)")
    assert "(sanlock: fail, no longer renewing, not yet dead)" in lines[1]
    assert lines[2].startswith("VM.create accepted on the leaf 44444444 after 3 refusals")
    assert len(lines) == 3     # the repeated 'fail' is not said again


def test_an_illegal_leaf_is_reconciled_and_the_vm_created_on_the_leaf_it_returns(monkeypatch):
    host = Host([held("fail"), PrepareIllegalVolume(LEAF), None], reconcile=[BASE])
    restart, params, lines = start(host, monkeypatch)
    assert (restart.path, restart.reconciled) == ("reconcile+create", [BASE])
    assert host.created_on == [LEAF, LEAF, BASE]
    assert params["devices"][0]["volumeID"] == BASE
    assert any("VM.create refused (227): the leaf 44444444 is ILLEGAL" in line
               and "the chain is 33333333" in line for line in lines)


def test_an_answer_the_engine_does_not_expect_stops_it(monkeypatch):
    with pytest.raises(fleet.EngineError, match="error 1: Virtual machine does not exist"):
        start(Host([NoSuchVM(VM)]), monkeypatch)


def test_a_refusal_that_left_a_vm_behind_stops_it(monkeypatch):
    with pytest.raises(fleet.EngineError, match="a refused VM.create left a VM"):
        start(Host([held("live")], vms=[VM]), monkeypatch)
