"""What recovery reads of every domain: our metadata element, a few domains at once.

At start-up the API answers 99 until every VM is recovered, so the per-VM
read is on the critical path. The full XMLDesc of each domain, one after the
other, was 0.5 ms a domain and most of the recovery step (200 domains: ~110
of ~170 ms, plus ~25 ms parsing it). Recovery needs only our metadata element
(the VM's definition and job records) for a VM without a tracked change: one
`metadata()` call, a few in flight at once on the shared connection (libvirt
multiplexes calls of one connection; libvirtd serves up to
max_client_requests = 5 of a client at a time, so RECOVERY_READERS stays
below it and leaves a slot to the others). 200 domains: ~25 ms. A VM whose
definition says a drive's chain may have changed reads its live XML after.
"""
from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

import libvirt

from vmhost.virt import domxml

RECOVERY_READERS = 4


@dataclasses.dataclass
class DomainRead:
    dom: libvirt.virDomain
    payload: str | None                       # our metadata's JSON; None: not ours
    error: libvirt.libvirtError | None = None  # the read failed (the domain went away...)


def read_all(doms: list[libvirt.virDomain], workers: int = RECOVERY_READERS) -> list[DomainRead]:
    """Our metadata of each domain, in the order given."""
    if len(doms) <= 1:
        return [read_one(d) for d in doms]
    with ThreadPoolExecutor(max_workers=min(workers, len(doms)),
                            thread_name_prefix="recovery-read") as pool:
        return list(pool.map(read_one, doms))


def read_one(dom: libvirt.virDomain) -> DomainRead:
    try:
        element = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.METADATA_NS, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return DomainRead(dom, None)
        return DomainRead(dom, None, e)
    return DomainRead(dom, metadata_payload(element))


def metadata_payload(element: str) -> str:
    """The JSON text of our metadata element as libvirt returns it
    (`<vm xmlns="...">{json}</vm>`): what domxml.read_metadata finds in the
    full domain XML."""
    return ET.fromstring(element).text or ""
