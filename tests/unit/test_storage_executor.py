"""The per-domain bounded executor and the storage deadlines built on it:
a hung operation costs one worker of its domain, fails its caller by the
deadline, turns the domain INVALID, and never blocks another domain."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from vmhost import errors
from vmhost.storage import executor, qemu_img
from vmhost.storage.executor import DomainExecutor, Exhausted, Timeout
from vmhost.storage.filedomain import FileStorageDomain
from vmhost.storage.service import StorageService
from vmhost.testing.waiting import wait_for

MiB = 1 << 20


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    try:
        return fn(*args, **kwargs), time.monotonic() - start
    except Exception as e:
        return e, time.monotonic() - start


# --- the executor -------------------------------------------------------------

def test_result_exception_and_remaining_deadline_reach_the_caller():
    ex = DomainExecutor("sd", workers=2)
    assert ex.run("add", lambda: 1 + 1, 5) == 2
    with pytest.raises(KeyError):
        ex.run("boom", lambda: {}["x"], 5)
    left = ex.run("remaining", executor.remaining, 5)
    assert 4 < left <= 5
    assert executor.remaining() is None      # not on a worker
    # A nested call from a worker runs inline (no deadlock with one worker).
    one = DomainExecutor("one", workers=1)
    assert one.run("outer", lambda: one.run("inner", lambda: "ok", 5), 5) == "ok"


def test_hung_operation_times_out_parks_one_worker_then_refuses_at_once():
    release = threading.Event()
    drained = threading.Event()
    ex = DomainExecutor("sd", workers=2, queue_size=4, on_drained=drained.set)
    for i in range(2):
        err, took = timed(ex.run, f"hang{i}", release.wait, 0.2)
        assert isinstance(err, Timeout) and f"hang{i} did not finish within 0.2s" in str(err)
        assert took < 1.5
    assert ex.stuck() == ["hang0", "hang1"]
    # Both workers are parked: refused at once, never queued for ever.
    err, took = timed(ex.run, "third", lambda: "never", 30)
    assert isinstance(err, Exhausted) and "all 2 storage workers are blocked" in str(err)
    assert took < 0.5
    release.set()
    assert drained.wait(5), "on_drained after the parked operations returned"
    assert ex.stuck() == []
    assert ex.run("after", lambda: "ok", 5) == "ok"


def test_an_operation_that_never_started_is_dropped_not_run_late():
    release = threading.Event()
    ran = []
    ex = DomainExecutor("sd", workers=1, queue_size=4)
    blocker = threading.Thread(target=timed, args=(ex.run, "hang", release.wait, 0.5))
    blocker.start()
    wait_for(lambda: ex.stuck() or ex._running, what="the hang to start")
    err, _ = timed(ex.run, "queued", lambda: ran.append(1), 0.2)
    assert isinstance(err, Timeout) and "did not start" in str(err)
    release.set()
    blocker.join(5)
    assert ex.run("next", lambda: "ok", 5) == "ok"
    assert ran == [], "a caller told 'failed' must not see the operation happen later"


def test_full_queue_refuses_at_once():
    release = threading.Event()
    ex = DomainExecutor("sd", workers=1, queue_size=1)
    threads = [threading.Thread(target=timed, args=(ex.run, f"op{i}", release.wait, 5))
               for i in range(2)]
    threads[0].start()
    wait_for(lambda: ex._running, what="one running")
    threads[1].start()
    wait_for(lambda: len(ex._queue) == 1, what="one queued")
    err, took = timed(ex.run, "third", lambda: None, 5)
    assert isinstance(err, Exhausted) and "already waiting" in str(err) and took < 0.5
    release.set()
    for t in threads:
        t.join(5)


def test_qemu_img_child_is_killed_at_the_operation_deadline():
    err, took = timed(qemu_img._run, ["sleep", "30"], timeout=0.2)
    assert isinstance(err, qemu_img.QemuImgTimeout) and "killed" in str(err) and took < 2
    ex = DomainExecutor("sd")
    err, _ = timed(ex.run, "sleep", lambda: qemu_img._run(["sleep", "30"]), 0.3)
    # Whichever notices first: the caller's deadline, or the child's (the same one).
    assert isinstance(err, (Timeout, qemu_img.QemuImgTimeout)), err
    # The child died with the operation's deadline: the worker is free again
    # long before the 30 s sleep would have ended.
    wait_for(lambda: not ex.stuck(), timeout=5, what="the worker to be free")


# --- the storage service --------------------------------------------------------

@pytest.fixture
def two_domains(tmp_path):
    svc = StorageService(str(tmp_path / "state"), monitor_interval=0.2, op_timeout=0.5,
                         workers=2)
    sds = []
    for name in ("hung", "fine"):
        root = tmp_path / name
        root.mkdir()
        sd = str(uuid.uuid4())
        svc.create_domain(sd, "localfs", str(root), name)
        sds.append(sd)
    changes: list[tuple[str, bool]] = []
    svc.subscribe(lambda sd, valid, reason: changes.append((sd, valid)))
    svc.start()
    wait_for(lambda: all(svc.domain_valid(sd) for sd in sds), what="both domains VALID")
    yield svc, sds[0], sds[1], changes
    svc.stop()


def test_hung_domain_fails_by_deadline_turns_invalid_and_spares_the_other(two_domains,
                                                                         monkeypatch):
    svc, hung, fine, changes = two_domains
    img, vol, img2, vol2 = (str(uuid.uuid4()) for _ in range(4))
    svc.create_volume(hung, img, vol, MiB, "COW")
    svc.create_volume(fine, img2, vol2, MiB, "COW")
    release = threading.Event()
    real_read = FileStorageDomain.read_metadata

    def read_metadata(dom, i, v):
        if dom.uuid == hung:
            release.wait()       # a read stuck in the kernel
        return real_read(dom, i, v)

    monkeypatch.setattr(FileStorageDomain, "read_metadata", read_metadata)
    for call in (lambda: svc.volume_info(hung, img, vol),
                 lambda: svc.volume_chain(sd_uuid=hung, img_uuid=img, leaf_uuid=vol)):
        err, took = timed(call)
        assert isinstance(err, errors.StorageDomainUnavailable), err
        assert err.code == 379 and hung in str(err) and "did not answer" in str(err)
        assert took < 2
    assert not svc.domain_valid(hung)
    assert (hung, False) in changes
    # Both workers are parked: the next call is refused at once.
    err, took = timed(svc.volume_info, hung, img, vol)
    assert isinstance(err, errors.StorageDomainUnavailable) and took < 0.3
    # The other domain does not notice.
    info, took = timed(svc.volume_info, fine, img2, vol2)
    assert info["uuid"] == vol2 and took < 0.5
    # Probes of the hung domain succeed (only volume metadata hangs) but it
    # stays INVALID while its operations are parked...
    since = time.monotonic()
    wait_for(lambda: svc.domain_status(hung).checked_at > since, what="a probe after the hang")
    assert not svc.domain_valid(hung)
    assert "did not answer" in svc.domain_status(hung).reason
    # ...and turns VALID once they returned.
    release.set()
    wait_for(lambda: svc.domain_valid(hung), what="the hung domain VALID again")
    assert svc.volume_info(hung, img, vol)["uuid"] == vol
