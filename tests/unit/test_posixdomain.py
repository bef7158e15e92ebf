"""posixfs domains: formatting with the real `sanlock direct` tool (no daemon
needed), connect's checks, and volume leases. Joining lockspaces needs a sanlock
daemon per host: tests/integration/test_lab.py covers it."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from vmhost import errors
from vmhost.ids import BLANK_UUID
from vmhost.storage.image import Image
from vmhost.storage.metadata import Prealloc, VolFormat
from vmhost.storage.service import StorageService

MiB = 1 << 20


def read_leader(kind: str, spec: str) -> dict[str, str]:
    out = subprocess.run(["sanlock", "direct", "read_leader", kind, spec], check=True,
                         capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@pytest.fixture
def service(tmp_path):
    svc = StorageService(str(tmp_path / "state"), sanlock_host_id=3, sanlock_io_timeout=2)
    yield svc
    svc.stop()


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "shared"
    path.mkdir()
    return str(path)


def test_create_formats_the_lease_areas(service, root):
    sd = str(uuid.uuid4())
    info = service.create_domain(sd, 6, root, "shared")
    assert info["type"] == "posixfs"
    md = os.path.join(root, sd, "dom_md")
    assert sorted(os.listdir(md)) == ["ids", "leases", "metadata", "xleases"]
    with open(os.path.join(md, "metadata")) as f:
        assert json.load(f)["type"] == "posixfs"
    ids = read_leader("-s", f"{sd}:1:{md}/ids:0")
    assert (ids["space_name"], ids["io_timeout"]) == (sd, "2")
    sdm = read_leader("-r", f"{sd}:SDM:{md}/leases:{MiB}")
    assert sdm["resource_name"] == "SDM"
    lookup = subprocess.run(["sanlock", "direct", "lookup", "-x", f"{sd}:{md}/xleases:0"],
                            capture_output=True, text=True)
    assert lookup.returncode == 0, lookup.stderr
    # Registered as posixfs: a restarted service opens it as a shared domain again.
    again = StorageService(os.path.dirname(service._registry_path), sanlock_host_id=3)
    assert again.domain_info(sd)["type"] == "posixfs"


def test_a_host_without_host_id_cannot_create_or_connect(tmp_path, root):
    svc = StorageService(str(tmp_path / "state"))
    sd = str(uuid.uuid4())
    with pytest.raises(errors.AcquireHostIdFailure, match="--host-id"):
        svc.create_domain(sd, "posixfs", root, "shared")
    assert os.listdir(root) == []
    with pytest.raises(errors.AcquireHostIdFailure, match="--host-id"):
        svc.connect_domain(sd, 6, root)


def test_connect_checks_the_directory_holds_that_shared_domain(service, root, tmp_path):
    sd = str(uuid.uuid4())
    with pytest.raises(errors.StorageDomainDoesNotExist, match=sd):
        service.connect_domain(sd, 6, root)
    local = str(uuid.uuid4())
    service.create_domain(local, "localfs", root, "local")
    other = StorageService(str(tmp_path / "other"), sanlock_host_id=4)
    with pytest.raises(errors.InvalidParameter, match="localfs"):
        other.connect_domain(local, 6, root)
    with pytest.raises(errors.InvalidParameter, match="only posixfs"):
        other.connect_domain(local, "localfs", root)
    assert sd not in service.repo_stats() and local not in other.repo_stats()  # nothing registered


def test_volumes_on_a_shared_domain_have_leases(service, root):
    sd, img, vol = (str(uuid.uuid4()) for _ in range(3))
    service.create_domain(sd, 6, root, "shared")
    # Through the service, a shared image is changed only under its lease: no sanlock
    # daemon here, so no host id held, and a clear refusal.
    with pytest.raises(errors.AcquireHostIdFailure, match="not joined"):
        service.create_volume(sd, img, vol, 16 * MiB, "COW", src_img_uuid=BLANK_UUID)
    image = Image(service.domain(sd), img)
    image.create_volume(vol, 16 * MiB, VolFormat.COW, Prealloc.SPARSE, "DATA", "", None)
    lease = os.path.join(root, sd, "images", img, vol + ".lease")
    leader = read_leader("-r", f"{sd}:{vol}:{lease}:0")
    assert (leader["space_name"], leader["resource_name"]) == (sd, vol)
    image.delete_volume(vol)
    assert not os.path.exists(lease)
    assert not os.path.exists(os.path.dirname(lease))


def test_disconnect_forgets_the_domain_unless_a_vm_uses_it(service, root, tmp_path):
    sd, img, vol = (str(uuid.uuid4()) for _ in range(3))
    service.create_domain(sd, 6, root, "shared")
    Image(service.domain(sd), img).create_volume(vol, 16 * MiB, VolFormat.COW, Prealloc.SPARSE,
                                                 "DATA", "", None)
    service.volume_in_use = lambda s, i, v: (s, i, v) == (sd, img, vol)
    with pytest.raises(errors.StorageDomainDetachError, match=vol):
        service.disconnect_domain(sd)
    assert sd in service.repo_stats()
    service.volume_in_use = lambda s, i, v: False
    service.disconnect_domain(sd)
    assert sd not in service.repo_stats()
    with pytest.raises(errors.StorageDomainDoesNotExist):
        service.domain_info(sd)
    assert os.path.exists(os.path.join(root, sd, "dom_md", "ids"))      # the storage stays
    restarted = StorageService(os.path.dirname(service._registry_path), sanlock_host_id=3)
    assert sd not in restarted.repo_stats()
    local = str(uuid.uuid4())
    service.create_domain(local, 4, root, "local")
    with pytest.raises(errors.InvalidParameter, match="only posixfs"):
        service.disconnect_domain(local)
