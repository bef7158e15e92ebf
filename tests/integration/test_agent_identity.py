"""The agent identity on the real stack: with a VM running, an agent whose
host-id file is lost refuses to start (non-zero exit, a message naming the
file and the way out) instead of making a new id that would ignore the VM;
restoring the file, or --adopt-identity, brings the VM back under it."""
from __future__ import annotations

import os
import uuid

from vmhost.testing.agentproc import AgentProcess

REFUSED = 3   # vmhost.cli.main.EXIT_IDENTITY


def _start(state_dir: str, *extra: str) -> AgentProcess:
    return AgentProcess(state_dir, extra_args=["--monitor-interval", "0.5", *extra]).start()


def _refused(state_dir: str) -> str:
    """Start an agent that must refuse; its output."""
    agent = _start(state_dir)
    try:
        assert agent.proc.wait(60) == REFUSED
    finally:
        agent.stop()
    with open(agent.log_path, errors="replace") as f:
        return f.read()


def test_lost_identity_with_a_running_vm_refuses_then_restore_or_adopt(env, workdir):
    img = str(uuid.uuid4())
    vm = env.create_vm([(img, env.create_volume(img))])
    state_dir = env.agent.state_dir
    id_path = os.path.join(state_dir, "host-id")
    with open(id_path) as f:
        agent_id = f.read().strip()
    env.agent.stop()

    # Lost: the restart refuses, says which file, whose VM and what to do.
    os.rename(id_path, id_path + ".saved")
    log = _refused(state_dir)
    for words in (id_path, "missing", agent_id, f"--adopt-identity {agent_id}", vm[:8]):
        assert words in log, log[-2000:]
    assert not os.path.exists(id_path), "a new identity was made"
    assert env.dom(vm).isActive()

    # Damaged: refused too, never replaced.
    with open(id_path, "w") as f:
        f.write("not an id\n")
    log = _refused(state_dir)
    assert "does not hold an agent id" in log and id_path in log, log[-2000:]
    with open(id_path) as f:
        assert f.read() == "not an id\n"

    # Restored from the backup: the VM is recovered.
    os.replace(id_path + ".saved", id_path)
    env.agent = _start(state_dir)
    env.agent.wait_ready()
    assert vm in env.call("Host.getVMList", onlyUUID=True)
    env.agent.stop()

    # Lost again, taken over with --adopt-identity: recovered, and the file is back.
    os.unlink(id_path)
    env.agent = _start(state_dir, "--adopt-identity", agent_id)
    env.agent.wait_ready()
    assert vm in env.call("Host.getVMList", onlyUUID=True)
    with open(id_path) as f:
        assert f.read().strip() == agent_id
    assert env.call("VM.getStats", vmID=vm)[0]["status"] == "Up"
