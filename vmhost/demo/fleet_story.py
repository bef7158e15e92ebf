"""The story `make demo-fleet` tells: the scenario vmhost was born from, on a
lab of two hosts (vmhost lab) sharing one posixfs storage domain.

1. the lab: two hosts, each with its own libvirtd, sanlock daemon and agent;
2. host1 runs a VM whose disk is a chain base <- snap1 <- snap2, with guest
   data in every layer; host2 cannot start it (host1's QEMU holds its lease);
3. an active merge (snap2 into snap1) starts, and host1 loses power in the
   middle of the copy (`vmhost lab poweroff host1`);
4. the engine's path on host2 (vmhost.testing.fleet.engine_start): VM.create
   with the chain it knew, retried until host1's VM lease expires; if the leaf
   is ILLEGAL, Image.reconcileVolumeChain and a create on the leaf it returns;
   VM.getStats shows no block job; VM.synchronizeDisks; Host.getVMFullList;
5. the four views of the chain on host2 agree and every guest write reads back;
6. how long the failover took, and why.

Each claim is a check; any failed check makes the exit status 1.
"""
from __future__ import annotations

import time

from vmhost.client import Client, RpcError
from vmhost.demo import views
from vmhost.demo.fleet_stage import FleetStage
from vmhost.demo.report import Report
from vmhost.demo.story import copying, percent, views_agree_and_data_reads_back, write
from vmhost.errors import AcquireLockFailure
from vmhost.storage.sanlock_adapter import host_dead_seconds
from vmhost.testing import chains, guestio
from vmhost.testing.fleet import answers, engine_start
from vmhost.testing.waiting import wait_for

BANDWIDTH = 1        # MiB/s: the merge copies for a while, host1 dies in the middle of it
RESTART_TIMEOUT = 240


def lab(stage: FleetStage, r: Report) -> None:
    r.section("1. a lab of two hosts sharing one storage directory")
    r.say("vmhost lab up --hosts 2: each host in its own namespaces, as if on its own machine")
    for h in stage.up():
        r.say(f"{h['name']}: its own libvirtd, sanlock daemon and vmhost agent "
              f"(sanlock host id {h['hostId']}, {h['url']})")
    r.say(f"storage domain (posixfs) in {stage.storage_root}: created by host1, connected by "
          "host2; each host holds its host id in the domain's lockspace (a sanlock delta lease)")


def vm_on_host1(stage: FleetStage, r: Report) -> None:
    r.section("2. a VM on host1, a chain, guest data in every layer")
    stage.on("host1")
    vm = stage.vm = stage.create_vm()
    r.say(f"VM {vm.name} running on host1: 64 MiB RAM, one disk, no guest OS; its QEMU "
          "holds the VM's lease (sanlock, through libvirt)")
    write(stage, r, vm, 0x11, 0, 1)
    # The leaf gets more than QEMU copies in its first burst (16 MiB): at
    # 1 MiB/s, the merge is surely still copying when host1 dies.
    for pattern, offset, mib in ((0x22, 8, 4), (0x33, 16, 32)):
        stage.snapshot(vm)
        r.say(f"snapshot: the guest now writes into {vm.label(vm.chain[-1])} "
              f"(chain {vm.names(vm.chain)})")
        write(stage, r, vm, pattern, offset, mib)
    guestio.qemu_io(stage.dom(vm), "vda", "flush")
    with Client(stage.url("host2"), timeout=60) as c:
        try:
            c.call("VM.create", vmID=vm.id, vmParams=stage.vm_params(vm))
            refused = None
        except RpcError as err:
            refused = err
        left = c.call("Host.getVMList")
    r.check(refused is not None and refused.code == AcquireLockFailure.code and left == [],
            "host2 cannot start the VM while host1 runs it: VM.create refused (651, the lease "
            "is held by another host), nothing started on host2",
            f"{refused or 'host2 started it'}; host2 runs {left}")


def power_cut(stage: FleetStage, r: Report) -> None:
    r.section("3. an active merge, and host1 loses power in the middle of it")
    vm = stage.vm
    base, top = vm.chain[-2], vm.chain[-1]
    job = stage.merge(vm, base, top, bandwidth=BANDWIDTH)
    r.say(f"active merge (VM.merge): the leaf {vm.label(top)} into {vm.label(base)}, slowed to "
          f"{BANDWIDTH} MiB/s; at the end QEMU would pivot to {vm.label(base)}")
    entry = wait_for(lambda: copying(stage.vm_jobs(vm).get(job)), 30, "the merge to copy")
    write(stage, r, vm, 0x44, 64, 1)
    guestio.qemu_io(stage.dom(vm), "vda", "flush")
    r.say("the guest's writes are flushed: each one was acknowledged to the guest")
    stage.poweroff("host1")
    stage.cut = time.monotonic()
    r.say(f"vmhost lab poweroff host1 at {percent(entry)}% of the copy: every process of host1 "
          "(QEMU, libvirtd, sanlock, the agent) killed at once")
    r.check(not answers(stage.url("host1")), "host1 is gone: its agent does not answer")


def engine_path(stage: FleetStage, r: Report) -> None:
    r.section("4. the engine restarts the VM on host2")
    vm = stage.vm
    stage.knew = list(vm.chain)
    r.say(f"the engine knows the chain from before the merge: {vm.names(vm.chain)}; "
          "it calls VM.create on host2 until host1's lease is free")
    restart = engine_start(stage.url("host2"), vm.id, stage.vm_params(vm), stage.sd, vm.img,
                           RESTART_TIMEOUT, say=r.say, label=vm.label)
    stage.failover = time.monotonic() - stage.cut
    if restart.reconciled:
        vm.chain = list(restart.reconciled)
    r.check(restart.refusals > 0, f"host1's lease kept host2 out: {restart.refusals} refusals "
            "before the VM could start", "VM.create was never refused")
    stage.on("host2")
    jobs = stage.vm_jobs(vm)
    r.check(not jobs and not stage.libvirt_job_running(vm),
            "VM.getStats on host2: no block job (the merge died with host1's QEMU)", str(jobs))
    result = stage.call("VM.synchronizeDisks", vmID=vm.id)["vda"]
    r.say(f"VM.synchronizeDisks: {vm.names(result['before'])}  ->  {vm.names(result['after'])} "
          f"(storage: {result['storage']})")
    vm.chain = views.agent_chain(stage, vm)
    r.say(f"Host.getVMFullList on host2: {vm.names(vm.chain)}")


def final_views(stage: FleetStage, r: Report) -> None:
    r.section("5. the four views of the chain on host2, and the guest's data")
    vm = stage.vm
    merged = stage.knew[:-1]
    r.check(vm.chain in (stage.knew, merged),
            f"the chain is the one from before the merge or the merged one: {vm.names(vm.chain)}",
            "neither")
    views_agree_and_data_reads_back(stage, r)
    img_dir = stage.image_dir(vm.img)
    illegal = [vm.label(v) for v in vm.chain
               if chains.read_metadata(img_dir, v).legality.value != "LEGAL"]
    r.check(not illegal, "no volume of the chain is ILLEGAL", ", ".join(illegal))


def failover_time(stage: FleetStage, r: Report) -> None:
    r.section("6. how long the failover took, and why")
    io, took = stage.io_timeout, stage.failover
    dead = host_dead_seconds(io)
    r.say(f"from the power cut to the VM running on host2: {took:.1f}s")
    r.say("host2 may run the VM only once host1's VM lease is free; sanlock frees the leases of "
          f"a host that stopped renewing its delta lease after host_dead_seconds = "
          f"8 x io_timeout + 60 = 8 x {io} + 60 = {dead}s")
    r.say(f"io_timeout is {io}s on lab hosts ({host_dead_seconds(10)}s with the default 10s); "
          "the 60s are the watchdog's fire timeout, waited for even without a watchdog; "
          "only fencing (power management) could end the wait sooner")
    r.say(f"beyond host_dead_seconds: {took - dead:+.1f}s (host1's last renewal came up to "
          f"{2 * io}s before the cut; then VM.create starts QEMU)")
    # The last renewal came up to 2 io_timeouts before the cut.
    r.check(dead - 2 * io - 1 <= took <= dead + 30,
            f"the failover waited for the lease: {took:.0f}s, about host_dead_seconds ({dead}s)",
            f"expected {dead - 2 * io - 1}-{dead + 30}s")


STEPS = [("step 1 (lab)", lab),
         ("step 2 (VM on host1)", vm_on_host1),
         ("step 3 (power cut)", power_cut),
         ("step 4 (engine's path)", engine_path),
         ("step 5 (views)", final_views),
         ("step 6 (failover time)", failover_time)]
