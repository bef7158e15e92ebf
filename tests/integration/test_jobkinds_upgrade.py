"""A VM definition written before snapshot and disk sync were job kinds
(`pendingSync`, `storageSync` instead of `agentJobs` records) is still read
after an agent restart, its pending work is resumed, and the definition is
written back in the new format (docs/architecture.md, Jobs)."""
from __future__ import annotations

import json
import uuid

from conftest import start_agent, wait_for
from test_recovery_bad_records import payload_of, set_payload


def as_old_agent_wrote_it(d: dict, **fields) -> str:
    old = {k: v for k, v in d.items() if k != "agentJobs"}
    return json.dumps({**old, "pendingSync": [], "storageSync": {}, **fields})


def restart_with(env, vm: str, payload: str) -> None:
    env.agent.kill9()                 # (so that it cannot persist over the payload)
    set_payload(env, vm, payload)
    env.agent = start_agent(env.agent.state_dir)


def test_an_old_pending_sync_is_resolved_from_the_live_xml(env):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    before = payload_of(env, vm)
    top = env.snapshot(vm, img, base)
    assert env.live_chain(vm) == [base, top]
    # An old agent killed between libvirt's switch and its re-read of the drive.
    restart_with(env, vm, as_old_agent_wrote_it(before, pendingSync=["vda"]))
    assert env.assert_four_views(vm, img) == [base, top]
    stored = payload_of(env, vm)
    assert stored["agentJobs"] == {} and "pendingSync" not in stored
    assert "recoveryError" not in env.call("VM.getStats", vmID=vm)[0]


def test_an_old_storage_sync_is_resumed_and_written_as_done(env):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    top = env.snapshot(vm, img, base)
    restart_with(env, vm, as_old_agent_wrote_it(payload_of(env, vm),
                                                storageSync={"vda": top}))
    # The repair runs as a disk sync job; its end persists the new format
    # without the job's record.
    def done() -> bool:
        d = payload_of(env, vm)
        return "storageSync" not in d and d.get("agentJobs") == {}
    wait_for(done, 30, "the old repair to run and its record to go")
    assert env.assert_four_views(vm, img) == [base, top]
