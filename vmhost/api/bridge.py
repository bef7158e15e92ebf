"""The one table from API verb to service call.

Parameters arrive already validated against schema.yaml; this module only
renames VDSM's camelCase parameters to the services' keyword arguments,
fills defaults, and turns VDSM's numeric enum codes into the names the
services use. Adding a verb = an entry in schema.yaml + an entry in _VERBS.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from vmhost.api.jsonrpc import Handler
from vmhost.api.schema import Schema, load_schema
from vmhost.errors import InvalidParameter
from vmhost.ids import BLANK_UUID


class HostService(Protocol):
    def ping(self) -> bool: ...
    def capabilities(self) -> dict: ...
    def pending_work(self) -> list[dict]: ...


class StorageService(Protocol):
    def create_domain(self, sd_uuid: str, domain_type: str, type_args: str, name: str) -> dict: ...
    def connect_domain(self, sd_uuid: str, domain_type: str, type_args: str) -> dict: ...
    def disconnect_domain(self, sd_uuid: str) -> None: ...
    def create_lease(self, sd_uuid: str, lease_id: str) -> dict: ...
    def lease_info(self, sd_uuid: str, lease_id: str) -> dict: ...
    def delete_lease(self, sd_uuid: str, lease_id: str) -> None: ...
    def domain_info(self, sd_uuid: str) -> dict: ...
    def repo_stats(self, domains: list[str] | None) -> dict: ...
    def list_volumes(self, sd_uuid: str, img_uuid: str) -> list[str]: ...
    def create_volume(self, sd_uuid: str, img_uuid: str, vol_uuid: str, size: int,
                      vol_format: str, preallocate: str, disk_type: str, desc: str,
                      src_img_uuid: str, src_vol_uuid: str) -> dict: ...
    def volume_info(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> dict: ...
    def delete_volume(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> None: ...
    def reconcile_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str) -> list[str]: ...


class VmService(Protocol):
    def create(self, vm_id: str, vm_params: dict) -> dict: ...
    def destroy(self, vm_id: str) -> None: ...
    def pause(self, vm_id: str) -> None: ...
    def cont(self, vm_id: str) -> None: ...
    def get_stats(self, vm_id: str) -> list[dict]: ...
    def list(self, full_status: bool, vm_list: list[str] | None, only_uuid: bool) -> list: ...
    def all_stats(self) -> list[dict]: ...
    def full_list(self, vm_list: list[str] | None) -> list[dict]: ...
    def snapshot(self, vm_id: str, snap_drives: list[dict]) -> dict: ...
    def merge(self, vm_id: str, drive: dict, base: str, top: str, bandwidth: int,
              job_id: str | None) -> str: ...
    def abort_merge(self, vm_id: str, job_id: str) -> dict: ...
    def dismiss_job(self, vm_id: str, job_id: str) -> None: ...
    def job_history(self) -> list[dict]: ...
    def synchronize_disks(self, vm_id: str) -> dict: ...


class JobService(Protocol):
    def merge(self, job_id: str, subchain: dict) -> None: ...
    def get_jobs(self, job_type: str | None, job_ids: list[str] | None) -> dict: ...
    def abort(self, job_id: str) -> None: ...
    def delete(self, job_id: str) -> None: ...


class Services(Protocol):
    host: HostService
    storage: StorageService
    vms: VmService
    jobs: JobService


# VDSM's numeric codes (storage/constants.py) -> the names services use.
_DOMAIN_TYPES = {4: "localfs", 6: "posixfs"}
_VOLUME_FORMATS = {4: "COW", 5: "RAW"}
_PREALLOCATION = {1: "PREALLOCATED", 2: "SPARSE"}


def _named(codes: dict[int, str], value: int | str) -> str:
    return codes.get(value, value)  # type: ignore[arg-type]


def _create_volume(s: Services, p: dict[str, Any]) -> dict:
    return s.storage.create_volume(
        sd_uuid=p["storagedomainID"],
        img_uuid=p["imageID"],
        vol_uuid=p["volumeID"],
        size=int(p["size"]),
        vol_format=_named(_VOLUME_FORMATS, p["volFormat"]),
        preallocate=_named(_PREALLOCATION, p.get("preallocate", "SPARSE")),
        disk_type=p.get("diskType", "DATA"),
        desc=p.get("desc", ""),
        src_img_uuid=p.get("srcImgUUID", BLANK_UUID),
        src_vol_uuid=p.get("srcVolUUID", BLANK_UUID),
    )


def _snapshot(s: Services, p: dict[str, Any]) -> dict:
    # Dropping a requested memory snapshot silently would leave the engine
    # believing it can restore RAM; refuse instead.
    if p.get("snapMemory"):
        raise InvalidParameter("snapMemory: memory snapshots are not supported")
    return s.vms.snapshot(vm_id=p["vmID"], snap_drives=p["snapDrives"])


# Parameters accepted only for VDSM compatibility (storagepoolID, postZero,
# force, domainClass, version, initialSize, frozen, fullStatus of
# getVMFullList) are deliberately not passed on.
_VERBS: dict[str, Callable[[Services, dict[str, Any]], Any]] = {
    "Host.ping": lambda s, p: s.host.ping(),
    "Host.ping2": lambda s, p: s.host.ping(),
    "Host.getCapabilities": lambda s, p: s.host.capabilities(),
    "Host.getVMList": lambda s, p: s.vms.list(
        full_status=p.get("fullStatus", False), vm_list=p.get("vmList"),
        only_uuid=p.get("onlyUUID", False)),
    "Host.getAllVmStats": lambda s, p: s.vms.all_stats(),
    "Host.getVMFullList": lambda s, p: s.vms.full_list(vm_list=p.get("vmList")),
    "Host.getStorageRepoStats": lambda s, p: s.storage.repo_stats(domains=p.get("domains")),
    "StorageDomain.create": lambda s, p: s.storage.create_domain(
        sd_uuid=p["storagedomainID"],
        domain_type=_named(_DOMAIN_TYPES, p["domainType"]),
        type_args=p["typeArgs"], name=p["name"]),
    "Lease.create": lambda s, p: s.storage.create_lease(
        sd_uuid=p["lease"]["sd_id"], lease_id=p["lease"]["lease_id"]),
    "Lease.delete": lambda s, p: s.storage.delete_lease(
        sd_uuid=p["lease"]["sd_id"], lease_id=p["lease"]["lease_id"]),
    "Lease.info": lambda s, p: s.storage.lease_info(
        sd_uuid=p["lease"]["sd_id"], lease_id=p["lease"]["lease_id"]),
    "StorageDomain.connect": lambda s, p: s.storage.connect_domain(
        sd_uuid=p["storagedomainID"], domain_type=_named(_DOMAIN_TYPES, p["domainType"]),
        type_args=p["typeArgs"]),
    "StorageDomain.disconnect": lambda s, p: s.storage.disconnect_domain(
        sd_uuid=p["storagedomainID"]),
    "StorageDomain.getInfo": lambda s, p: s.storage.domain_info(sd_uuid=p["storagedomainID"]),
    "StorageDomain.getVolumes": lambda s, p: s.storage.list_volumes(
        sd_uuid=p["storagedomainID"], img_uuid=p["imageID"]),
    "Volume.create": _create_volume,
    "Volume.getInfo": lambda s, p: s.storage.volume_info(
        sd_uuid=p["storagedomainID"], img_uuid=p["imageID"], vol_uuid=p["volumeID"]),
    "Volume.delete": lambda s, p: s.storage.delete_volume(
        sd_uuid=p["storagedomainID"], img_uuid=p["imageID"], vol_uuid=p["volumeID"]),
    "VM.create": lambda s, p: s.vms.create(vm_id=p["vmID"], vm_params=p["vmParams"]),
    "VM.destroy": lambda s, p: s.vms.destroy(vm_id=p["vmID"]),
    "VM.pause": lambda s, p: s.vms.pause(vm_id=p["vmID"]),
    "VM.cont": lambda s, p: s.vms.cont(vm_id=p["vmID"]),
    "VM.getStats": lambda s, p: s.vms.get_stats(vm_id=p["vmID"]),
    "VM.snapshot": _snapshot,
    "VM.merge": lambda s, p: s.vms.merge(
        vm_id=p["vmID"], drive=p["drive"], base=p["baseVolUUID"], top=p["topVolUUID"],
        bandwidth=p.get("bandwidth", 0), job_id=p.get("jobUUID")),
    "VM.abortMerge": lambda s, p: s.vms.abort_merge(vm_id=p["vmID"], job_id=p["jobUUID"]),
    "VM.dismissJob": lambda s, p: s.vms.dismiss_job(vm_id=p["vmID"], job_id=p["jobUUID"]),
    "Host.getPendingWork": lambda s, p: s.host.pending_work(),
    "Host.getJobHistory": lambda s, p: s.vms.job_history(),
    "VM.synchronizeDisks": lambda s, p: s.vms.synchronize_disks(vm_id=p["vmID"]),
    "Image.reconcileVolumeChain": lambda s, p: s.storage.reconcile_chain(
        sd_uuid=p["storagedomainID"], img_uuid=p["imageID"], leaf_uuid=p["leafVolID"]),
    "SDM.merge": lambda s, p: s.jobs.merge(job_id=p["job_id"], subchain=p["subchain_info"]),
    "Host.getJobs": lambda s, p: s.jobs.get_jobs(job_type=p.get("job_type"),
                                                 job_ids=p.get("job_ids")),
    "Host.abortJob": lambda s, p: s.jobs.abort(job_id=p["job_id"]),
    "Host.deleteJob": lambda s, p: s.jobs.delete(job_id=p["job_id"]),
}


def build_table(services: Services) -> dict[str, Handler]:
    """verb -> handler(params) for the Dispatcher, bound to `services`."""
    return {verb: _bind(call, services) for verb, call in _VERBS.items()}


def check_coverage(schema: Schema) -> None:
    """Raise unless the table and the schema list exactly the same verbs."""
    missing = sorted(set(schema.verbs()) - set(_VERBS))
    extra = sorted(set(_VERBS) - set(schema.verbs()))
    if missing or extra:
        raise RuntimeError(f"bridge and schema disagree: no handler for {missing}, "
                           f"no schema for {extra}")


def _bind(call: Callable[[Services, dict[str, Any]], Any], services: Services) -> Handler:
    def handler(params: dict[str, Any]) -> Any:
        result = call(services, params)
        # VDSM answers `true` for verbs that have nothing to return.
        return True if result is None else result
    return handler


# Fail at import (agent start, or test collection), not on the first call.
check_coverage(load_schema())
