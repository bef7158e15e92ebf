"""Active merges of several VMs at once on real libvirt: with pivot_slots = 1
no two guests are paused for a pivot at the same time (libvirt's own
lifecycle events say when each guest is paused and resumed), and every merge
ends DONE with the guest's data intact."""
from __future__ import annotations

import os
import threading

import libvirt

from conftest import VM_PREFIX, chain_with_data, wait_for
from vmhost.testing.agentproc import AgentProcess


class PauseWatch:
    """Suspended/resumed events of our test domains, from a connection of its own."""

    def __init__(self):
        libvirt.virEventRegisterDefaultImpl()   # before the connection is opened
        self.conn = libvirt.open("qemu:///system")
        self.lock = threading.Lock()
        self.paused: set[str] = set()
        self.max_paused = 0
        self.pauses: dict[str, int] = {}
        self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                         self._on_event, None)
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def _on_event(self, conn, dom, event, detail, opaque) -> None:
        name = dom.name()
        if not name.startswith(VM_PREFIX):
            return
        with self.lock:
            if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
                self.paused.add(name)
                self.pauses[name] = self.pauses.get(name, 0) + 1
                self.max_paused = max(self.max_paused, len(self.paused))
            elif event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
                self.paused.discard(name)


def test_one_pivot_slot_pauses_one_guest_at_a_time(env, workdir):
    config = os.path.join(workdir, "slots.toml")
    with open(config, "w") as f:
        f.write("pivot_slots = 1\n")
    env.agent.stop()
    env.agent = AgentProcess(env.agent.state_dir, extra_args=[
        "--monitor-interval", "0.5", "--final-job-ttl", "0", "--config", config]).start()
    env.agent.wait_ready()
    vms = [chain_with_data(env, workdir, data_mib=8) for _ in range(3)]
    watch = PauseWatch()
    jobs = []
    for vm, img, (base, mid, leaf), _ in vms:      # active merges: mid <- leaf, into mid
        jobs.append(env.call("VM.merge", vmID=vm, drive={"domainID": env.sd, "imageID": img,
                                                         "volumeID": leaf},
                             baseVolUUID=mid, topVolUUID=leaf))
    for (vm, img, (base, mid, leaf), guest), job in zip(vms, jobs):
        assert env.job_outcome(vm, job)["state"] == "DONE"
        assert env.assert_four_views(vm, img) == [base, mid]
        guest.assert_intact(img)
    wait_for(lambda: len(watch.pauses) == 3 and not watch.paused, 10,
             "each guest paused for its pivot and running again")
    assert watch.max_paused == 1, watch.pauses
    assert all(n == 1 for n in watch.pauses.values()), watch.pauses
