"""File storage domain: a directory tree on a local or shared filesystem.

    <root>/<sdUUID>/dom_md/metadata
    <root>/<sdUUID>/images/<imgUUID>/<volUUID>        (qcow2 or raw data)
    <root>/<sdUUID>/images/<imgUUID>/<volUUID>.meta   (VolumeMetadata)
    <root>/<sdUUID>/jobs/<jobUUID>.json               (storage job records)
"""
from __future__ import annotations

import json
import os

from vmhost import errors
from vmhost.fsutil import atomic_write, fsync_dir, unlink_durable
from vmhost.ids import check_uuid, is_uuid
from vmhost.storage import qemu_img
from vmhost.storage.domain import DomainManifest, StorageDomain, VolumeSize
from vmhost.storage.metadata import MetadataError, Prealloc, VolumeMetadata

DOMAIN_TYPE = "localfs"
META_SUFFIX = ".meta"


class FileStorageDomain(StorageDomain):
    domain_type = DOMAIN_TYPE

    def __init__(self, manifest: DomainManifest):
        self.manifest = manifest
        self._dir = os.path.join(manifest.path, manifest.uuid)

    # --- life cycle ---------------------------------------------------

    @classmethod
    def create(cls, root: str, sd_uuid: str, name: str, **format_args) -> "FileStorageDomain":
        check_uuid(sd_uuid, "storagedomainID")
        if not os.path.isabs(root):
            raise errors.StorageDomainCreationError(f"typeArgs must be an absolute path, got {root!r}")
        if not os.path.isdir(root):
            raise errors.StorageDomainCreationError(f"{root} is not an existing directory")
        sd_dir = os.path.join(root, sd_uuid)
        if os.path.exists(sd_dir):
            raise errors.StorageDomainAlreadyExists(f"{sd_dir} already exists")
        manifest = DomainManifest(uuid=sd_uuid, name=name, type=cls.domain_type, path=root)
        os.makedirs(os.path.join(sd_dir, "images"), mode=0o755)
        os.makedirs(os.path.join(sd_dir, "dom_md"), mode=0o755)
        fsync_dir(sd_dir)
        fsync_dir(root)
        dom = cls(manifest)
        dom._format(**format_args)
        # Written last: a domain is complete once its metadata exists.
        atomic_write(dom.metadata_probe_path(), json.dumps({
            "uuid": sd_uuid, "name": name, "type": cls.domain_type, "version": manifest.version,
        }).encode() + b"\n")
        return dom

    def _format(self) -> None:
        """What a domain type adds to dom_md/ before its metadata (leases, for shared types)."""

    # --- paths ----------------------------------------------------------

    def _image_dir(self, img: str) -> str:
        return os.path.join(self._dir, "images", check_uuid(img, "imageID"))

    def volume_path(self, img: str, vol: str) -> str:
        return os.path.join(self._image_dir(img), check_uuid(vol, "volumeID"))

    def _meta_path(self, img: str, vol: str) -> str:
        return self.volume_path(img, vol) + META_SUFFIX

    def metadata_probe_path(self) -> str:
        return os.path.join(self._dir, "dom_md", "metadata")

    def jobs_dir(self) -> str:
        return os.path.join(self._dir, "jobs")

    # --- queries ----------------------------------------------------------

    def images(self) -> list[str]:
        try:
            names = os.listdir(os.path.join(self._dir, "images"))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_uuid(n))

    def volumes(self, img: str) -> list[str]:
        try:
            names = os.listdir(self._image_dir(img))
        except FileNotFoundError:
            return []
        return sorted(n[: -len(META_SUFFIX)] for n in names
                      if n.endswith(META_SUFFIX) and is_uuid(n[: -len(META_SUFFIX)]))

    def has_volume(self, img: str, vol: str) -> bool:
        return os.path.exists(self._meta_path(img, vol))

    def read_metadata(self, img: str, vol: str) -> VolumeMetadata:
        path = self._meta_path(img, vol)
        try:
            with open(path, "rb") as f:
                data = f.read(64 * 1024)
        except FileNotFoundError:
            raise errors.ImageFileNotFound(
                f"volume {vol} of image {img} not found on domain {self.uuid}") from None
        try:
            md = VolumeMetadata.parse(data)
        except MetadataError as e:
            raise errors.VolumeMetadataReadError(f"{path}: {e}") from None
        if (md.domain, md.image, md.volume) != (self.uuid, img, vol):
            raise errors.VolumeMetadataReadError(f"{path}: metadata names another volume")
        return md

    def write_metadata(self, md: VolumeMetadata) -> None:
        self._ensure_image_dir(md.image)
        atomic_write(self._meta_path(md.image, md.volume), md.dump())

    def size(self, img: str, vol: str) -> VolumeSize:
        try:
            st = os.stat(self.volume_path(img, vol))
        except FileNotFoundError:
            return VolumeSize(0, 0)
        return VolumeSize(apparent=st.st_size, true=st.st_blocks * 512)

    def free_space(self) -> tuple[int, int]:
        st = os.statvfs(self._dir)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    # --- changes ------------------------------------------------------------

    def allocate(self, md: VolumeMetadata, parent: VolumeMetadata | None,
                 prealloc: Prealloc) -> None:
        img_dir = self._ensure_image_dir(md.image)
        path = self.volume_path(md.image, md.volume)
        mode = None
        if prealloc is Prealloc.PREALLOCATED:
            mode = "metadata" if md.format.qemu == "qcow2" else "falloc"
        qemu_img.create(
            path, md.format.qemu, size=md.capacity,
            backing=parent.volume if parent else None,
            backing_fmt=parent.format.qemu if parent else None,
            preallocation=mode,
        )
        # QEMU runs as another user; it needs to open the file and its directory.
        os.chmod(path, 0o660)
        fsync_dir(img_dir)

    def _ensure_image_dir(self, img: str) -> str:
        img_dir = self._image_dir(img)
        if not os.path.isdir(img_dir):
            os.makedirs(img_dir, mode=0o755, exist_ok=True)
            fsync_dir(os.path.dirname(img_dir))
        return img_dir

    def remove(self, img: str, vol: str) -> None:
        unlink_durable(self.volume_path(img, vol))
        unlink_durable(self._meta_path(img, vol))
        img_dir = self._image_dir(img)
        try:
            os.rmdir(img_dir)  # only succeeds when the image is empty
            fsync_dir(os.path.dirname(img_dir))
        except OSError:
            pass


