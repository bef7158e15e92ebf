"""Storage service: the storage half of the host (VDSM calls it HSM).

Keeps the registry of connected domains (a local file in the state dir, so
finding a domain never touches the storage itself), one monitor per domain,
per-image locks, and turns domain/image operations into API dictionaries.

Every operation that touches a domain's files runs on that domain's bounded
executor under a deadline (`@_on_domain`, see vmhost/storage/executor.py):
past it the caller gets StorageDomainUnavailable naming the domain, and the
domain turns INVALID until the hung operations return and a probe succeeds.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from typing import Callable, Iterator, TypeVar

from vmhost import errors
from vmhost.fsutil import atomic_write
from vmhost.ids import BLANK_UUID, check_uuid
from vmhost.refs import PreparedImage, PreparedLeaf, VolumeRef
from vmhost.storage import executor, qcow2, qemu_img, sanlock_adapter as sanlock
from vmhost.storage.domain import DomainManifest, StorageDomain
from vmhost.storage.filedomain import DOMAIN_TYPE as LOCALFS, FileStorageDomain
from vmhost.storage.image import Image
from vmhost.storage.metadata import (MAX_DESCRIPTION, MAX_DISKTYPE, Legality, Prealloc, VolFormat,
                                     VolumeMetadata, check_text, parse_format, parse_prealloc)
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
F = TypeVar("F", bound=Callable)
T = TypeVar("T")


def _on_domain(method: F) -> F:
    """Run the method on its domain's executor (the first argument, sd_uuid,
    names the domain) under the storage deadline: see StorageService._run."""
    @functools.wraps(method)
    def wrapper(self: "StorageService", sd_uuid: str, *args, **kwargs):
        ids = [a for a in (*args, *kwargs.values()) if isinstance(a, str)][:2]
        what = f"{method.__name__}({', '.join(ids)})"
        return self._run(sd_uuid, what, lambda: method(self, sd_uuid, *args, **kwargs))
    return wrapper  # type: ignore[return-value]


class StorageService:
    def __init__(self, state_dir: str, monitor_interval: float = 5.0,
                 monitor_timeout: float = 10.0,
                 volume_in_use: VolumeInUse = lambda sd, img, vol: False,
                 op_timeout: float = 30.0, workers: int = 4, queue_size: int = 16,
                 sanlock_host_id: int = 0, sanlock_io_timeout: int = 10):
        self._registry_path = os.path.join(state_dir, "domains.json")
        self._interval = monitor_interval
        self._timeout = monitor_timeout
        self._op_timeout = op_timeout
        self._workers, self._queue_size = workers, queue_size
        self.volume_in_use = volume_in_use
        # The storage job holding an image (vmhost.storage.coldmerge), if any.
        self.image_job: Callable[[str, str], str | None] = lambda sd, img: None
        self._host_id = sanlock_host_id          # in shared domains' lockspaces; 0 = none
        self._io_timeout = sanlock_io_timeout
        self._lock = threading.Lock()
        # image -> [lock, users]: an entry lives only while someone uses it.
        self._image_locks: dict[tuple[str, str], list] = {}
        # Image leases the agent itself holds for a paused VM (hold_image).
        self._held: dict[tuple[str, str], sanlock.Held] = {}
        self._domains: dict[str, StorageDomain] = {}
        self._monitors: dict[str, DomainMonitor] = {}
        self._executors: dict[str, executor.DomainExecutor] = {}
        self._executors_lock = threading.Lock()
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
        for ex in self._executors.values():
            ex.close()

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

    # --- deadlines ------------------------------------------------------------

    def _executor(self, sd_uuid: str) -> executor.DomainExecutor:
        with self._executors_lock:      # not self._lock: create_domain holds that one
            ex = self._executors.get(sd_uuid)
            if ex is None:
                ex = self._executors[sd_uuid] = executor.DomainExecutor(
                    sd_uuid, self._workers, self._queue_size,
                    on_drained=lambda: self._drained(sd_uuid))
            return ex

    def run_on_domain(self, sd_uuid: str, what: str, fn: Callable[[], T],
                      timeout: float | None = None) -> T:
        """fn() on the domain's executor, for storage jobs (a cold merge's
        phases); `timeout` replaces the storage deadline for a long phase."""
        return self._run(sd_uuid, what, fn, timeout)

    def _run(self, sd_uuid: str, what: str, fn: Callable[[], T],
             timeout: float | None = None) -> T:
        """fn() on the domain's executor within the storage deadline. Past it:
        StorageDomainUnavailable naming the domain, and the domain INVALID
        until the hung operations return and a probe succeeds."""
        self.domain(sd_uuid)     # validates the id; 358 for an unknown domain
        ex = self._executor(sd_uuid)
        try:
            return ex.run(what, fn, self._op_timeout if timeout is None else timeout)
        except executor.Timeout as e:
            reason = (f"storage domain {sd_uuid} did not answer: {e}; it is INVALID until "
                      "the operation returns")
            self._mark_invalid(sd_uuid, reason, ex)
        except executor.Exhausted as e:
            reason = f"storage domain {sd_uuid} is not answering: {e}"
        raise errors.StorageDomainUnavailable(reason)

    def _mark_invalid(self, sd_uuid: str, reason: str, ex: executor.DomainExecutor) -> None:
        log.warning("%s", reason)
        mon = self._monitors.get(sd_uuid)
        if mon is not None:
            mon.mark_invalid(reason, until=lambda: not ex.stuck())

    def _drained(self, sd_uuid: str) -> None:
        mon = self._monitors.get(sd_uuid)
        if mon is not None:
            mon.check_now()     # VALID again as soon as a probe says so

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

    def _refuse_if_held(self, sd_uuid: str, img_uuid: str) -> None:
        job = self.image_job(sd_uuid, img_uuid)
        if job is not None:
            raise errors.VolumeIsBusy(f"image {img_uuid} is held by storage job {job}")

    @contextlib.contextmanager
    def _image_lock(self, sd_uuid: str, img_uuid: str) -> Iterator[None]:
        """The image's lock, waited for no longer than the operation's deadline
        (its holder may be parked on a hung domain)."""
        key = (sd_uuid, img_uuid)
        with self._lock:
            entry = self._image_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=executor.remaining(-1)):
                raise errors.StorageDomainUnavailable(
                    f"image {img_uuid} of storage domain {sd_uuid} is still locked by an "
                    "operation that did not finish in time")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._image_locks[key]

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
            dom = self._create_on_storage(sd_uuid, kind, type_args, name)
            self._domains[sd_uuid] = dom
            self._save_registry()
        self._start_monitor(sd_uuid)
        if isinstance(dom, PosixStorageDomain):
            self._join_quietly(dom)    # asynchronous anyway: repo stats tell when acquired
        return self.domain_info(sd_uuid)

    def _create_on_storage(self, sd_uuid: str, kind: str, type_args: str,
                           name: str) -> StorageDomain:
        def create() -> StorageDomain:
            if kind == POSIXFS:
                return PosixStorageDomain.create(type_args, sd_uuid, name,
                                                 io_timeout=self._io_timeout)
            return FileStorageDomain.create(type_args, sd_uuid, name)
        try:
            return self._executor(sd_uuid).run(f"create domain at {type_args}", create,
                                               self._op_timeout)
        except (executor.Timeout, executor.Exhausted) as e:
            raise errors.StorageDomainCreationError(
                f"{type_args} does not answer: {e}") from None

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

    def hold_image(self, sd_uuid: str, img_uuid: str) -> None:
        """Hold the image's lease in this agent until release_image. For a VM paused for
        a pivot: libvirt gave its QEMU's leases up at the pause, and until the pivot's
        marker is written no other host may change the image or start the VM. A no-op
        on a local domain, or when held already (asked of sanlock: re-checked before
        each side effect); 651 while another host holds it. If the agent dies, sanlock
        releases the lease."""
        dom = self.domain(sd_uuid)
        check_uuid(img_uuid, "imageID")
        if not isinstance(dom, PosixStorageDomain):
            return
        key = (sd_uuid, img_uuid)
        with self._lock:
            held = self._held.get(key)
        if held is not None:
            if sanlock.still_held(held):
                return
            log.warning("image %s: this agent's lease on it was lost; taking it again",
                        img_uuid)
            self.release_image(sd_uuid, img_uuid)
        self._joined_domain(sd_uuid)

        def acquire() -> None:
            held = dom.acquire_image_lease(img_uuid, self._host_id)
            with self._lock:     # even past the deadline: release_image finds it
                self._held[key] = held
        self._run(sd_uuid, f"hold_image({img_uuid})", acquire)

    def release_image(self, sd_uuid: str, img_uuid: str) -> None:
        """Give up the lease hold_image took (no-op if none), e.g. before the VM resumes:
        libvirt takes the lease again for QEMU then. Never fails: a release that does
        not complete closes its sanlock registration, and the daemon releases the
        lease then (a resume meanwhile fails, and is retried)."""
        with self._lock:
            held = self._held.pop((sd_uuid, img_uuid), None)
        if held is None:
            return
        dom = self.domain(sd_uuid)
        assert isinstance(dom, PosixStorageDomain)
        try:
            self._run(sd_uuid, f"release_image({img_uuid})",
                      lambda: dom.release_image_lease(held))
        except errors.VmhostError as e:
            log.warning("image %s: releasing its lease failed: %s", img_uuid, e)

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

    @_on_domain
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

    @_on_domain
    def list_volumes(self, sd_uuid: str, img_uuid: str) -> list[str]:
        return self._image(sd_uuid, img_uuid).domain.volumes(img_uuid)

    @_on_domain
    def create_volume(self, sd_uuid: str, img_uuid: str, vol_uuid: str, size: int,
                      vol_format: str | int, preallocate: str | int = "SPARSE",
                      disk_type: str = "DATA", desc: str = "",
                      src_img_uuid: str = BLANK_UUID, src_vol_uuid: str = BLANK_UUID) -> dict:
        image = self._image(sd_uuid, img_uuid)
        check_uuid(vol_uuid, "volumeID")
        check_uuid(src_vol_uuid, "srcVolUUID")
        check_uuid(src_img_uuid, "srcImgUUID")
        # Free text goes into the metadata file encoded (see storage.metadata).
        check_text("desc", desc, MAX_DESCRIPTION)
        check_text("diskType", disk_type, MAX_DISKTYPE, min_length=1)
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
        self._refuse_if_held(sd_uuid, img_uuid)
        with self._image_lock(sd_uuid, img_uuid), self._sole_writer(sd_uuid, img_uuid):
            md = image.create_volume(vol_uuid, size, fmt, prealloc, disk_type, desc, parent)
        return self._volume_dict(image, md)

    @_on_domain
    def volume_info(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> dict:
        image = self._image(sd_uuid, img_uuid)
        return self._volume_dict(image, image.volume(check_uuid(vol_uuid, "volumeID")))

    @_on_domain
    def delete_volume(self, sd_uuid: str, img_uuid: str, vol_uuid: str) -> None:
        """Idempotent: a volume already gone succeeds (the engine retries a
        delete it got no answer for), see Image.delete_volume."""
        image = self._image(sd_uuid, img_uuid)
        check_uuid(vol_uuid, "volumeID")
        self._refuse_if_held(sd_uuid, img_uuid)
        with self._image_lock(sd_uuid, img_uuid):
            with self._sole_writer(sd_uuid, img_uuid):
                image.delete_volume(vol_uuid,
                                    lambda vol: self.volume_in_use(sd_uuid, img_uuid, vol))

    @_on_domain
    def volume_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str) -> list[VolumeMetadata]:
        return self._image(sd_uuid, img_uuid).chain(check_uuid(leaf_uuid, "volumeID"))

    @_on_domain
    def prepare_leaf(self, sd_uuid: str, img_uuid: str, leaf_uuid: str) -> PreparedLeaf:
        """A new leaf a running VM's drive is to switch to (a live snapshot).
        Only this volume is read, its metadata and its qcow2 header: the chain
        below it is the one the VM runs already (prepare_image reads them all,
        one qemu-img process walking every volume of the chain)."""
        image = self._image(sd_uuid, img_uuid)
        self._refuse_if_held(sd_uuid, img_uuid)
        leaf = check_uuid(leaf_uuid, "volumeID")
        md = image.volume(leaf)
        if md.legality is not Legality.LEGAL:
            raise errors.PrepareIllegalVolume(f"image {img_uuid} has ILLEGAL volume(s) {leaf}")
        path = image.domain.volume_path(img_uuid, leaf)
        try:
            backing = qcow2.backing_volume(path) if md.format is VolFormat.COW else None
        except qcow2.NotQcow2 as e:
            raise errors.InvalidParameter(f"volume {leaf} is not a usable qcow2 image: {e}") \
                from None
        except FileNotFoundError:
            raise errors.ImageFileNotFound(f"volume {leaf} of image {img_uuid} has no data "
                                           "file") from None
        return PreparedLeaf(VolumeRef(sd_uuid, img_uuid, leaf, path), md.format.qemu, backing)

    @_on_domain
    def prepare_image(self, sd_uuid: str, img_uuid: str, leaf_uuid: str,
                      allow_illegal: bool = False) -> PreparedImage:
        """The chain a VM will run on, base first; refuses ILLEGAL volumes."""
        image = self._image(sd_uuid, img_uuid)
        self._refuse_if_held(sd_uuid, img_uuid)
        leaf = check_uuid(leaf_uuid, "volumeID")
        image.volume(leaf)
        # The qcow2 headers, not the metadata, are what QEMU will run: an
        # internal merge that finished on a host that died rewrote a backing
        # pointer the metadata may not know yet. Nothing is written here (the
        # VM's lease is not held yet); VM.synchronizeDisks fixes the metadata.
        chain = [image.volume(vol) for vol in self._qcow2_chain(image, leaf)]
        bad = [md.volume for md in chain if md.legality is not Legality.LEGAL]
        if bad and not allow_illegal:
            raise errors.PrepareIllegalVolume(
                f"image {img_uuid} has ILLEGAL volume(s) {', '.join(bad)}")
        dom = image.domain
        refs = [VolumeRef(sd_uuid, img_uuid, md.volume, dom.volume_path(img_uuid, md.volume))
                for md in chain]
        return PreparedImage(chain=refs, format=chain[-1].format.qemu)

    @_on_domain
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

    @_on_domain
    def finish_merge(self, sd_uuid: str, img_uuid: str, base: str, merged: list[str],
                     capacity: int, base_is_leaf: bool) -> None:
        image = self._image(sd_uuid, img_uuid)
        with self._image_lock(sd_uuid, img_uuid):
            image.finish_merge(base, merged, capacity, base_is_leaf)

    @_on_domain
    def reconcile_chain(self, sd_uuid: str, img_uuid: str, leaf_uuid: str) -> list[str]:
        """Offline repair of an image no VM runs (VDSM's reconcileVolumeChain):
        the chain is what the qcow2 headers say, walked from `leaf_uuid`;
        ILLEGAL volumes at its top are the marker of a pivot that happened
        (see Image.sync_chain, case 1), so they are dropped;
        then the metadata is synced to that chain. Returns it, base first."""
        image = self._image(sd_uuid, img_uuid)
        check_uuid(leaf_uuid, "leafVolID")
        self._refuse_if_held(sd_uuid, img_uuid)
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
        chain = StorageService._qcow2_chain(image, leaf_uuid)
        # Volumes marked ILLEGAL above a pivot's base: QEMU left them.
        while len(chain) > 1 and image.volume(chain[-1]).legality is Legality.ILLEGAL:
            chain.pop()
        case = image.sync_chain(leaf_uuid, chain)
        log.info("image %s: metadata synced to %s (%s)", img_uuid, chain, case)
        return chain

    @staticmethod
    def _qcow2_chain(image: Image, leaf_uuid: str) -> list[str]:
        """The chain the qcow2 headers give, walked from `leaf_uuid`, base
        first; every volume in it must have metadata in this image."""
        img_uuid = image.uuid
        infos = qemu_img.info(image.domain.volume_path(img_uuid, leaf_uuid),
                              backing_chain=True)
        chain = [os.path.basename(i["filename"]) for i in reversed(infos)]
        for vol in chain:
            if not image.domain.has_volume(img_uuid, check_uuid(vol, "backing file")):
                raise errors.ImageFileNotFound(
                    f"volume {vol} named in the qcow2 chain of {leaf_uuid} has no metadata")
        return chain

    @_on_domain
    def repair_after_merge(self, sd_uuid: str, img_uuid: str, walk_from: str, base: str,
                           merged: list[str], capacity: int) -> list[str]:
        """The storage work a merge job owes after its VM went away
        (storage/repairs.py): an offline reconcile from the job's leaf, then,
        if the merge happened, what its cleanup would have done. Refused
        (VolumeIsBusy) while a VM of this host runs any volume of the image."""
        self._refuse_if_run(self._image(sd_uuid, img_uuid))
        chain = self.reconcile_chain(sd_uuid, img_uuid, walk_from)
        gone = [v for v in merged if v not in chain]
        if gone and base in chain:
            self.finish_merge(sd_uuid, img_uuid, base, gone, capacity,
                              base_is_leaf=chain[-1] == base)
        return chain

    @_on_domain
    def repair_chain_sync(self, sd_uuid: str, img_uuid: str, walk_from: str,
                          leaf: str) -> list[str]:
        """The storage half of a VM.synchronizeDisks whose VM went away before
        it ran (storage/repairs.py). QEMU is gone, so the chain the VM ran is
        what the qcow2 headers say from its last leaf; the metadata walked
        from `walk_from`, the leaf the storage knew, is synced to it, as the
        VM's own repair would have done (Image.sync_chain). Refused
        (VolumeIsBusy) while a VM of this host runs any volume of the image:
        that VM owns the image then. Returns the chain, base first."""
        image = self._image(sd_uuid, img_uuid)
        check_uuid(walk_from, "walk_from")
        check_uuid(leaf, "leaf")
        self._refuse_if_held(sd_uuid, img_uuid)
        with self._image_lock(sd_uuid, img_uuid):
            self._refuse_if_run(image)
            with self._sole_writer(sd_uuid, img_uuid):
                chain = self._qcow2_chain(image, leaf)
                case = image.sync_chain(walk_from, chain)
        log.info("image %s: metadata synced from %s to %s (%s)", img_uuid, walk_from, chain,
                 case)
        return chain

    def _refuse_if_run(self, image: Image) -> None:
        sd_uuid, img_uuid = image.domain.uuid, image.uuid
        if any(self.volume_in_use(sd_uuid, img_uuid, v) for v in image.domain.volumes(img_uuid)):
            raise errors.VolumeIsBusy(f"image {img_uuid} is used by a running VM")

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
