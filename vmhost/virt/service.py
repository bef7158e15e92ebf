"""The VM service, the facade the API calls: create, control, report and
snapshot VMs, and hand merges and disk synchronization to their job modules.

Its VMs live in the registry (virt/registry.py), which it shares with
recovery (virt/recovery.py), the libvirt event handlers (virt/events.py) and
the EIO resume policy (virt/eio.py); those are wired by the agent.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import libvirt

from vmhost import errors, failpoints
from vmhost.ids import check_uuid
from vmhost.jobs.store import VmJobStore
from vmhost.refs import PreparedImage, PreparedLeaf
from vmhost.scheduler import DONE, Retry, Scheduler
from vmhost.storage.repairs import Repairs
from vmhost.virt import domxml
from vmhost.virt.disksync import DiskSynchronizer
from vmhost.virt.jobhistory import JobHistory
from vmhost.virt.merge import MergeConfig, Merger
from vmhost.virt.registry import VmRegistry
from vmhost.virt.snapshot import SNAPSHOT_FLAGS, SnapshotJob, SnapshotTarget, snapshot_xml
from vmhost.virt.vm import DOWN, PAUSED, UP, Vm, status_from_state
from vmhost.virt.vmdef import RESUME_BEHAVIORS, Drive, VmDefinition

log = logging.getLogger(__name__)

DRIVE_NAMES = [f"vd{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


class ImagePreparer(Protocol):
    def prepare_image(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                      allow_illegal: bool = False) -> PreparedImage: ...
    def prepare_leaf(self, sd_uuid: str, img_uuid: str, leaf_uuid: str) -> PreparedLeaf: ...


class VmService:
    def __init__(self, conn: Callable[[], libvirt.virConnect], storage: ImagePreparer,
                 virt_type: str, scheduler: Scheduler, merge_config: MergeConfig | None = None,
                 publish: Callable[[dict], None] = lambda event: None, host_id: str = "",
                 history: JobHistory | None = None, repairs: Repairs | None = None,
                 registry: VmRegistry | None = None):
        self._conn = conn
        self.host_id = host_id
        self._storage = storage
        self.virt_type = virt_type
        self.registry = registry if registry is not None else VmRegistry()
        self.merger = Merger(storage, scheduler, self.registry.get,
                             domain_of=lambda vm: vm.domain(self._conn()),
                             persist=lambda vm: vm.persist(self._conn()),
                             config=merge_config, publish=publish, history=history,
                             repairs=repairs)
        self.disksync = DiskSynchronizer(storage, scheduler, self.registry.get,
                                         xml_of=lambda vm: vm.domain(self._conn()).XMLDesc(0),
                                         persist=lambda vm: vm.persist(self._conn()),
                                         busy=self.merger.busy_drives, repairs=repairs)
        self.snapshots: VmJobStore[SnapshotJob] = VmJobStore(
            SnapshotJob, persist=lambda vm: vm.persist(self._conn()), field="agent_jobs")
        self._scheduler = scheduler

    # --- lookup -----------------------------------------------------------

    def _vm(self, vm_id: str) -> Vm:
        return self.registry.find(vm_id)

    def vms(self) -> list[Vm]:
        return self.registry.all()

    def volume_in_use(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> bool:
        """Whether a VM of this host may be using the volume. A drive whose
        chain is not known to be current (a snapshot whose libvirt call failed
        half-way) counts as using every volume of its image."""
        for vm in self.vms():
            if vm.status == DOWN:
                continue
            if vm.uses_volume(sd_uuid, img_uuid, vol_uuid):
                return True
            stale = vm.stale_drives
            if stale and any(d.name in stale and d.domain == sd_uuid and d.image == img_uuid
                             for d in vm.definition.drives):
                raise errors.VolumeIsBusy(
                    f"the chain of VM {vm.id}'s drive on image {img_uuid} is not known to be "
                    "current (a snapshot failed half-way); try again once it is re-read")
        return False

    # --- life cycle -------------------------------------------------------

    def create(self, vm_id: str, vm_params: dict) -> dict:
        check_uuid(vm_id, "vmID")
        definition = self._definition(vm_id, vm_params)
        allow_illegal = bool(vm_params.get("allowIllegal", False))
        vm = Vm(definition, status="WaitForLaunch")
        vm.jobs_known = True
        self.registry.reserve(vm)      # a concurrent create of the same VM fails fast
        try:
            # Storage first, outside the VM lock (a hung domain fails by its deadline).
            self._prepare_drives(definition, vm_params["devices"], allow_illegal)
            leases = self._leases(definition, vm_params["devices"])
            with vm.lock:
                self._start(vm, leases)
        except BaseException:
            self.registry.remove(vm_id)
            raise
        return vm.full_info()

    def _definition(self, vm_id: str, params: dict) -> VmDefinition:
        disks = [d for d in params.get("devices", []) if d.get("device") == "disk"]
        if len(disks) > len(DRIVE_NAMES):
            raise errors.InvalidParameter(f"at most {len(DRIVE_NAMES)} disks are supported")
        seen = set()
        for i, d in enumerate(disks):
            for key in ("domainID", "imageID", "volumeID"):
                check_uuid(d.get(key), f"vmParams.devices[{i}].{key}")
            if (d["domainID"], d["imageID"]) in seen:
                raise errors.InvalidParameter(f"image {d['imageID']} is listed twice")
            seen.add((d["domainID"], d["imageID"]))
        behavior = params.get("resumeBehavior", "auto_resume")
        if behavior not in RESUME_BEHAVIORS:
            raise errors.InvalidParameter(f"resumeBehavior must be one of {RESUME_BEHAVIORS}")
        return VmDefinition(vm_id=vm_id, name=params["vmName"], mem_mib=int(params["memSize"]),
                            drives=[], resume_behavior=behavior, host_id=self.host_id)

    def _prepare_drives(self, definition: VmDefinition, devices: list[dict],
                        allow_illegal: bool) -> None:
        disks = [d for d in devices if d.get("device") == "disk"]
        for name, d in zip(DRIVE_NAMES, disks):
            prepared = self._storage.prepare_image(d["domainID"], d["imageID"], d["volumeID"],
                                                   allow_illegal=allow_illegal)
            definition.drives.append(Drive(name=name, domain=d["domainID"], image=d["imageID"],
                                           chain=list(prepared.chain), format=prepared.format))

    def _leases(self, definition: VmDefinition, devices: list[dict]) -> tuple[domxml.LeaseSpec, ...]:
        """The VM's leases: its lease devices (VDSM's {"device": "lease", "sd_id", "lease_id"},
        created beforehand with Lease.create), or else, when a disk is on a shared domain,
        a lease keyed by the VM's UUID on the first such domain; and the lease of each
        image on a shared domain (created if missing)."""
        wanted = []
        for i, d in enumerate(x for x in devices if x.get("device") == "lease"):
            wanted.append((check_uuid(d.get("sd_id"), f"vmParams lease device {i}: sd_id"),
                           check_uuid(d.get("lease_id"), f"vmParams lease device {i}: lease_id"),
                           self._storage.lease_info))
        shared = [dr for dr in definition.drives if self._storage.is_shared(dr.domain)]
        if not wanted and shared:
            wanted.append((shared[0].domain, definition.vm_id, self._storage.create_lease))
        # And each image's lease: no other host changes the image while the VM runs.
        wanted += [(dr.domain, dr.image, self._storage.create_lease) for dr in shared]
        infos = [lookup(sd, lease_id) for sd, lease_id, lookup in wanted]
        for info in infos:     # fail fast rather than wait in libvirt for a dead host's expiry
            self._storage.check_lease_free(info["sd_id"], info["lease_id"], info["offset"])
        return tuple(domxml.LeaseSpec(i["sd_id"], i["lease_id"], i["path"], i["offset"])
                     for i in infos)

    def _start(self, vm: Vm, leases: tuple[domxml.LeaseSpec, ...] = ()) -> None:
        d = vm.definition
        xml = domxml.build(
            d.vm_id, d.name, d.mem_mib, self.virt_type,
            [domxml.DiskSpec(dr.name, dr.path, dr.format) for dr in d.drives],
            domxml.metadata_element(d.to_json()), leases)
        try:
            dom = self._conn().createXML(xml, 0)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_RESOURCE_BUSY and leases:
                # libvirt's sanlock driver: the VM runs (or its lease is held) elsewhere.
                raise errors.AcquireLockFailure(
                    f"VM {d.vm_id}: its lease is held by another host: {e}") from None
            if "already exists" in str(e):
                raise errors.VMExists(f"libvirt refused VM {d.vm_id}: {e}") from None
            raise errors.GeneralError(f"libvirt could not start VM {d.vm_id}: {e}") from None
        vm.status, vm.pause_code = status_from_state(*dom.state())
        log.info("VM %s (%s) started", d.vm_id, d.name)

    def destroy(self, vm_id: str) -> None:
        vm = self._vm(vm_id)
        with vm.lock:
            try:
                vm.domain(self._conn()).destroy()
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise errors.GeneralError(f"destroy of VM {vm_id} failed: {e}") from None
            vm.status = DOWN
            self.merger.vm_gone(vm)
            self.registry.remove(vm_id)
        log.info("VM %s destroyed", vm_id)

    def pause(self, vm_id: str) -> None:
        self._control(vm_id, "suspend", PAUSED)

    def cont(self, vm_id: str) -> None:
        self._control(vm_id, "resume", UP)

    def _control(self, vm_id: str, op: str, status: str) -> None:
        vm = self._vm(vm_id)
        with vm.lock:
            if vm.status == DOWN:
                raise errors.GeneralError(f"VM {vm_id} is down")
            holder = self.merger.paused_by_job(vm) if status == UP else None
            if holder:
                # Resuming before the pivot marker is written could lose writes.
                raise errors.GeneralError(f"VM {vm_id} is paused for the pivot of merge job "
                                          f"{holder}; it resumes by itself when the pivot is done")
            dom = vm.domain(self._conn())
            try:
                # Ask libvirt, not the cache: pause and cont are idempotent.
                vm.status, vm.pause_code = status_from_state(*dom.state())
                if vm.status == status:
                    return
                getattr(dom, op)()
                # Read the state back rather than assume it: a VM resumed onto
                # a still-failing disk pauses again at once, and its lifecycle
                # event may already have been handled.
                vm.status, vm.pause_code = status_from_state(*dom.state())
            except libvirt.libvirtError as e:
                if op == "resume" and e.get_error_code() == libvirt.VIR_ERR_RESOURCE_BUSY:
                    # libvirt gave the VM's lease up at the pause; another host took it
                    # (and may run the VM): this QEMU must stay paused. (Or, for the
                    # moment of a storage write, this agent holds the image's lease:
                    # a merge's cleanup of a VM paused for another reason.)
                    vm.status, vm.pause_code = status_from_state(*dom.state())
                    raise errors.AcquireLockFailure(
                        f"VM {vm_id} stays paused: its lease is held by another host, or "
                        f"for a moment by this agent's storage write (try again): {e}") \
                        from None
                raise errors.GeneralError(f"{op} of VM {vm_id} failed: {e}") from None
            if vm.status == UP:
                vm.eio_aliases.clear()

    # --- reporting --------------------------------------------------------

    def get_stats(self, vm_id: str) -> list[dict]:
        return [self._stats(self._vm(vm_id))]

    def all_stats(self) -> list[dict]:
        return [self._stats(vm) for vm in self.vms()]

    def _stats(self, vm: Vm) -> dict:
        stats = vm.stats()
        if vm.jobs_known:
            stats["vmJobs"] = self.merger.job_stats(vm)
        return stats

    # --- merge ----------------------------------------------------------------

    def merge(self, vm_id: str, drive: dict, base: str, top: str, bandwidth: int = 0,
              job_id: str | None = None) -> str:
        return self.merger.merge(self._vm(vm_id), drive, base, top, bandwidth, job_id)

    def abort_merge(self, vm_id: str, job_id: str) -> dict:
        return self.merger.abort(self._vm(vm_id), job_id)

    def dismiss_job(self, vm_id: str, job_id: str) -> None:
        self.merger.dismiss(self._vm(vm_id), job_id)

    def job_history(self) -> list[dict]:
        return self.merger.history.list()

    # --- disk synchronization ---------------------------------------------------

    def synchronize_disks(self, vm_id: str) -> dict:
        vm = self._vm(vm_id)
        result = self.disksync.synchronize(vm)
        # A job record that came with the VM (from another host, or finished
        # while nobody watched) is resolved from the chain by its own step.
        if vm.definition.jobs:
            self.merger.resume(vm, vm.domain(self._conn()))
        return result

    def list(self, full_status: bool = False, vm_list: list[str] | None = None,
             only_uuid: bool = False) -> list:
        vms = self._select(vm_list)
        if only_uuid:
            return [vm.id for vm in vms]
        if full_status:
            return [vm.full_info() for vm in vms]
        return [{"vmId": vm.id, "status": vm.status} for vm in vms]

    def full_list(self, vm_list: list[str] | None = None) -> list[dict]:
        return [vm.full_info() for vm in self._select(vm_list)]

    def _select(self, vm_list: list[str] | None) -> list[Vm]:
        vms = self.vms()
        if vm_list is None:
            return vms
        wanted = set(vm_list)
        return [vm for vm in vms if vm.id in wanted]

    # --- snapshot ---------------------------------------------------------

    def snapshot(self, vm_id: str, snap_drives: list[dict]) -> dict:
        vm = self._vm(vm_id)
        with vm.lock:
            drives = self._snapshot_drives(vm, snap_drives)
        # Storage outside the VM lock; what it decided on is checked again below.
        targets = [self._snapshot_target(vm, drive, sd) for drive, sd in drives]
        names = [t.drive for t in targets]
        with vm.lock:
            again = self._snapshot_drives(vm, snap_drives)
            if [d.volume_ids() for d, _ in again] != [d.volume_ids() for d, _ in drives]:
                raise errors.SnapshotFailed(f"the chains of VM {vm_id} changed meanwhile")
            others = [d.name for d in vm.definition.drives if d.name not in names]
            dom = vm.domain(self._conn())
            # Write-ahead: if we die after libvirt switched the leaves, recovery
            # re-reads these drives from the live XML (vmhost.virt.snapshot).
            self.snapshots.save(vm, SnapshotJob.new(names))
            failpoints.hit("vm.snapshot.before")
            try:
                dom.snapshotCreateXML(snapshot_xml(targets, others), SNAPSHOT_FLAGS)
                failpoints.hit("vm.snapshot.after")
            except libvirt.libvirtError as e:
                log.error("snapshot of VM %s failed: %s", vm_id, e)
                raise errors.SnapshotFailed(str(e)) from None
            finally:
                # QEMU may have switched even if the call failed: the chain is
                # re-read on a live connection, or marked unknown until it is.
                self._resync_drives(vm, names)
        log.info("VM %s: snapshot of %s", vm_id, ", ".join(names))
        return {"quiesce": False}

    def _resync_drives(self, vm: Vm, names: list[str]) -> bool:
        """Re-read the named drives from the live XML and persist, with the
        snapshot jobs that no stale drive keeps any more gone (VM lock held).
        On failure they stay stale (volume_in_use refuses their image) and a
        scheduled item retries."""
        try:
            conn = self._conn()
            live = domxml.live_disks(vm.domain(conn).XMLDesc(0))
            vm.apply_live_chain(live, names)
            still = vm.stale_drives - set(names)
            for job in self.snapshots.readable(vm):
                if not still & set(job.drives):
                    self.snapshots.take(vm, job.id)
            vm.persist(conn)
        except libvirt.libvirtError as e:
            log.warning("VM %s: cannot re-read drives %s: %s", vm.id, ", ".join(names), e)
            vm.stale_drives.update(names)
            self._scheduler.submit(f"resync/{vm.id}", f"re-read the chains of VM {vm.id}",
                                   lambda: self._resync_item(vm.id), topics=(("vm", vm.id),))
            return False
        vm.stale_drives.difference_update(names)
        return True

    def _resync_item(self, vm_id: str):
        vm = self.registry.get(vm_id)
        if vm is None or vm.status == DOWN:
            return DONE
        with vm.lock:
            if not vm.stale_drives or self._resync_drives(vm, sorted(vm.stale_drives)):
                return DONE
        return Retry(f"cannot re-read the chains of VM {vm_id} from libvirt yet")

    def _snapshot_drives(self, vm: Vm, snap_drives: list[dict]) -> list[tuple[Drive, dict]]:
        """The libvirt-side checks of a snapshot request (VM lock held)."""
        if vm.status == DOWN:
            raise errors.SnapshotFailed(f"VM {vm.id} is down")
        drives, seen = [], set()
        for i, sd in enumerate(snap_drives):
            for key in ("domainID", "imageID", "baseVolumeID", "volumeID"):
                check_uuid(sd.get(key), f"snapDrives[{i}].{key}")
            drive = vm.definition.find_drive(sd["domainID"], sd["imageID"])
            if drive is None:
                raise errors.ImageFileNotFound(
                    f"VM {vm.id} has no drive with image {sd['imageID']} on domain {sd['domainID']}")
            if drive.name in seen:
                raise errors.SnapshotFailed(f"snapDrives lists image {sd['imageID']} twice")
            seen.add(drive.name)
            if drive.name in vm.stale_drives:
                raise errors.SnapshotFailed(f"the chain of drive {drive.name} is not known to be "
                                            "current yet")
            if sd["baseVolumeID"] != drive.volume:
                raise errors.SnapshotFailed(
                    f"baseVolumeID {sd['baseVolumeID']} is not the leaf of drive {drive.name} "
                    f"({drive.volume})")
            drives.append((drive, sd))
        busy = self.merger.busy_drives(vm) & seen
        if busy:
            raise errors.SnapshotFailed(f"drive(s) {', '.join(sorted(busy))} have a merge "
                                        "in progress")
        return drives

    def _snapshot_target(self, vm: Vm, drive: Drive, sd: dict) -> SnapshotTarget:
        # The new leaf's qcow2 header must name the drive's leaf: the chain
        # below is what QEMU runs (the caller re-checks it under the VM lock).
        try:
            leaf = self._storage.prepare_leaf(sd["domainID"], sd["imageID"], sd["volumeID"])
        except errors.InvalidParameter as e:     # a damaged header
            raise errors.SnapshotFailed(str(e)) from None
        if leaf.backing != drive.volume:
            raise errors.SnapshotFailed(
                f"volume {sd['volumeID']} is not a child of {drive.volume}")
        return SnapshotTarget(drive.name, leaf.ref.path, leaf.format)
