"""VMs paused by an I/O error are dealt with when their storage domain turns
VALID again, each as its resumeBehavior says (auto_resume / leave_paused / kill).

Everything is real: each VM boots a guest (tests/integration/guest_writer.py)
that writes its virtio disk for ever; the domain lives on a small loop-mounted
ext4 that a filler file has almost filled, so the guests' writes fail with
ENOSPC and QEMU (error_policy='stop') pauses them with an I/O error. The
outage is real too: an empty tmpfs over the domain's dom_md makes the
monitor's read fail (INVALID); meanwhile the filler goes, and when the tmpfs
goes the domain is VALID again and the agent acts on the paused VMs.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid

import libvirt
import pytest

import guest_writer
from conftest import Env, small_domain, storage_hidden, wait_for
from vmhost.client import RpcError, TransportError
from vmhost.storage import qemu_img

MiB = 1 << 20
INTERVAL = 0.5                 # start_agent's --monitor-interval
FS_SIZE = "96M"
ROOM_FOR_GUESTS = 8 * MiB      # what the filler leaves free: the three guests fill it
DISK_SIZE = 64 * MiB
BEHAVIORS = ("auto_resume", "leave_paused", "kill")
NO_SUCH_VM = 1


@pytest.fixture
def small_env(workdir, libvirtd):
    """A storage domain on its own small ext4 (no blocks reserved for root)."""
    with small_domain(workdir, FS_SIZE, libvirtd) as env:
        yield env


class EventLog:
    """Every event of the agent's GET /events stream, collected by a thread.
    The stream ends when the agent stops (the fixture's teardown); it is not
    closed from here: EventStream is not meant to be closed from another
    thread than the one reading it."""

    def __init__(self, env: Env):
        self.events: list[dict] = []
        self._stream = env.client.events(timeout=None)   # live when this returns
        self._thread = threading.Thread(target=self._read, daemon=True, name="events")
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                self.events.append(event)
        except TransportError:
            pass  # closed under us, or the agent stopped

    def first(self, after: int = 0, **fields) -> int | None:
        """Index of the first event after index `after` with these fields."""
        for i, event in enumerate(list(self.events)[after:], start=after):
            if all(event.get(k) == v for k, v in fields.items()):
                return i
        return None

    def wait(self, after: int, timeout: float, what: str, **fields) -> int:
        """Wait for such an event after index `after`; its index."""
        found: list[int] = []

        def seen() -> bool:
            i = self.first(after, **fields)
            if i is not None:
                found.append(i)
            return i is not None

        wait_for(seen, timeout, what)
        return found[-1]

    def all(self, after: int = 0, **fields) -> list[dict]:
        return [e for e in list(self.events)[after:]
                if all(e.get(k) == v for k, v in fields.items())]


def stats(env: Env, vm: str) -> dict:
    return env.call("VM.getStats", vmID=vm)[0]


def paused_by_eio(env: Env, vm: str) -> bool:
    s = stats(env, vm)
    return s["status"] == "Paused" and s["pauseCode"] == "EIO"


def libvirt_paused_by_ioerror(env: Env, vm: str) -> bool:
    return env.dom(vm).state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR]


def gone(env: Env, vm: str) -> bool:
    try:
        stats(env, vm)
    except RpcError as e:
        assert e.code == NO_SUCH_VM, e
        return True
    return False


def domain_stats(env: Env) -> dict:
    return env.call("Host.getStorageRepoStats", domains=[env.sd])[env.sd]


def checked_after(env: Env, moment: float) -> bool:
    """The domain monitor finished a check after `moment` (time.monotonic()).
    lastCheck is the check's age in seconds, rounded to 0.1: timed from before
    the call, the estimate is at most 0.05 s late; 0.1 s keeps it early."""
    now = time.monotonic()
    age = float(domain_stats(env)["lastCheck"])
    return age >= 0 and now - age - 0.1 > moment


def actual_size(path: str) -> int:
    return qemu_img.info(path)["actual-size"]         # -U: the VM may be running


def describe(env: Env, vms: dict[str, str], path: dict[str, str]) -> dict:
    """What each VM looks like, for a failure message."""
    out = {}
    for b, vm in vms.items():
        dom = env.dom(vm)
        out[b] = {"agent": stats(env, vm), "libvirt": dom.state(), "errors": dom.diskErrors(),
                  "blockStats": dom.blockStats("vda"), "actual-size": actual_size(path[b])}
    st = os.statvfs(env.storage_root)
    out["free"] = st.f_bavail * st.f_frsize
    return out


def test_eio_paused_vms_follow_their_resume_behavior_when_the_domain_turns_valid(
        small_env):
    env = small_env
    root = env.storage_root

    # Three writer guests on the domain, one per resumeBehavior.
    disks = {}
    for behavior in BEHAVIORS:
        img = str(uuid.uuid4())
        vol = env.create_volume(img, size=DISK_SIZE)
        guest_writer.install(os.path.join(env.image_dir(img), vol))
        disks[behavior] = (img, vol)
    path = {b: os.path.join(env.image_dir(img), vol) for b, (img, vol) in disks.items()}

    # Leave the guests ROOM_FOR_GUESTS of free space, less than they write.
    filler = os.path.join(root, "filler")
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize
    assert free > ROOM_FOR_GUESTS + 32 * MiB, f"the test file system is too small: {free}"
    subprocess.run(["fallocate", "-l", str(free - ROOM_FOR_GUESTS), filler], check=True)

    log = EventLog(env)
    vms = {b: env.create_vm([disks[b]], resumeBehavior=b) for b in BEHAVIORS}
    infos = {i["vmId"]: i for i in env.call("Host.getVMFullList", vmList=list(vms.values()))}
    assert {b: infos[vm]["resumeBehavior"] for b, vm in vms.items()} == \
        {b: b for b in BEHAVIORS}

    # 1. The guests fill the file system and QEMU pauses each on ENOSPC.
    try:
        wait_for(lambda: all(paused_by_eio(env, vm) for vm in vms.values()), 45,
                 "the three VMs to pause with EIO")
    except AssertionError as e:
        raise AssertionError(f"{e}: {describe(env, vms, path)}") from None
    for b, vm in vms.items():
        assert libvirt_paused_by_ioerror(env, vm), (b, env.dom(vm).state())
        assert env.dom(vm).diskErrors() == {"vda": libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE}, b
        # The guest really wrote (its pattern is right after the boot sector).
        assert guest_writer.written_bytes_at(
            path[b], guest_writer.FIRST_LBA * guest_writer.SECTOR), b
    assert domain_stats(env)["valid"] is True     # ENOSPC is not an outage
    paused_size = actual_size(path["auto_resume"])

    # 2. A real outage: the monitor's probe path disappears.
    with storage_hidden(os.path.join(root, env.sd, "dom_md")):
        wait_for(lambda: domain_stats(env)["valid"] is False, 10, "the domain to be INVALID")
        invalid = log.wait(0, 5, "the INVALID event", event="domain", domainID=env.sd,
                           status="INVALID")
        os.unlink(filler)                           # the space is back...
        assert all(paused_by_eio(env, vm) for vm in vms.values())  # ...nobody moved yet
    # The tmpfs is gone: the probe path is back.
    wait_for(lambda: domain_stats(env)["valid"] is True, 10, "the domain to be VALID")
    t_valid = time.monotonic()
    valid = log.wait(invalid, 5, "the VALID event", event="domain", domainID=env.sd,
                     status="VALID")

    # auto_resume: resumed after VALID; kill: destroyed.
    log.wait(valid, 15, "the auto_resume VM to be resumed", event="vm",
             vmId=vms["auto_resume"], status="Up")
    wait_for(lambda: gone(env, vms["kill"]), 15, "the kill VM to be gone")
    # leave_paused: a few monitor checks after VALID and after the
    # resume pass ended, it is still paused by the I/O error.
    settled = time.monotonic()
    wait_for(lambda: checked_after(env, max(t_valid + 3 * INTERVAL, settled)), 10,
             "more domain checks after VALID")
    leave = vms["leave_paused"]
    assert paused_by_eio(env, leave), stats(env, leave)
    assert libvirt_paused_by_ioerror(env, leave), env.dom(leave).state()
    assert log.all(invalid, event="vm", vmId=leave) == [], "leave_paused VM was touched"

    # kill: no VM in the agent, no domain in libvirt.
    with pytest.raises(libvirt.libvirtError) as no_domain:
        env.dom(vms["kill"])
    assert no_domain.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    assert vms["kill"] not in env.call("Host.getVMList", onlyUUID=True)

    # auto_resume: the guest runs on and writes (the space is back).
    wait_for(lambda: actual_size(path["auto_resume"]) > paused_size + 4 * MiB, 15,
             "the resumed guest to write on")
    assert domain_stats(env)["valid"] is True
