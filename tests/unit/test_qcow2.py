"""The in-process qcow2 header reader against what qemu-img writes and reads."""
from __future__ import annotations

import struct

import pytest

from vmhost.storage import qcow2, qemu_img

MiB = 1 << 20


@pytest.mark.parametrize("backing", [None, "parent-volume", "/abs/dir/parent-volume"])
def test_backing_file_is_what_qemu_img_reads(tmp_path, backing):
    if backing is not None:
        parent = tmp_path / "parent-volume"
        qemu_img.create(str(parent), "qcow2", size=MiB)
        if backing.startswith("/"):
            backing = str(parent)
    path = str(tmp_path / "leaf")
    qemu_img.create(path, "qcow2", size=MiB, backing=backing)
    assert qcow2.backing_file(path) == qemu_img.info(path).get("backing-filename")
    assert qcow2.backing_volume(path) == (None if backing is None else "parent-volume")


def damaged(tmp_path, offset: int, size: int, total: int = 4096):
    path = tmp_path / "bad"
    head = struct.pack(">4sIQI", qcow2.MAGIC, 3, offset, size)
    path.write_bytes(head + b"\0" * (total - len(head)))
    return str(path)


@pytest.mark.parametrize("make, why", [
    (lambda t: str(t / "raw"), "not a qcow2 image"),
    (lambda t: damaged(t, offset=4090, size=100), "past the end"),
    (lambda t: damaged(t, offset=512, size=5000), "backing file name of 5000 bytes"),
])
def test_what_is_not_a_usable_header_is_refused_by_name(tmp_path, make, why):
    qemu_img.create(str(tmp_path / "raw"), "raw", size=MiB)
    with pytest.raises(qcow2.NotQcow2, match=why):
        qcow2.backing_file(make(tmp_path))


def test_a_file_shorter_than_a_header_is_refused(tmp_path):
    (tmp_path / "tiny").write_bytes(b"QFI")
    with pytest.raises(qcow2.NotQcow2, match="too short"):
        qcow2.backing_file(str(tmp_path / "tiny"))
