"""posixfs: a file domain on storage that several hosts share (VDSM's type 6).

The localfs layout plus sanlock's areas, as VDSM lays out a file domain:

    <root>/<sdUUID>/dom_md/metadata   written last: the domain is complete once it exists
    <root>/<sdUUID>/dom_md/ids        the lockspace, named after the domain UUID: one delta
                                      lease per host id (1-2000), io_timeout recorded in it
    <root>/<sdUUID>/dom_md/leases     slot 1 (offset 1 MiB): the SDM lease, as VDSM's
    <root>/<sdUUID>/dom_md/xleases    VM leases: a sanlock resource index at offset 0, so
                                      several hosts can create leases in it at once
    <root>/<sdUUID>/images/<img>/<vol>.lease   each volume's lease (resource = volume UUID)

A host joins the lockspace with its sanlock host id (`vmhost serve --host-id`);
the join is asynchronous (a few io_timeouts), so it never delays the API. Lease
files are sparse; sanlock's daemon (root, or the sanlock group) reads and
writes them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import time

from vmhost import errors
from vmhost.fsutil import fsync_dir, unlink_durable
from vmhost.ids import check_uuid
from vmhost.storage import sanlock_adapter as sanlock
from vmhost.storage.domain import DomainManifest
from vmhost.storage.filedomain import FileStorageDomain
from vmhost.storage.metadata import Prealloc, VolumeMetadata

DOMAIN_TYPE = "posixfs"
MiB = sanlock.MiB
SDM_RESOURCE = "SDM"
SDM_OFFSET = 1 * MiB
LEASES_SIZE = 2 * MiB
XLEASES_SIZE = 1024 * MiB     # sparse; room for ~1000 VM leases
LEASE_SUFFIX = ".lease"
INDEX_RETRY_SECONDS = 30.0


class PosixStorageDomain(FileStorageDomain):
    domain_type = DOMAIN_TYPE

    @classmethod
    def create(cls, root: str, sd_uuid: str, name: str, io_timeout: int = 10,
               **_) -> "PosixStorageDomain":
        try:
            return super().create(root, sd_uuid, name, io_timeout=io_timeout)
        except sanlock.SanlockError as e:
            # No metadata was written, so nothing knows this half-made domain: remove it,
            # so that a retry can create it.
            shutil.rmtree(os.path.join(root, sd_uuid), ignore_errors=True)
            raise errors.StorageDomainCreationError(f"formatting leases failed: {e}") from None

    def _format(self, io_timeout: int = 10) -> None:
        ids, leases, xleases = self.ids_path, self._md_path("leases"), self._md_path("xleases")
        for path, size in ((ids, sanlock.LEASE_SIZE), (leases, LEASES_SIZE),
                           (xleases, XLEASES_SIZE)):
            _sparse_file(path, size)
        sanlock.init_lockspace(self.uuid, ids, io_timeout)
        sanlock.init_resource(self.uuid, SDM_RESOURCE, leases, SDM_OFFSET)
        sanlock.format_index(self.uuid, xleases)
        fsync_dir(os.path.dirname(ids))

    @classmethod
    def open_existing(cls, root: str, sd_uuid: str) -> "PosixStorageDomain":
        """The posixfs domain sd_uuid under root, as another host created it."""
        check_uuid(sd_uuid, "storagedomainID")
        if not os.path.isabs(root):
            raise errors.InvalidParameter(f"typeArgs must be an absolute path, got {root!r}")
        probe = cls(DomainManifest(uuid=sd_uuid, name="", type=DOMAIN_TYPE, path=root))
        try:
            with open(probe.metadata_probe_path(), "rb") as f:
                md = json.loads(f.read(64 * 1024))
        except (OSError, ValueError) as e:
            raise errors.StorageDomainDoesNotExist(
                f"{root} holds no readable domain {sd_uuid}: {e}") from None
        if not isinstance(md, dict) or md.get("uuid") != sd_uuid:
            raise errors.StorageDomainDoesNotExist(f"{probe.metadata_probe_path()} names "
                                                   f"another domain")
        if md.get("type") != DOMAIN_TYPE:
            raise errors.InvalidParameter(f"domain {sd_uuid} is of type {md.get('type')!r}, not "
                                          f"{DOMAIN_TYPE!r}: only shared domains can be connected")
        if not os.path.exists(probe.ids_path):
            raise errors.StorageDomainDoesNotExist(f"domain {sd_uuid} has no lockspace "
                                                   f"({probe.ids_path})")
        return cls(DomainManifest(uuid=sd_uuid, name=str(md.get("name", "")), type=DOMAIN_TYPE,
                                  path=root, version=int(md.get("version", 1))))

    # --- the lockspace --------------------------------------------------

    @property
    def ids_path(self) -> str:
        return self._md_path("ids")

    def _md_path(self, name: str) -> str:
        return os.path.join(os.path.dirname(self.metadata_probe_path()), name)

    def join(self, host_id: int, io_timeout: int) -> None:
        """Start acquiring host_id in the domain's lockspace (idempotent, returns at once)."""
        try:
            sanlock.add_lockspace(self.uuid, host_id, self.ids_path, io_timeout)
        except sanlock.SanlockError as e:
            raise errors.AcquireHostIdFailure(f"domain {self.uuid}, host id {host_id}: {e}") \
                from None

    def acquired(self, host_id: int) -> bool:
        try:
            return sanlock.inq_lockspace(self.uuid, host_id, self.ids_path) is True
        except sanlock.SanlockError:
            return False

    def joining(self, host_id: int) -> bool:
        """Whether the daemon is busy adding (or removing) the host id."""
        try:
            return sanlock.inq_lockspace(self.uuid, host_id, self.ids_path) is None
        except sanlock.SanlockError:
            return False

    def leave(self, host_id: int) -> None:
        try:
            sanlock.rem_lockspace(self.uuid, host_id, self.ids_path)
        except sanlock.SanlockError as e:
            raise errors.ReleaseHostIdFailure(f"domain {self.uuid}, host id {host_id}: {e}") \
                from None

    # --- VM leases (xleases) ------------------------------------------------

    @property
    def xleases_path(self) -> str:
        return self._md_path("xleases")

    def find_lease(self, lease_id: str) -> int | None:
        """Offset of a VM lease in xleases, or None. Needs the lockspace joined."""
        return self._index(sanlock.index_lookup, lease_id)

    def create_lease(self, lease_id: str) -> int:
        """The lease's offset, creating it if needed. Lookup and create happen under the
        SDM lease (VDSM's rule: one writer of the lease index at a time), so two hosts
        creating the same lease at once end with one entry."""
        found = self.find_lease(lease_id)
        if found is not None:
            return found

        def lookup_or_create() -> int:
            again = self.find_lease(lease_id)
            return again if again is not None else self._index(sanlock.index_create, lease_id)
        return self._as_sdm(lookup_or_create)

    def delete_lease(self, lease_id: str) -> bool:
        """Remove the lease from the index. Returns whether there was one."""
        offset = self.find_lease(lease_id)
        if offset is None:
            return False
        self._as_sdm(lambda: self._index(sanlock.index_delete, lease_id, offset))
        return True

    def _as_sdm(self, work):
        """Run work holding the domain's SDM lease; another host holding it makes us
        retry (it holds it only for an index change)."""
        leases = self._md_path("leases")

        def attempt():
            with sanlock.holding(self.uuid, SDM_RESOURCE, leases, SDM_OFFSET):
                return work()
        return _retry_contended(attempt, f"SDM lease of {self.uuid}")

    def check_free(self, name: str, offset: int, host_id: int) -> None:
        """Refuse (651) at once if another host holds the lease in xleases at offset and is
        not known dead. (Acquiring it would make sanlock wait, up to the holder's expiry,
        when the holder stopped renewing.)"""
        try:
            owners = sanlock.lease_owners(self.uuid, name, self.xleases_path, offset)
            states = {o: sanlock.host_state(self.uuid, o) for o in owners if o != host_id}
        except sanlock.SanlockError as e:
            raise errors.GeneralError(f"lease {name} on {self.uuid}: {e}") from None
        for owner, (state, io_timeout) in states.items():
            if state not in ("dead", "free"):
                expiry = (f"{sanlock.host_dead_seconds(io_timeout)} s" if io_timeout
                          else "8 x io_timeout + 60 s")
                raise errors.AcquireLockFailure(
                    f"lease {name} on {self.uuid} is held by another host (host id {owner}, "
                    f"{state}); a dead host's leases expire {expiry} after its last renewal")

    @contextlib.contextmanager
    def image_lease(self, img: str, host_id: int):
        """Hold the image's lease (a VM running the image holds it through its QEMU), so
        that only one host at a time changes the image's volumes and metadata."""
        held = self.acquire_image_lease(img, host_id)
        try:
            yield
        finally:
            self.release_image_lease(held)

    def acquire_image_lease(self, img: str, host_id: int) -> sanlock.Held:
        """The image's lease, held by this process until release_image_lease (or its
        death: sanlock then releases it). 651 while another host holds it."""
        offset = self.create_lease(img)
        self.check_free(img, offset, host_id)
        try:
            return sanlock.acquire(self.uuid, img, self.xleases_path, offset)
        except sanlock.SanlockError as e:
            if e.errno in sanlock.CONTENDED:
                raise errors.AcquireLockFailure(
                    f"image {img}: its lease is held by another host: {e}") from None
            if e.errno == errno.EEXIST:
                raise errors.VolumeIsBusy(f"image {img}: its lease is held by another process "
                                          f"of this host (a VM running the image): {e}") from None
            raise errors.GeneralError(f"image {img} lease on {self.uuid}: {e}") from None

    def release_image_lease(self, held: sanlock.Held) -> None:
        try:
            sanlock.release(held)
        except sanlock.SanlockError as e:
            raise errors.GeneralError(f"image {held.resource} lease on {self.uuid}: {e}") \
                from None

    def _index(self, call, lease_id: str, *args):
        """One index operation; the daemon holds the index's own paxos lease meanwhile,
        so a host changing the index at the same moment makes us retry."""
        check_uuid(lease_id, "lease_id")
        return _retry_contended(lambda: call(self.uuid, self.xleases_path, lease_id, *args),
                                f"VM lease {lease_id} on {self.uuid}")

    # --- volume leases ----------------------------------------------------

    def lease_path(self, img: str, vol: str) -> str:
        return self.volume_path(img, vol) + LEASE_SUFFIX

    def allocate(self, md: VolumeMetadata, parent: VolumeMetadata | None,
                 prealloc: Prealloc) -> None:
        super().allocate(md, parent, prealloc)
        path = self.lease_path(md.image, md.volume)
        _sparse_file(path, sanlock.LEASE_SIZE)
        sanlock.init_resource(self.uuid, md.volume, path, 0)

    def remove(self, img: str, vol: str) -> None:
        unlink_durable(self.lease_path(img, vol))
        super().remove(img, vol)


def _retry_contended(attempt, what: str):
    """attempt(), again while a short-held lease is CONTENDED by another host."""
    deadline = time.monotonic() + INDEX_RETRY_SECONDS
    while True:
        try:
            return attempt()
        except sanlock.SanlockError as e:
            if e.errno not in sanlock.CONTENDED or time.monotonic() > deadline:
                raise errors.GeneralError(f"{what}: {e}") from None
        time.sleep(random.uniform(0.05, 0.5))   # desynchronise the contending hosts


def _sparse_file(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
