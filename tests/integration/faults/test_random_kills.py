"""SIGKILL of the agent at random moments of a merge (seeded, reproducible):
VMHOST_FAULT_ROUNDS rounds (default 50), VMHOST_FAULT_SEED (default 2026)."""
from __future__ import annotations

import os
import random
import time

import pytest

from conftest import wait_for
from scenario import build, check_converged, merge, record, restart_and_converge

pytestmark = pytest.mark.faults   # run by `make faults`, not `make test`
ROUNDS = int(os.environ.get("VMHOST_FAULT_ROUNDS", "50"))
SEED = int(os.environ.get("VMHOST_FAULT_SEED", "2026"))
KINDS = {"internal": (0, 2), "active": (1, 3), "internal-middle": (1, 2),
         "all-into-base": (0, 3)}


@pytest.mark.parametrize("round_no", range(ROUNDS))
def test_random_kill(env, workdir, round_no):
    rng = random.Random(SEED * 1000 + round_no)
    kind = rng.choice(sorted(KINDS))
    delay = rng.uniform(0.0, 0.4)
    vm, img, chain, g = build(env, workdir)
    base, top = (chain[i] for i in KINDS[kind])
    job = merge(env, vm, img, chain, base, top)
    deadline = time.monotonic() + delay
    wait_for(lambda: time.monotonic() >= deadline, 5, "the chosen moment")
    env.agent.kill9()
    seconds = restart_and_converge(env, vm, job)
    facts = check_converged(env, vm, img, chain, g, base, top, job)
    record({"scenario": "random-kill", "point": f"round {round_no}: +{delay * 1000:.0f} ms",
            "kind": kind, "outcome": "killed", "converged": True, "seconds": seconds, **facts})
