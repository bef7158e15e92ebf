"""vmhost-client's merge commands on the real stack (agent, libvirtd, QEMU):
`VM merge --wait` for an internal merge, then `snapshot remove` of the leaf,
with the job transitions read from GET /events while they run."""
from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from conftest import Guest
from vmhost.cli import client as cli
from vmhost.client import Client, EventStream

MiB = 1 << 20
TERMINAL = {"DONE", "ABORTED", "FAILED"}


def job_transitions(stream: EventStream, deadline: float, job: str | None = None) -> \
        tuple[str, list[tuple[str | None, str]]]:
    """(job id, [(from, to), ...]) of one job's events up to its end: the
    job named, or else the first one that starts on the stream."""
    seen: list[tuple[str | None, str]] = []
    seqs: list[int] = []
    for event in stream:
        assert time.monotonic() < deadline, f"job {job} did not end in time: {seen}"
        if event["event"] != "job" or (job is not None and event["jobId"] != job):
            continue
        job = event["jobId"]
        seen.append((event["from"], event["to"]))
        seqs.append(event["seq"])
        if event["to"] in TERMINAL:
            assert seqs == sorted(seqs)
            return job, seen
    raise AssertionError(f"the event stream ended before job {job} did: {seen}")


def assert_chained(transitions: list[tuple[str | None, str]]) -> list[str]:
    """Each transition starts where the one before ended; returns the states."""
    states = [to for _, to in transitions]
    assert [frm for frm, _ in transitions] == [None] + states[:-1], transitions
    return states


def test_cli_internal_merge_then_snapshot_remove_of_the_leaf(env, workdir, capsys):
    img = str(uuid.uuid4())
    base = env.create_volume(img)
    vm = env.create_vm([(img, base)])
    guest = Guest(env, vm, workdir)
    guest.write(0x11, 0, 2 * MiB)
    mid = env.snapshot(vm, img, base)
    guest.write(0x22, 4 * MiB, 2 * MiB)
    guest.write(0x2a, 0, 256 * 1024)
    top = env.snapshot(vm, img, mid)
    guest.write(0x33, 8 * MiB, 2 * MiB)
    assert env.assert_four_views(vm, img) == [base, mid, top]
    url = env.agent.url

    with Client(url).events(timeout=60) as stream:
        # Internal merge: mid into base, through the CLI, waiting for the end.
        job = str(uuid.uuid4())
        drive = json.dumps({"domainID": env.sd, "imageID": img, "volumeID": top})
        code = cli.main(["--url", url, "VM", "merge", f"vmID={vm}", f"drive={drive}",
                         f"baseVolUUID={base}", f"topVolUUID={mid}", f"jobUUID={job}", "--wait"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out) == {"jobUUID": job, "state": "done"}
        assert "%  " in err and err.endswith("\n")  # the progress bar drew and ended its line
        assert env.assert_four_views(vm, img) == [base, top]
        assert env.call("Volume.getInfo", storagedomainID=env.sd, imageID=img,
                        volumeID=mid)["legality"] == "ILLEGAL"
        guest.assert_intact(img)

        # The stream saw the whole internal job, in order.
        deadline = time.monotonic() + 60
        _, transitions = job_transitions(stream, deadline, job)
        assert assert_chained(transitions) == ["STARTING", "COMMIT", "CLEANUP", "DONE"]

        # snapshot remove of the leaf: an active merge into its parent, then delete.
        code = cli.main(["--url", url, "snapshot", "remove", f"vmID={vm}", f"imageID={img}",
                         f"volumeID={top}"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out) == [base]
        assert env.assert_four_views(vm, img) == [base]
        assert not os.path.exists(os.path.join(env.image_dir(img), top))
        assert not os.path.exists(os.path.join(env.image_dir(img), top + ".meta"))
        assert top not in env.call("StorageDomain.getVolumes", storagedomainID=env.sd, imageID=img)
        guest.assert_intact(img)

        # The active job went through the pivot, in order.
        active_job, transitions = job_transitions(stream, time.monotonic() + 60)
        assert active_job != job
        states = assert_chained(transitions)
        assert states[:4] == ["STARTING", "COMMIT", "READY", "PIVOT"]
        assert states[-2:] == ["CLEANUP", "DONE"]

    # The base cannot be removed: refused before anything is started.
    with pytest.raises(SystemExit) as refused:
        cli.main(["--url", url, "snapshot", "remove", f"vmID={vm}", f"imageID={img}",
                  f"volumeID={base}"])
    assert refused.value.code == 2
    assert "cannot be removed" in capsys.readouterr().err
    assert env.vm_jobs(vm) == {}
    assert env.assert_four_views(vm, img) == [base]
