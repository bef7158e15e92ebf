"""The recovery thread survives an unexpected error: it retries, and the API
leaves 99 once recovery gets through (no libvirtd needed: the seams are faked)."""
from __future__ import annotations

import threading

from vmhost import agent as agent_mod
from vmhost.agent import Agent
from vmhost.backoff import thread_errors
from vmhost.config import Config


def test_recovery_retries_after_an_unexpected_error(tmp_path, monkeypatch):
    agent = Agent(Config(listen="127.0.0.1:0", state_dir=str(tmp_path / "state")))
    monkeypatch.setattr(agent.connection, "get", lambda: object())
    monkeypatch.setattr(agent_mod, "detect_virt_type", lambda conn: "qemu")
    attempts = []

    def recover():
        attempts.append(1)
        if len(attempts) == 1:
            raise KeyError("a bug in recovery")
        return 0
    monkeypatch.setattr(agent.recovery, "recover", recover)
    before = thread_errors.get("recovery")
    thread = threading.Thread(target=agent._recover, daemon=True)
    thread.start()
    try:
        assert agent.wait_ready(10), "recovery died: the API would answer 99 for good"
        assert len(attempts) == 2 and thread_errors.get("recovery") == before + 1
    finally:
        agent.stop()        # also closes the listening socket
        thread.join(10)
