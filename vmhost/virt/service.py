"""The VM service: create, control, report, snapshot and recover VMs.

Recovery reads libvirt only: each domain carrying vmhost metadata is rebuilt
from that metadata, and only drives with a pending chain change (a snapshot
or, later, a block job) are re-read from the live XML. No storage access.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

import libvirt

from vmhost import errors
from vmhost.ids import check_uuid
from vmhost.refs import PreparedImage
from vmhost.scheduler import Scheduler
from vmhost.virt import domxml
from vmhost.virt.disksync import DiskSynchronizer
from vmhost.virt.jobhistory import JobHistory
from vmhost.virt.merge import MergeConfig, Merger
from vmhost.virt.snapshot import SNAPSHOT_FLAGS, SnapshotTarget, snapshot_xml
from vmhost.virt.vm import DOWN, PAUSED, UP, Vm, status_from_state
from vmhost.virt.vmdef import RESUME_BEHAVIORS, DefinitionError, Drive, VmDefinition

log = logging.getLogger(__name__)

DRIVE_NAMES = [f"vd{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


class ImagePreparer(Protocol):
    def prepare_image(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                      allow_illegal: bool = False) -> PreparedImage: ...


class VmService:
    def __init__(self, conn: Callable[[], libvirt.virConnect], storage: ImagePreparer,
                 virt_type: str, scheduler: Scheduler, merge_config: MergeConfig | None = None,
                 publish: Callable[[dict], None] = lambda event: None, host_id: str = "",
                 history: JobHistory | None = None):
        self._conn = conn
        self.host_id = host_id
        self._storage = storage
        self.virt_type = virt_type
        self._lock = threading.Lock()
        self._vms: dict[str, Vm] = {}
        self._publish = publish
        self.merger = Merger(storage, scheduler, self.get,
                             domain_of=lambda vm: vm.domain(self._conn()),
                             persist=lambda vm: vm.persist(self._conn()),
                             config=merge_config, publish=publish, history=history)
        self.disksync = DiskSynchronizer(storage, scheduler, self.get,
                                         xml_of=lambda vm: vm.domain(self._conn()).XMLDesc(0),
                                         persist=lambda vm: vm.persist(self._conn()))

    # --- lookup -----------------------------------------------------------

    def _vm(self, vm_id: str) -> Vm:
        check_uuid(vm_id, "vmID")
        try:
            return self._vms[vm_id]
        except KeyError:
            raise errors.NoSuchVM(vm_id) from None

    def get(self, vm_id: str) -> Vm | None:
        return self._vms.get(vm_id)

    def vms(self) -> list[Vm]:
        with self._lock:
            return list(self._vms.values())

    def volume_in_use(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> bool:
        return any(vm.status != DOWN and vm.uses_volume(sd_uuid, img_uuid, vol_uuid)
                   for vm in self.vms())

    # --- life cycle -------------------------------------------------------

    def create(self, vm_id: str, vm_params: dict) -> dict:
        check_uuid(vm_id, "vmID")
        definition = self._definition(vm_id, vm_params)
        allow_illegal = bool(vm_params.get("allowIllegal", False))
        with self._lock:
            if vm_id in self._vms:
                raise errors.VMExists(vm_id)
            # Reserve the id so a concurrent create of the same VM fails fast.
            vm = Vm(definition, status="WaitForLaunch")
            vm.jobs_known = True
            self._vms[vm_id] = vm
        try:
            with vm.lock:
                self._prepare_drives(definition, vm_params["devices"], allow_illegal)
                self._start(vm, self._leases(definition, vm_params["devices"]))
        except BaseException:
            with self._lock:
                self._vms.pop(vm_id, None)
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
            with self._lock:
                self._vms.pop(vm_id, None)
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
                    # (and may run the VM): this QEMU must stay paused.
                    vm.status, vm.pause_code = status_from_state(*dom.state())
                    raise errors.AcquireLockFailure(
                        f"VM {vm_id} stays paused: its lease is held by another host: {e}") \
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

    # --- disk synchronization and I/O error recovery ---------------------------

    def synchronize_disks(self, vm_id: str) -> dict:
        vm = self._vm(vm_id)
        result = self.disksync.synchronize(vm)
        # A job record that came with the VM (from another host, or finished
        # while nobody watched) is resolved from the chain by its own step.
        if vm.definition.jobs:
            self.merger.resume(vm, vm.domain(self._conn()))
        return result

    def resume_eio_paused(self, sd_uuid: str, still_valid: Callable[[], bool] = lambda: True
                          ) -> list[str]:
        """A domain turned VALID: VMs paused by an I/O error on one of its
        disks are resumed, left paused or killed, as their resumeBehavior says."""
        acted = []
        for vm in self.vms():
            if vm.status != PAUSED or vm.pause_code != "EIO":
                continue
            if sd_uuid not in self._eio_domains(vm):
                continue
            if not still_valid():
                break
            behavior = vm.definition.resume_behavior
            log.info("VM %s paused on I/O error; domain %s is VALID: %s", vm.id, sd_uuid,
                     behavior)
            if behavior == "auto_resume":
                self.cont(vm.id)
            elif behavior == "kill":
                self.destroy(vm.id)
            else:
                continue
            acted.append(vm.id)
        return acted

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
            if vm.status == DOWN:
                raise errors.SnapshotFailed(f"VM {vm_id} is down")
            targets = self._snapshot_targets(vm, snap_drives)
            names = [t.drive for t in targets]
            busy = self.merger.busy_drives(vm) & set(names)
            if busy:
                raise errors.SnapshotFailed(f"drive(s) {', '.join(sorted(busy))} have a merge "
                                            "in progress")
            others = [d.name for d in vm.definition.drives if d.name not in names]
            conn = self._conn()
            dom = vm.domain(conn)
            # Write-ahead: if we die after libvirt switched the leaves, recovery
            # re-reads these drives from the live XML.
            vm.definition.pending_sync = names
            vm.persist(conn)
            try:
                dom.snapshotCreateXML(snapshot_xml(targets, others), SNAPSHOT_FLAGS)
            except libvirt.libvirtError as e:
                log.error("snapshot of VM %s failed: %s", vm_id, e)
                raise errors.SnapshotFailed(str(e)) from None
            finally:
                live = domxml.live_disks(dom.XMLDesc(0))
                vm.apply_live_chain(live, names)
                vm.definition.pending_sync = []
                vm.persist(conn)
        log.info("VM %s: snapshot of %s", vm_id, ", ".join(names))
        return {"quiesce": False}

    def _snapshot_targets(self, vm: Vm, snap_drives: list[dict]) -> list[SnapshotTarget]:
        targets, seen = [], set()
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
            if sd["baseVolumeID"] != drive.volume:
                raise errors.SnapshotFailed(
                    f"baseVolumeID {sd['baseVolumeID']} is not the leaf of drive {drive.name} "
                    f"({drive.volume})")
            prepared = self._storage.prepare_image(sd["domainID"], sd["imageID"], sd["volumeID"])
            if [v.volume for v in prepared.chain[:-1]] != drive.volume_ids():
                raise errors.SnapshotFailed(
                    f"volume {sd['volumeID']} is not a child of {drive.volume}")
            targets.append(SnapshotTarget(drive.name, prepared.chain[-1].path, prepared.format))
        return targets

    # --- recovery -----------------------------------------------------------

    def recover(self) -> int:
        """Rebuild VMs from libvirt alone; returns how many were recovered."""
        conn = self._conn()
        found: dict[str, tuple[Vm, libvirt.virDomain]] = {}
        for dom in conn.listAllDomains(0):
            try:
                vm = self._recover_one(conn, dom)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # went away while we listed
                raise
            if vm is not None:
                found[vm.id] = (vm, dom)
        with self._lock:
            self._vms.update({vm_id: vm for vm_id, (vm, _) in found.items()})
        # Registered first: a resumed job's work item looks its VM up.
        for vm, dom in found.values():
            if vm.definition.jobs:
                self.merger.resume(vm, dom)
            self.disksync.resume(vm)
            vm.jobs_known = True
        log.info("recovered %d VM(s)", len(found))
        return len(found)

    def _recover_one(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> Vm | None:
        xml = dom.XMLDesc(0)
        payload = domxml.read_metadata(xml)
        if payload is None:
            return None  # not ours
        try:
            definition = VmDefinition.from_json(payload)
        except DefinitionError as e:
            log.error("domain %s: cannot recover: %s", dom.UUIDString(), e)
            return None
        if definition.host_id and definition.host_id != self.host_id:
            # Another agent instance runs it (one agent per libvirtd is the
            # rule; this keeps two from driving the same VM's jobs).
            log.warning("domain %s belongs to agent %s, not to us (%s): ignored",
                        dom.UUIDString(), definition.host_id, self.host_id)
            return None
        vm = Vm(definition, *status_from_state(*dom.state()))
        # Only drives with a tracked change are asked about: a snapshot that
        # was switching leaves, or a block job.
        stale = sorted(set(definition.pending_sync) | set(Merger.tracked_drives(vm)))
        if stale:
            changed = vm.apply_live_chain(domxml.live_disks(xml), stale)
            if changed or definition.pending_sync:
                definition.pending_sync = []
                vm.persist(conn)
            log.info("VM %s: re-read chains of %s from libvirt", vm.id, ", ".join(stale))
        return vm

    def refresh_status(self) -> None:
        """Poll libvirt for every VM's state (after a reconnect events may be lost)."""
        conn = self._conn()
        for vm in self.vms():
            try:
                vm.status, vm.pause_code = status_from_state(*vm.domain(conn).state())
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    vm.status = DOWN
                    vm.exit_message = "domain disappeared"

    @staticmethod
    def _eio_domains(vm: Vm) -> set[str]:
        """Domains of the disks that reported the I/O error (all of the VM's
        disks when unknown, e.g. for a VM recovered already paused)."""
        drives = vm.definition.drives
        if vm.eio_aliases:
            names = {f"vd{chr(ord('a') + int(a[len('virtio-disk'):]))}"
                     for a in vm.eio_aliases if a.startswith("virtio-disk") and
                     a[len("virtio-disk"):].isdigit()}
            drives = [d for d in drives if d.name in names] or drives
        return {d.domain for d in drives}

    def on_io_error(self, vm_uuid: str, dev_alias: str, reason: str) -> None:
        """libvirt IO_ERROR_REASON (event thread): remember which disk failed."""
        vm = self._vms.get(vm_uuid)
        if vm is not None:
            vm.eio_aliases.add(dev_alias)
            log.warning("VM %s: I/O error on %s (%s)", vm_uuid, dev_alias, reason)

    def on_lifecycle(self, vm_uuid: str, event: int, detail: int) -> None:
        """libvirt lifecycle event (runs on the event thread: no libvirt calls)."""
        vm = self._vms.get(vm_uuid)
        if vm is None:
            return
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            vm.status = DOWN
            vm.exit_message = _STOP_REASONS.get(detail, "stopped")
        elif event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
            vm.status = PAUSED
            if detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
                vm.pause_code = "EIO"
        elif event in (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_STARTED):
            vm.status, vm.pause_code = UP, "NOERR"
        else:
            return
        self._publish({"event": "vm", "vmId": vm.id, "status": vm.status,
                       "pauseCode": vm.pause_code})


_STOP_REASONS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "QEMU failed",
}

