"""What a qcow2 header says about its backing file, read in-process.

`qemu-img info --backing-chain` opens every volume of a chain (tens of ms for
a long one); a caller that needs one volume's backing file only reads the
first bytes of that volume. The header layout (QEMU's docs/interop/qcow2.txt,
big-endian): magic "QFI\\xfb", version (2 or 3), backing_file_offset (u64),
backing_file_size (u32); the name is not NUL-terminated.
"""
from __future__ import annotations

import os
import struct

MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQI")
# QEMU refuses longer backing file names (block/qcow2.c: 1023 bytes).
MAX_BACKING_NAME = 1023


class NotQcow2(ValueError):
    pass


def backing_file(path: str) -> str | None:
    """The backing file name as written in the header (None if it has none).
    Raises NotQcow2 for a file that is not a qcow2 image, or whose header is
    damaged (a name past the end of the file, too long, not UTF-8)."""
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise NotQcow2(f"{path}: too short for a qcow2 header")
        magic, version, offset, size = _HEADER.unpack(head)
        if magic != MAGIC or version not in (2, 3):
            raise NotQcow2(f"{path}: not a qcow2 image (magic {magic!r}, version {version})")
        if offset == 0:
            return None
        if size == 0 or size > MAX_BACKING_NAME:
            raise NotQcow2(f"{path}: backing file name of {size} bytes")
        f.seek(offset)
        name = f.read(size)
    if len(name) != size:
        raise NotQcow2(f"{path}: backing file name past the end of the file")
    try:
        return name.decode()
    except UnicodeDecodeError:
        raise NotQcow2(f"{path}: backing file name is not UTF-8") from None


def backing_volume(path: str) -> str | None:
    """The backing file's volume id: the last part of its name (our volumes
    name their parent relative to the image's directory)."""
    name = backing_file(path)
    return None if name is None else os.path.basename(name)
