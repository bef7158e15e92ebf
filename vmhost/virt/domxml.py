"""Domain XML: build it for a new VM, and read the live chain back.

The live XML is the agent's window on what QEMU really runs: each disk's
chain (with libvirt's node indexes, used to address base/top in block jobs)
and the `<mirror>` element of a running block job.
"""
from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

METADATA_NS = "https://vmhost.dev/xmlns/vm/1"
METADATA_KEY = "vmhost"


@dataclasses.dataclass(frozen=True)
class ChainNode:
    path: str
    index: int | None          # libvirt's node index; a runtime handle, never persisted
    format: str

    @property
    def volume(self) -> str:
        # Volumes are files named by their UUID in every domain type we have.
        return os.path.basename(self.path)


@dataclasses.dataclass(frozen=True)
class Mirror:
    job: str                   # "active-commit", "copy", ...
    ready: bool


@dataclasses.dataclass(frozen=True)
class LiveDisk:
    target: str                # "vda"
    chain: list[ChainNode]     # base first
    mirror: Mirror | None


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    target: str
    path: str                  # the leaf
    format: str                # qemu format of the leaf


@dataclasses.dataclass(frozen=True)
class LeaseSpec:
    """A sanlock resource QEMU holds while it runs (libvirt's sanlock lock driver)."""
    lockspace: str             # the storage domain UUID
    key: str                   # the lease id (the VM's UUID)
    path: str                  # the domain's xleases
    offset: int


# Drives on file storage use QEMU's thread pool, not Linux native AIO (as VDSM
# does for file domains): io='native' makes each QEMU reserve 1024 events of
# the host-wide fs.aio-max-nr (65536 by default: ~64 VMs per host unless the
# host raises it, as scripts/setup-host.sh does); and an O_DIRECT write that
# allocates in a sparse file can block in io_submit, stalling QEMU's loop.
# bench/drive_config.py compares the modes on the same disk.
DRIVE_CACHE, DRIVE_IO = "none", "threads"


def build(uuid: str, name: str, mem_mib: int, virt_type: str, disks: list[DiskSpec],
          metadata_xml: str, leases: tuple[LeaseSpec, ...] = ()) -> str:
    lease_xml = "".join(
        f"""
    <lease>
      <lockspace>{escape(lease.lockspace)}</lockspace>
      <key>{escape(lease.key)}</key>
      <target path={quoteattr(lease.path)} offset='{int(lease.offset)}'/>
    </lease>""" for lease in leases)
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type={quoteattr(d.format)} cache='{DRIVE_CACHE}' io='{DRIVE_IO}' error_policy='stop'/>
      <source file={quoteattr(d.path)}/>
      <target dev={quoteattr(d.target)} bus='virtio'/>
    </disk>""" for d in disks)
    return f"""<domain type={quoteattr(virt_type)}>
  <name>{escape(name)}</name>
  <uuid>{escape(uuid)}</uuid>
  <memory unit='MiB'>{int(mem_mib)}</memory>
  <metadata>{metadata_xml}</metadata>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>{lease_xml}{disk_xml}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


def metadata_element(payload: str) -> str:
    """Our metadata element as it appears inside <metadata>; payload is JSON."""
    return (f"<{METADATA_KEY}:vm xmlns:{METADATA_KEY}={quoteattr(METADATA_NS)}>"
            f"{escape(payload)}</{METADATA_KEY}:vm>")


def escape_text(text: str) -> str:
    return escape(text)


def read_metadata(domain_xml: str | ET.Element) -> str | None:
    root = ET.fromstring(domain_xml) if isinstance(domain_xml, str) else domain_xml
    el = root.find(f"metadata/{{{METADATA_NS}}}vm")
    return None if el is None else (el.text or "")


def live_disks(domain_xml: str | ET.Element) -> dict[str, LiveDisk]:
    root = ET.fromstring(domain_xml) if isinstance(domain_xml, str) else domain_xml
    disks = {}
    for disk in root.findall("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        if target is None:
            continue
        dev = target.get("dev", "")
        mirror_el = disk.find("mirror")
        mirror = None
        if mirror_el is not None:
            mirror = Mirror(job=mirror_el.get("job", ""), ready=mirror_el.get("ready") == "yes")
        disks[dev] = LiveDisk(target=dev, chain=_chain(disk), mirror=mirror)
    return disks


def _chain(disk: ET.Element) -> list[ChainNode]:
    """Walk <source> and nested <backingStore> from the active layer down."""
    nodes = []
    el: ET.Element | None = disk
    while el is not None:
        source = el.find("source")
        if source is None or source.get("file") is None:
            break
        fmt_el = el.find("driver") if el is disk else el.find("format")
        index = source.get("index") if el is disk else el.get("index")
        nodes.append(ChainNode(path=source.get("file"), format=(fmt_el.get("type") if fmt_el is not None else "raw"),
                               index=int(index) if index is not None else None))
        el = el.find("backingStore")
    nodes.reverse()
    return nodes
