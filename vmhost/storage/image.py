"""Chain logic of one image, written once for every domain type.

The storage view of a chain is the parent pointers in volume metadata; the
leaf is the volume no other live volume names as its parent.

Merged-away volumes. When a merge finished (the chain QEMU runs proves it),
finish_merge marks each volume merged into the base ILLEGAL *and* writes the
base's UUID into its MERGED key. Such a volume (`VolumeMetadata.merged_away`)
is in no chain: the engine deletes it later or never, so it never counts as
anyone's child (a snapshot on the base, the voltype of its parent, deleting
its parent) and deleting it changes no live volume. The rule is exact
because only finish_merge writes MERGED; every other ILLEGAL volume is still
a child of its parent:
- a volume being created (ILLEGAL until complete): it may become the leaf;
- the leaf marked by sync_chain case 1 while a pivot is not yet proven: it
  may hold the newest guest data (and it is in use, so deleting it is refused);
- a leaf left ILLEGAL by an aborted or failed merge, until a sync repairs it.
Making a volume LEGAL again clears its MERGED key.

Voltypes are derived: a volume with a child is INTERNAL, one without is a
LEAF (SHARED stays SHARED). A crash may leave a voltype stale (Volume.delete
dies between removing the files and fixing the parent); nothing trusts it:
a snapshot asks whether the parent has a child, and every delete (also of a
volume already gone) recomputes the voltypes of the image, so a retry
converges.
"""
from __future__ import annotations

import logging
from typing import Callable

from vmhost import errors, failpoints
from vmhost.ids import BLANK_UUID
from vmhost.storage.domain import StorageDomain
from vmhost.storage.metadata import (Legality, Prealloc, VolFormat, VolType,
                                     VolumeMetadata)

log = logging.getLogger(__name__)


class Image:
    def __init__(self, domain: StorageDomain, img: str):
        self.domain = domain
        self.uuid = img

    def volume(self, vol: str) -> VolumeMetadata:
        return self.domain.read_metadata(self.uuid, vol)

    def all_volumes(self) -> list[VolumeMetadata]:
        return [self.volume(v) for v in self.domain.volumes(self.uuid)]

    def children(self, vol: str) -> list[str]:
        """Volumes naming `vol` as parent, merged-away ones excepted."""
        return [md.volume for md in self.all_volumes()
                if md.parent == vol and not md.merged_away]

    def chain(self, leaf: str) -> list[VolumeMetadata]:
        """Volumes from base to leaf following metadata parent pointers."""
        chain: list[VolumeMetadata] = []
        seen: set[str] = set()
        vol = leaf
        while vol != BLANK_UUID:
            if vol in seen:
                raise errors.VolumeMetadataReadError(
                    f"image {self.uuid}: parent pointers loop at volume {vol}")
            seen.add(vol)
            md = self.volume(vol)
            chain.append(md)
            vol = md.parent
        chain.reverse()
        return chain

    # --- changes ----------------------------------------------------------

    def create_volume(self, vol: str, size: int, fmt: VolFormat, prealloc: Prealloc,
                      disktype: str, description: str, parent_vol: str | None) -> VolumeMetadata:
        if self.domain.has_volume(self.uuid, vol):
            raise errors.VolumeAlreadyExists(f"volume {vol} exists in image {self.uuid}")
        parent = self._snapshot_parent(parent_vol, fmt, size) if parent_vol else None
        md = VolumeMetadata(
            domain=self.domain.uuid, image=self.uuid, volume=vol,
            parent=parent.volume if parent else BLANK_UUID, format=fmt,
            voltype=VolType.LEAF, legality=Legality.ILLEGAL,
            capacity=max(size, parent.capacity if parent else 0),
            prealloc=prealloc, disktype=disktype, description=description,
        )
        # ILLEGAL until complete: a crash in between leaves a volume that is
        # plainly not usable and that Volume.delete removes.
        self.domain.write_metadata(md)
        try:
            self.domain.allocate(md, parent, prealloc)
        except Exception as e:
            log.exception("creating volume %s failed", vol)
            self.domain.remove(self.uuid, vol)
            raise errors.VolumeCreationError(f"volume {vol}: {e}") from None
        if parent is not None:
            self.domain.write_metadata(parent.replace(voltype=VolType.INTERNAL,
                                                      generation=parent.generation + 1))
        md = md.replace(legality=Legality.LEGAL)
        self.domain.write_metadata(md)
        return md

    def _snapshot_parent(self, parent_vol: str, fmt: VolFormat, size: int) -> VolumeMetadata:
        parent = self.volume(parent_vol)
        if fmt is not VolFormat.COW:
            raise errors.InvalidParameter("volFormat must be COW for a volume with a parent")
        if parent.legality is not Legality.LEGAL:
            raise errors.InvalidParameter(f"parent volume {parent_vol} is ILLEGAL")
        # Its children decide, not its voltype: an INTERNAL volume without a
        # child is a leaf whose voltype a crashed delete did not fix yet.
        kids = self.children(parent_vol)
        if kids:
            raise errors.InvalidParameter(f"parent volume {parent_vol} is not a leaf: "
                                          f"it already has a child ({', '.join(kids)})")
        if size < parent.capacity:
            raise errors.InvalidParameter(
                f"size {size} is smaller than the parent's capacity {parent.capacity}")
        return parent

    def check_no_children(self, vol: str) -> None:
        kids = self.children(vol)
        if kids:
            raise errors.VolumeImageHasChildren(f"volume {vol} is the parent of {', '.join(kids)}")

    def delete_volume(self, vol: str, in_use: Callable[[str], bool] = lambda vol: False) -> None:
        """Idempotent: a volume already gone (a retry after a crash) is no
        error, and the voltypes a crash left stale are fixed either way.
        Refuses a volume with a child (204), then one `in_use` (203)."""
        if self.domain.has_volume(self.uuid, vol):
            self.check_no_children(vol)
            if in_use(vol):
                raise errors.VolumeIsBusy(f"volume {vol} is used by a running VM")
            self.domain.remove(self.uuid, vol)
            failpoints.hit("storage.delete.files_removed")
        else:
            log.info("image %s: volume %s is already gone", self.uuid, vol)
        self._recompute_voltypes()

    def _recompute_voltypes(self) -> None:
        volumes = self.all_volumes()
        parents = {md.parent for md in volumes if not md.merged_away}
        for md in volumes:
            if md.merged_away or md.voltype is VolType.SHARED:
                continue    # garbage of no chain; a template stays one
            want = VolType.INTERNAL if md.volume in parents else VolType.LEAF
            if md.voltype is not want:
                log.info("image %s: volume %s becomes %s", self.uuid, md.volume, want.value)
                self.domain.write_metadata(md.replace(voltype=want,
                                                      generation=md.generation + 1))

    # --- chain repair -------------------------------------------------------

    def sync_chain(self, leaf: str, actual: list[str]) -> str:
        """Make metadata agree with `actual`, the chain QEMU runs (base first).

        VDSM's four cases, idempotent, walking the storage chain from `leaf`:
        1. the leaf is not in `actual` (a pivot is about to happen or
           happened): the volumes above the last one of `actual` (just the
           leaf when top is merged into its parent) become ILLEGAL, so that no
           VM starts on them and an offline reconcile drops them; nothing else
           is touched;
        2. internal volumes are missing (merged away): each volume of `actual`
           gets its parent pointer from `actual`;
        3. nothing is missing and a volume is ILLEGAL (a pivot failed): LEGAL;
        4. otherwise nothing to do.
        Returns the case applied, for logs and the API.
        """
        chain = self.chain(leaf)
        ids = [md.volume for md in chain]
        unknown = [v for v in actual if v not in ids]
        if unknown or not actual:
            raise errors.InvalidParameter(
                f"image {self.uuid}: live chain {actual} is not part of the storage chain "
                f"of {leaf}")
        if leaf not in actual:
            for md in chain[ids.index(actual[-1]) + 1:]:
                self._set_legality(md, Legality.ILLEGAL)
            return "leaf-missing"
        if len(actual) < len(ids):
            for i, vol in enumerate(actual):
                want = actual[i - 1] if i else chain[0].parent
                md = self.volume(vol)
                if md.parent != want:
                    self.domain.write_metadata(md.replace(parent=want,
                                                          generation=md.generation + 1))
            return "internal-missing"
        illegal = [md for md in chain if md.legality is Legality.ILLEGAL]
        for md in illegal:
            self._set_legality(md, Legality.LEGAL)
        return "illegal-restored" if illegal else "in-sync"

    def finish_merge(self, base: str, merged: list[str], capacity: int, base_is_leaf: bool) -> None:
        """After a merge the chain proves done: the base holds the data (and
        the capacity) of what was merged into it; merged-away volumes become
        ILLEGAL and MERGED into the base (see the module docstring), so
        Volume.delete can remove them and they are nobody's child. Idempotent."""
        md = self.volume(base)
        want = md.replace(capacity=max(md.capacity, capacity),
                          voltype=VolType.LEAF if base_is_leaf else md.voltype)
        if md.voltype is VolType.SHARED:
            want = want.replace(voltype=VolType.SHARED)
        if want != md:
            self.domain.write_metadata(want.replace(generation=md.generation + 1))
        for vol in merged:
            if self.domain.has_volume(self.uuid, vol):
                self._set_legality(self.volume(vol), Legality.ILLEGAL, merged_into=base)

    def _set_legality(self, md: VolumeMetadata, legality: Legality,
                      merged_into: str = "") -> None:
        """ILLEGAL keeps a MERGED key unless given one; LEGAL clears it."""
        if legality is Legality.ILLEGAL:
            merged_into = merged_into or md.merged_into
        if (md.legality, md.merged_into) != (legality, merged_into):
            self.domain.write_metadata(md.replace(legality=legality, merged_into=merged_into,
                                                  generation=md.generation + 1))
