"""Storage service: the storage half of the host (VDSM calls it HSM).

Keeps the registry of connected domains (a local file in the state dir, so
finding a domain never touches the storage itself), one monitor per domain,
per-image locks, and turns domain/image operations into API dictionaries.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Callable

from vmhost import errors
from vmhost.fsutil import atomic_write
from vmhost.ids import BLANK_UUID, check_uuid
from vmhost.refs import PreparedImage, VolumeRef
from vmhost.storage import qemu_img
from vmhost.storage.domain import DomainManifest, StorageDomain
from vmhost.storage.filedomain import DOMAIN_TYPE as LOCALFS, FileStorageDomain
from vmhost.storage.image import Image
from vmhost.storage.metadata import (Legality, Prealloc, VolumeMetadata, parse_format,
                                     parse_prealloc)
from vmhost.storage.monitor import DomainMonitor, DomainStatus
from vmhost.storage.posixdomain import DOMAIN_TYPE as POSIXFS, PosixStorageDomain

log = logging.getLogger(__name__)

# VDSM's numeric domain types that map to what we support.
_DOMAIN_TYPES = {LOCALFS: LOCALFS, 4: LOCALFS, "4": LOCALFS,
                 POSIXFS: POSIXFS, 6: POSIXFS, "6": POSIXFS}
_DOMAIN_CLASSES: dict[str, type[FileStorageDomain]] = {LOCALFS: FileStorageDomain,
                                                       POSIXFS: PosixStorageDomain}

MAX_VOLUME_SIZE = 1 << 50     # 1 PiB: far beyond any disk, far below qemu-img's limits

VolumeInUse = Callable[[str, str, str], bool]
DomainListener = Callable[[str, bool, str], None]


class StorageService:
    def __init__(self, state_dir: str, monitor_interval: float = 5.0,
                 monitor_timeout: float = 10.0,
                 volume_in_use: VolumeInUse = lambda sd, img, vol: False,
                 sanlock_host_id: int = 0, sanlock_io_timeout: int = 10):
        self._registry_path = os.path.join(state_dir, "domains.json")
        self._interval = monitor_interval
        self._timeout = monitor_timeout
        self.volume_in_use = volume_in_use
        self._host_id = sanlock_host_id          # in shared domains' lockspaces; 0 = none
        self._io_timeout = sanlock_io_timeout
        self._lock = threading.Lock()
        self._image_locks: dict[tuple[str, str], threading.Lock] = {}
        self._domains: dict[str, StorageDomain] = {}
        self._monitors: dict[str, DomainMonitor] = {}
        self._listeners: list[DomainListener] = []
        for manifest in self._load_registry():
            self._domains[manifest.uuid] = _DOMAIN_CLASSES[manifest.type](manifest)

    # --- life cycle ----------------------------------------------------

    def start(self) -> None:
        """Start monitoring every registered domain; returns at once."""
        for sd in list(self._domains):
            self._start_monitor(sd)
        for dom in self._shared_domains():
            self._join_quietly(dom)

    def stop(self) -> None:
        for mon in self._monitors.values():
            mon.stop()

    def subscribe(self, listener: DomainListener) -> None:
        """listener(sd_uuid, valid, reason) on every domain status change."""
        self._listeners.append(listener)

    def domain_status(self, sd_uuid: str) -> DomainStatus:
        mon = self._monitors.get(sd_uuid)
        return mon.status if mon else DomainStatus(valid=None, reason="not monitored")

    def _start_monitor(self, sd_uuid: str) -> None:
        dom = self._domains[sd_uuid]
        mon = DomainMonitor(sd_uuid, dom.metadata_probe_path(), self._interval,
                            self._timeout, self._notify)
        self._monitors[sd_uuid] = mon
        mon.start()

    def _notify(self, sd_uuid: str, valid: bool, reason: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(sd_uuid, valid, reason)
            except Exception:
                log.exception("domain listener failed")

    # --- registry --------------------------------------------------------

    def _load_registry(self) -> list[DomainManifest]:
        try:
            with open(self._registry_path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        return [DomainManifest(**entry) for entry in data.get("domains", [])]

    def _save_registry(self) -> None:
        os.makedirs(os.path.dirname(self._registry_path), exist_ok=True)
        entries = [vars(d.manifest) for d in self._domains.values()]
        atomic_write(self._registry_path,
                     json.dumps({"version": 1, "domains": entries}, indent=1).encode())

    def domain(self, sd_uuid: str) -> StorageDomain:
        check_uuid(sd_uuid, "storagedomainID")
        try:
            return self._domains[sd_uuid]
        except KeyError:
            raise errors.StorageDomainDoesNotExist(sd_uuid) from None

    def _image(self, sd_uuid: str, img_uuid: str) -> Image:
        check_uuid(img_uuid, "imageID")
        return Image(self.domain(sd_uuid), img_uuid)

    def _image_lock(self, sd_uuid: str, img_uuid: str) -> threading.Lock:
        with self._lock:
            return self._image_locks.setdefault((sd_uuid, img_uuid), threading.Lock())

    # --- domains ------------------------------------------------------------

    def create_domain(self, sd_uuid: str, domain_type: str | int, type_args: str,
                      name: str) -> dict:
        check_uuid(sd_uuid, "storagedomainID")
        kind = _DOMAIN_TYPES.get(domain_type)
        if kind is None:
            raise errors.InvalidParameter(f"domainType {domain_type!r} is not supported "
                                          "(supported: 'localfs' or 4)")
        with self._lock:
            if sd_uuid in self._domains:
                raise errors.StorageDomainAlreadyExists(sd_uuid)
            if kind == POSIXFS:
                self._check_host_id()
                dom = PosixStorageDomain.create(type_args, sd_uuid, name,
                                                io_timeout=self._io_timeout)
            else:
                dom = FileStorageDomain.create(type_args, sd_uuid, name)
            self._domains[sd_uuid] = dom
            self._save_registry()
        self._start_monitor(sd_uuid)
        if isinstance(dom, PosixStorageDomain):
            self._join_quietly(dom)    # asynchronous anyway: repo stats tell when acquired
        return self.domain_info(sd_uuid)

    # --- shared domains (posixfs): sanlock lockspaces -------------------------

    def connect_domain(self, sd_uuid: str, domain_type: str | int, type_args: str) -> dict:
        """Register a posixfs domain another host created and join its lockspace.
        Idempotent: connecting a connected domain only makes sure it is joined."""
        check_uuid(sd_uuid, "storagedomainID")
        if _DOMAIN_TYPES.get(domain_type) != POSIXFS:
            raise errors.InvalidParameter(f"domainType {domain_type!r} cannot be connected: "
                                          "only posixfs (6) domains are shared")
        self._check_host_id()
        found = PosixStorageDomain.open_existing(type_args, sd_uuid)   # reads storage: no lock
        with self._lock:
            dom = self._domains.get(sd_uuid)
            if dom is not None and dom.manifest.path != found.manifest.path:
                raise errors.StorageDomainAlreadyExists(
                    f"{sd_uuid} is connected from {dom.manifest.path}, not {type_args}")
            new = dom is None
            if new:
                dom = self._domains[sd_uuid] = found
                self._save_registry()
        if new:
            self._start_monitor(sd_uuid)
        assert isinstance(dom, PosixStorageDomain)
        dom.join(self._host_id, self._io_timeout)
        return self.domain_info(sd_uuid)

    def disconnect_domain(self, sd_uuid: str) -> None:
        """Leave a shared domain's lockspace and forget the domain (its storage stays).
        Refused while a VM of this host uses one of its volumes; sanlock itself refuses
        while a lease in the lockspace is held."""
        dom = self.domain(sd_uuid)
        if not isinstance(dom, PosixStorageDomain):
            raise errors.InvalidParameter(f"domain {sd_uuid} is {dom.manifest.type}: only "
                                          "posixfs domains are connected and disconnected")
        for img in dom.images():
            for vol in dom.volumes(img):
                if self.volume_in_use(sd_uuid, img, vol):
                    raise errors.StorageDomainDetachError(
                        f"domain {sd_uuid}: volume {vol} is used by a VM of this host")
        if self._host_id:
            dom.leave(self._host_id)
        with self._lock:
            self._domains.pop(sd_uuid, None)
            self._save_registry()
            monitor = self._monitors.pop(sd_uuid, None)
        if monitor:
            monitor.stop()

    # --- VM leases (in a shared domain's xleases) -----------------------------

    def create_lease(self, sd_uuid: str, lease_id: str) -> dict:
        """Idempotent: an existing lease is returned as it is."""
        dom = self._joined_domain(sd_uuid)
        return _lease_info(dom, lease_id, dom.create_lease(lease_id))

    def lease_info(self, sd_uuid: str, lease_id: str) -> dict:
        dom = self._joined_domain(sd_uuid)
        offset = dom.find_lease(lease_id)
        if offset is None:
            raise errors.NoSuchLease(f"lease {lease_id} on domain {sd_uuid}")
        return _lease_info(dom, lease_id, offset)

    def delete_lease(self, sd_uuid: str, lease_id: str) -> None:
        if not self._joined_domain(sd_uuid).delete_lease(lease_id):
            raise errors.NoSuchLease(f"lease {lease_id} on domain {sd_uuid}")

    @contextlib.contextmanager
    def _sole_writer(self, sd_uuid: str, img_uuid: str):
        """One writer per image on a shared domain: the host running the image's VM (its
        QEMU holds the image lease), or else the host holding the image lease meanwhile;
        refused (651) while the VM runs on another host."""
        dom = self.domain(sd_uuid)
        if not isinstance(dom, PosixStorageDomain) or any(
                self.volume_in_use(sd_uuid, img_uuid, vol) for vol in dom.volumes(img_uuid)):
            yield
            return
        self._joined_domain(sd_uuid)
        with dom.image_lease(img_uuid, self._host_id):
            yield

    def check_lease_free(self, sd_uuid: str, lease_id: str, offset: int) -> None:
        """651 at once if another host (not known dead) holds the lease."""
        self._joined_domain(sd_uuid).check_free(lease_id, offset, self._host_id)

    def is_shared(self, sd_uuid: str) -> bool:
        """Whether VMs with disks on the domain need a lease (posixfs)."""
        return isinstance(self.domain(sd_uuid), PosixStorageDomain)

    def _joined_domain(self, sd_uuid: str) -> PosixStorageDomain:
        """A shared domain whose lockspace this host holds (sanlock's index needs it)."""
        dom = self.domain(sd_uuid)
        if not isinstance(dom, PosixStorageDomain):
            raise errors.InvalidParameter(f"domain {sd_uuid} is {dom.manifest.type}: VM leases "
                                          "live on posixfs domains")
        if not self._lockspace_acquired(dom):
            raise errors.AcquireHostIdFailure(f"this host has not joined domain {sd_uuid} "
                                              "yet (Host.getStorageRepoStats: acquired)")
        return dom

    def _check_host_id(self) -> None:
        if not self._host_id:
            raise errors.AcquireHostIdFailure(
                "this host has no sanlock host id: start it with `vmhost serve --host-id N`")

    def _shared_domains(self) -> list[PosixStorageDomain]:
        return [d for d in list(self._domains.values()) if isinstance(d, PosixStorageDomain)]

    def _join_quietly(self, dom: PosixStorageDomain) -> None:
        """Join without failing the caller: the next repo stats retry."""
        if not self._host_id:
            log.warning("domain %s is shared but this host has no --host-id", dom.uuid)
            return
        try:
            dom.join(self._host_id, self._io_timeout)
        except errors.AcquireHostIdFailure as e:
            log.warning("%s", e)

    def _lockspace_acquired(self, dom: StorageDomain) -> bool:
        if not isinstance(dom, PosixStorageDomain):
            return True          # a local domain has no lockspace
        if not self._host_id:
            return False
        if dom.acquired(self._host_id):
            return True
        if not dom.joining(self._host_id):
            self._join_quietly(dom)   # after a sanlock restart, or a failed join
        return False

    def domain_info(self, sd_uuid: str) -> dict:
        dom = self.domain(sd_uuid)
        m = dom.manifest
        info = {"uuid": m.uuid, "name": m.name, "type": m.type, "class": "Data",
                "version": str(m.version), "remotePath": m.path, "role": "Regular",
                "state": "OK" if self.domain_status(sd_uuid).valid else "Unknown"}
        try:
            total, free = dom.free_space()
            info.update(disktotal=str(total), diskfree=str(free))
        except OSError as e:
            info["state"] = f"unreachable: {e.strerror}"
        return info

    def repo_stats(self, domains: list[str] | None = None) -> dict:
        now = time.monotonic()
        wanted = domains if domains is not None else list(self._domains)
        stats = {sd: self.domain_status(sd).to_api(now) for sd in wanted
                 if sd in self._domains}
        for sd, entry in stats.items():
            entry["acquired"] = self._lockspace_acquired(self._domains[sd])
        return stats

    # --- volumes ----------------------------------------------------------------

    def list_volumes(self, sd_uuid: str, img_uuid: str) -> list[str]:
        return self._image(sd_uuid, img_uuid).domain.volumes(img_uuid)

    def create_volume(self, sd_uuid: str, img_uuid: str, vol_uuid: str, size: int,
                      vol_format: str | int, preallocate: str | int = "SPARSE",
                      disk_type: str = "DATA", desc: str = "",
                      src_img_uuid: str = BLANK_UUID, src_vol_uuid: str = BLANK_UUID) -> dict:
        image = self._image(sd_uuid, img_uuid)
        check_uuid(vol_uuid, "volumeID")
        check_uuid(src_vol_uuid, "srcVolUUID")
        check_uuid(src_img_uuid, "srcImgUUID")
        if not isinstance(size, int) or not 1 <= size <= MAX_VOLUME_SIZE:
            raise errors.InvalidParameter(
                f"size must be 1..{MAX_VOLUME_SIZE} bytes (1 PiB), got {size!r}")
        try:
            fmt, prealloc = parse_format(vol_format), parse_prealloc(preallocate)
        except ValueError as e:
            raise errors.InvalidParameter(str(e)) from None
        parent = None if src_vol_uuid == BLANK_UUID else src_vol_uuid
        if parent and prealloc is Prealloc.PREALLOCATED:
            raise errors.InvalidParameter(
                "preallocate must be SPARSE for a volume with a parent (a qcow2 overlay)")
        if parent and src_img_uuid not in (BLANK_UUID, img_uuid):
            raise errors.InvalidParameter(
                "srcImgUUID must be imageID: a parent in another image is not supported")
        with self._image_lock(sd_uuid, img_uuid), self._sole_writer(sd_uuid, img_uuid):
            md = image.create_volume(vol_uuid, size, fmt, prealloc, disk_type, desc, parent)
        return self._volume_dict(image, md)

    def volume_info(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> dict:
        image = self._image(sd_uuid, img_uuid)
        return self._volume_dict(image, image.volume(check_uuid(vol_uuid, "volumeID")))

    def delete_volume(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> None:
        image = self._image(sd_uuid, img_uuid)
        check_uuid(vol_uuid, "volumeID")
        with self._image_lock(sd_uuid, img_uuid):
            # Structural reasons first: unknown (13), has children (204), in use (203).
            image.volume(vol_uuid)
            image.check_no_children(vol_uuid)
            if self.volume_in_use(sd_uuid, img_uuid, vol_uuid):
                raise errors.VolumeIsBusy(f"volume {vol_uuid} is used by a running VM")
            with self._sole_writer(sd_uuid, img_uuid):
                image.delete_volume(vol_uuid)

    def volume_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str) -> list[VolumeMetadata]:
        return self._image(sd_uuid, img_uuid).chain(check_uuid(leaf_uuid, "volumeID"))

    def prepare_image(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                      allow_illegal: bool = False) -> PreparedImage:
        """The chain a VM will run on, base first; refuses ILLEGAL volumes."""
        image = self._image(sd_uuid, img_uuid)
        chain = image.chain(check_uuid(leaf_uuid, "volumeID"))
        bad = [md.volume for md in chain if md.legality is not Legality.LEGAL]
        if bad and not allow_illegal:
            raise errors.PrepareIllegalVolume(
                f"image {img_uuid} has ILLEGAL volume(s) {', '.join(bad)}")
        dom = image.domain
        refs = [VolumeRef(sd_uuid, img_uuid, md.volume, dom.volume_path(img_uuid, md.volume))
                for md in chain]
        return PreparedImage(chain=refs, format=chain[-1].format.qemu)

    def sync_volume_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                          actual: list[str]) -> str:
        """Storage half of a chain sync (see Image.sync_chain); returns the case."""
        image = self._image(sd_uuid, img_uuid)
        for i, vol in enumerate(actual):
            check_uuid(vol, f"actual[{i}]")
        with self._image_lock(sd_uuid, img_uuid):
            case = image.sync_chain(check_uuid(leaf_uuid, "leaf"), actual)
        log.info("image %s: chain sync from %s to %s: %s", img_uuid, leaf_uuid, actual, case)
        return case

    def finish_merge(self, sd_uuid: str, img_uuid: str, base: str, merged: list[str],
                     capacity: int, base_is_leaf: bool) -> None:
        image = self._image(sd_uuid, img_uuid)
        with self._image_lock(sd_uuid, img_uuid):
            image.finish_merge(base, merged, capacity, base_is_leaf)

    def reconcile_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str) -> list[str]:
        """Offline repair of an image no VM runs (VDSM's reconcileVolumeChain):
        the chain is what the qcow2 headers say, walked from `leaf_uuid`;
        ILLEGAL volumes at its top are the marker of a pivot that happened
        (see Image.sync_chain, case 1), so they are dropped;
        then the metadata is synced to that chain. Returns it, base first."""
        image = self._image(sd_uuid, img_uuid)
        check_uuid(leaf_uuid, "leafVolID")
        with self._image_lock(sd_uuid, img_uuid):
            image.volume(leaf_uuid)
            if self.volume_in_use(sd_uuid, img_uuid, leaf_uuid):
                raise errors.VolumeIsBusy(f"image {img_uuid} is used by a running VM; "
                                          "use VM.synchronizeDisks")
            with self._sole_writer(sd_uuid, img_uuid):
                chain = self._reconcile_locked(image, leaf_uuid)
        log.info("image %s reconciled from %s: %s", img_uuid, leaf_uuid, chain)
        return chain

    @staticmethod
    def _reconcile_locked(image: Image, leaf_uuid: str) -> list[str]:
        img_uuid = image.uuid
        infos = qemu_img.info(image.domain.volume_path(img_uuid, leaf_uuid),
                              backing_chain=True)
        chain = [os.path.basename(i["filename"]) for i in reversed(infos)]
        for vol in chain:
            if not image.domain.has_volume(img_uuid, check_uuid(vol, "backing file")):
                raise errors.ImageFileNotFound(
                    f"volume {vol} named in the qcow2 chain of {leaf_uuid} has no metadata")
        # Volumes marked ILLEGAL above a pivot's base: QEMU left them.
        while len(chain) > 1 and image.volume(chain[-1]).legality is Legality.ILLEGAL:
            chain.pop()
        case = image.sync_chain(leaf_uuid, chain)
        log.info("image %s: metadata synced to %s (%s)", img_uuid, chain, case)
        return chain

    def domain_valid(self, sd_uuid: str) -> bool:
        return bool(self.domain_status(sd_uuid).valid)

    @staticmethod
    def _volume_dict(image: Image, md: VolumeMetadata) -> dict:
        size = image.domain.size(md.image, md.volume)
        return {
            "uuid": md.volume, "domain": md.domain, "image": md.image,
            "parent": md.parent, "format": md.format.value, "voltype": md.voltype.value,
            "legality": md.legality.value, "type": md.prealloc.value,
            "disktype": md.disktype, "capacity": str(md.capacity),
            "apparentsize": str(size.apparent), "truesize": str(size.true),
            "ctime": str(md.ctime), "mtime": "0", "description": md.description,
            "generation": md.generation, "status": "OK",
            "path": image.domain.volume_path(md.image, md.volume),
        }


def _lease_info(dom: PosixStorageDomain, lease_id: str, offset: int) -> dict:
    """VDSM's LeaseInfo: what a domain XML <lease> needs."""
    return {"sd_id": dom.uuid, "lease_id": lease_id, "path": dom.xleases_path, "offset": offset}
