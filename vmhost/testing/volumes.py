"""Volumes made through the API, as an engine makes them."""
from __future__ import annotations

import uuid

from vmhost.client import Client
from vmhost.ids import BLANK_UUID

MiB = 1 << 20


def create_volume(client: Client, sd: str, img: str, *, vol: str | None = None,
                  parent: str | None = None, size: int = 64 * MiB, fmt: str = "COW",
                  desc: str = "test") -> str:
    """A sparse volume in image `img` (on top of `parent` in the same image,
    or a new base); returns its id."""
    vol = vol or str(uuid.uuid4())
    client.call("Volume.create", storagedomainID=sd, imageID=img, volumeID=vol, size=size,
                volFormat=fmt, preallocate="SPARSE", diskType="DATA", desc=desc,
                srcImgUUID=img if parent else BLANK_UUID, srcVolUUID=parent or BLANK_UUID)
    return vol
