"""A connection that libvirtd drops is reopened in the background, with its
event subscriptions, before any caller asks for it (real libvirtd: the test
disconnects only its own client with virt-admin, other users are untouched)."""
from __future__ import annotations

import os
import re
import subprocess
import threading
import uuid

import libvirt
from conftest import VM_PREFIX, wait_for

from vmhost.virt.connection import Connection

SERVER = "libvirtd"


def _my_client_ids() -> list[str]:
    out = subprocess.run(["virt-admin", "srv-clients-list", SERVER], check=True,
                         capture_output=True, text=True).stdout
    mine = []
    for line in out.splitlines()[2:]:
        if not line.split():
            continue
        client = line.split()[0]
        info = subprocess.run(["virt-admin", "client-info", SERVER, client],
                              capture_output=True, text=True).stdout
        if re.search(rf"process_id\s*:\s*{os.getpid()}\b", info):
            mine.append(client)
    return mine


def test_dropped_connection_comes_back_with_its_events():
    conn = Connection("qemu:///system")
    try:
        reconnected = threading.Event()
        events: list[tuple[str, int]] = []
        conn.reconnect_listeners.append(reconnected.set)
        conn.lifecycle_listeners.append(lambda vm, event, detail: events.append((vm, event)))
        others = set(_my_client_ids())      # the session's own connections: never dropped
        first = conn.get()
        ours = set(_my_client_ids()) - others
        assert ours, "the connection under test has no client on libvirtd"
        for client in ours:
            subprocess.run(["virt-admin", "client-disconnect", SERVER, client], check=True,
                           capture_output=True)
        # Nobody calls get(): the close callback alone must bring it back.
        assert reconnected.wait(10), "no background reconnect after libvirtd dropped us"
        live = conn._conn
        assert live is not None and live is not first and live.isAlive()
        # The events are subscribed again: define/undefine needs no QEMU.
        vm_uuid = str(uuid.uuid4())
        xml = (f"<domain type='qemu'><name>{VM_PREFIX}reconnect</name><uuid>{vm_uuid}</uuid>"
               "<memory unit='MiB'>16</memory><os><type arch='x86_64'>hvm</type></os></domain>")
        dom = live.defineXML(xml)
        try:
            wait_for(lambda: (vm_uuid, libvirt.VIR_DOMAIN_EVENT_DEFINED) in events, 10,
                     "a lifecycle event on the new connection")
        finally:
            dom.undefine()
    finally:
        conn.close()
