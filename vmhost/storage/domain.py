"""The storage domain interface.

A domain type (file now, LVM block later) implements only the primitives that
differ between storage kinds: where a volume lives, how its bytes and its
metadata are stored. Chain logic (vmhost.storage.image) is written once on
top of this interface.
"""
from __future__ import annotations

import abc
import dataclasses

from vmhost.storage.metadata import Prealloc, VolumeMetadata


@dataclasses.dataclass(frozen=True)
class DomainManifest:
    uuid: str
    name: str
    type: str          # "localfs" (later "lvm")
    path: str          # where the domain lives (a directory for file domains)
    version: int = 1


@dataclasses.dataclass(frozen=True)
class VolumeSize:
    apparent: int      # bytes the file (or LV) occupies logically
    true: int          # bytes allocated on the storage


class StorageDomain(abc.ABC):
    manifest: DomainManifest

    @property
    def uuid(self) -> str:
        return self.manifest.uuid

    @abc.abstractmethod
    def volume_path(self, img: str, vol: str) -> str:
        """Path QEMU opens for a volume."""

    @abc.abstractmethod
    def metadata_probe_path(self) -> str:
        """A small file the domain monitor reads to prove the domain answers."""

    @abc.abstractmethod
    def jobs_dir(self) -> str:
        """Directory on the domain for the records of storage jobs
        (vmhost.storage.coldmerge): any host that sees the domain finds them."""

    @abc.abstractmethod
    def images(self) -> list[str]:
        """Image UUIDs present on the domain."""

    @abc.abstractmethod
    def volumes(self, img: str) -> list[str]:
        """Volume UUIDs of an image (those with metadata)."""

    @abc.abstractmethod
    def has_volume(self, img: str, vol: str) -> bool:
        ...

    @abc.abstractmethod
    def read_metadata(self, img: str, vol: str) -> VolumeMetadata:
        """Raises ImageFileNotFound if the volume is unknown."""

    @abc.abstractmethod
    def write_metadata(self, md: VolumeMetadata) -> None:
        """Replace a volume's metadata atomically and durably."""

    @abc.abstractmethod
    def allocate(self, md: VolumeMetadata, parent: VolumeMetadata | None,
                 prealloc: Prealloc) -> None:
        """Create the volume's data (file or LV) for md; parent, when given,
        becomes its backing file, named relatively (just the parent's UUID)."""

    @abc.abstractmethod
    def remove(self, img: str, vol: str) -> None:
        """Remove a volume's data and metadata; tolerates a half-removed volume."""

    @abc.abstractmethod
    def size(self, img: str, vol: str) -> VolumeSize:
        ...

    @abc.abstractmethod
    def free_space(self) -> tuple[int, int]:
        """(total bytes, free bytes)."""
