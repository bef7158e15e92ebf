"""Recovery's reads of our metadata (vmhost/virt/domread.py), against fake domains."""
from __future__ import annotations

import threading

import libvirt

from vmhost.virt import domread, domxml


class FakeDom:
    def __init__(self, name: str, payload: str | None = None, error: int | None = None,
                 gate: threading.Barrier | None = None):
        self.name, self.payload, self.error, self.gate = name, payload, error, gate

    def metadata(self, kind, uri, flags=0):
        assert (kind, uri) == (libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.METADATA_NS)
        if self.gate is not None:
            self.gate.wait(timeout=10)   # every reader in flight at once
        if self.error is not None:
            e = libvirt.libvirtError("fake")
            e.err = (self.error, 0, "fake", 0, "", None, None, 0, 0)
            raise e
        # What libvirt returns: the element alone, its namespace declared.
        return f'<vm xmlns="{domxml.METADATA_NS}">{domxml.escape(self.payload)}</vm>'


def test_payloads_in_order_foreign_domains_and_errors_apart():
    doms = [FakeDom("a", '{"vmId": "a", "x": "<&>"}'),
            FakeDom("b", error=libvirt.VIR_ERR_NO_DOMAIN_METADATA),
            FakeDom("c", error=libvirt.VIR_ERR_NO_DOMAIN),
            FakeDom("d", "")]
    reads = domread.read_all(doms)
    assert [r.dom.name for r in reads] == ["a", "b", "c", "d"]
    assert reads[0].payload == '{"vmId": "a", "x": "<&>"}' and reads[0].error is None
    assert reads[1].payload is None and reads[1].error is None      # not ours
    assert reads[2].error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    assert reads[3].payload == "" and reads[3].error is None


def test_the_payload_is_what_the_full_xml_holds():
    payload = '{"vmId": "a", "name": "q\\"<x>&amp;"}'
    full = (f"<domain><name>a</name><metadata>{domxml.metadata_element(payload)}</metadata>"
            "</domain>")
    element = f'<vm xmlns="{domxml.METADATA_NS}">{domxml.escape(payload)}</vm>'
    assert domread.metadata_payload(element) == domxml.read_metadata(full) == payload


def test_reads_overlap_up_to_the_readers():
    gate = threading.Barrier(domread.RECOVERY_READERS)
    doms = [FakeDom(str(i), "{}", gate=gate) for i in range(domread.RECOVERY_READERS)]
    assert all(r.payload == "{}" for r in domread.read_all(doms))   # else the barrier breaks
