"""Recovery is per VM (issue 11): a VM whose job record cannot be loaded, or
whose vmhost metadata is unreadable, is reported and never stops the
recovery of the others nor keeps the API at 99."""
from __future__ import annotations

import json
import uuid

import libvirt

from conftest import start_agent
from vmhost.virt import domxml


def set_payload(env, vm: str, payload: str) -> None:
    env.dom(vm).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                            f"<vm>{domxml.escape_text(payload)}</vm>",
                            domxml.METADATA_KEY, domxml.METADATA_NS,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)


def payload_of(env, vm: str) -> dict:
    return json.loads(domxml.read_metadata(env.dom(vm).XMLDesc(0)))


def test_restart_with_unreadable_records_recovers_the_others(env):
    img = [str(uuid.uuid4()) for _ in range(3)]
    vms = [env.create_vm([(i, env.create_volume(i))]) for i in img]
    good, bad_job, bad_def = vms
    # A job record from a newer agent (after a downgrade) and a malformed one.
    d = payload_of(env, bad_job)
    leaf = d["drives"][0]["volumeChain"][-1]["volumeID"]
    newer, malformed = str(uuid.uuid4()), str(uuid.uuid4())
    d["jobs"] = {newer: {"version": 99, "id": newer, "drive": "vda", "state": "COMMIT"},
                 malformed: {"version": 2, "id": malformed, "drive": "vda",
                             "domain": env.sd, "image": img[1], "leaf": "../../etc/passwd",
                             "base": leaf, "top": leaf, "chain": [leaf], "bandwidth": 0,
                             "state": "COMMIT"}}
    set_payload(env, bad_job, json.dumps(d))
    # A definition that is not JSON at all, but names this agent.
    raw = json.dumps(payload_of(env, bad_def))
    set_payload(env, bad_def, raw[:-10])
    env.agent.kill9()
    env.agent = start_agent(env.agent.state_dir)        # waits until the API leaves 99
    listed = {v["vmId"] for v in env.call("Host.getVMList")}
    assert good in listed and bad_job in listed and bad_def not in listed
    stats = {s["vmId"]: s for s in env.call("Host.getAllVmStats")}
    assert stats[good]["status"] == "Up" and "recoveryError" not in stats[good]
    assert "version 99" in stats[bad_job]["recoveryError"]
    assert f"job {malformed}" in stats[bad_job]["recoveryError"]
    assert "leaf must be a UUID" in stats[bad_job]["recoveryError"]
    # The VM with bad records is still driven: its drive is busy for merges,
    # and it can be stopped; the records are kept as they were.
    assert len(payload_of(env, bad_job)["jobs"]) == 2
    env.call("VM.destroy", vmID=bad_job)
    assert env.dom(good).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    log = open(env.agent.log_path).read()
    assert f"domain {bad_def}: cannot be recovered" in log
