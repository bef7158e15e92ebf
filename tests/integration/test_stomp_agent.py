"""A real agent (libvirtd, QEMU) driven over STOMP: VDSM's verbs from
stomp.py (an independent client), VDSM-style VM_status events on
jms.queue.events, and `vmhost-client --url stomp://... VM merge --wait`
woken by the job's events (with polling made too slow to finish in time)."""
from __future__ import annotations

import json
import time
import uuid

import stomp

from vmhost.cli import client as cli
from vmhost.client import Client
from vmhost.testing.waiting import wait_for

REPLIES = "replies"


class Collector(stomp.ConnectionListener):
    def __init__(self):
        self.frames: list = []

    def on_message(self, frame) -> None:
        self.frames.append(frame)

    def wait(self, condition, timeout: float = 30):
        def found():
            for frame in list(self.frames):
                body = json.loads(frame.body)
                if condition(frame.headers["destination"], body):
                    return body
            return None
        return wait_for(found, timeout,
                        f"a matching frame; got {[f.body[:200] for f in self.frames]}")


def test_vdsm_verbs_and_vm_status_events_over_stomp(env):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    conn = stomp.Connection12([("127.0.0.1", env.agent.port)], heartbeats=(0, 5000))
    listener = Collector()
    conn.set_listener("c", listener)
    conn.connect(wait=True)
    try:
        conn.subscribe(REPLIES, id="r")
        conn.subscribe("jms.queue.events", id="e", headers={"receipt": "events"})
        batch = [{"jsonrpc": "2.0", "id": "list", "method": "Host.getVMList", "params": {}},
                 {"jsonrpc": "2.0", "id": "stats", "method": "VM.getStats",
                  "params": {"vmID": vm}},
                 {"jsonrpc": "2.0", "id": "ping2", "method": "Host.ping2", "params": {}}]
        conn.send("jms.topic.vdsm_requests", json.dumps(batch), headers={"reply-to": REPLIES})
        answer = listener.wait(lambda dest, body: dest == REPLIES)
        by_id = {a["id"]: a for a in answer}
        assert vm in [entry["vmId"] for entry in by_id["list"]["result"]]
        assert by_id["stats"]["result"][0]["status"] == "Up"
        assert by_id["ping2"]["result"] is True

        env.call("VM.pause", vmID=vm)
        event = listener.wait(lambda dest, body: dest == "jms.queue.events"
                              and body.get("method") == f"|virt|VM_status|{vm}"
                              and body["params"][vm]["status"] == "Paused")
        assert isinstance(event["params"]["notify_time"], int)
        env.call("VM.cont", vmID=vm)
        listener.wait(lambda dest, body: dest == "jms.queue.events"
                      and body.get("method") == f"|virt|VM_status|{vm}"
                      and body["params"][vm]["status"] == "Up")
    finally:
        conn.disconnect()


def test_cli_merge_wait_over_stomp_is_woken_by_events(env, capsys, monkeypatch):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    top = env.snapshot(vm, img, base)
    url = f"stomp://127.0.0.1:{env.agent.port}"
    # Polling alone would notice the end only after two minutes.
    monkeypatch.setattr(cli, "PROGRESS_INTERVAL", 120.0)
    monkeypatch.setattr(cli, "POLL_INTERVAL", 120.0)
    drive = json.dumps({"domainID": env.sd, "imageID": img, "volumeID": top})
    job = str(uuid.uuid4())
    with Client(url, timeout=30).events(timeout=60) as stream:
        started = time.monotonic()
        code = cli.main(["--url", url, "VM", "merge", f"vmID={vm}", f"drive={drive}",
                         f"baseVolUUID={base}", f"topVolUUID={top}", f"jobUUID={job}", "--wait"])
        took = time.monotonic() - started
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out) == {"jobUUID": job, "state": "done"}
        assert took < 60, f"--wait took {took:.0f}s: it was not woken by the job's events"
        # The same events, read over STOMP by the client library, in order.
        states = []
        for event in stream:
            if event["event"] == "job" and event["jobId"] == job:
                states.append(event["to"])
                if event["to"] == "DONE":
                    break
        assert states[0] == "STARTING" and states[-1] == "DONE", states
    assert env.assert_four_views(vm, img) == [base]
