"""Bus events as VDSM-style JSON-RPC notifications, and back.

VDSM sends events over STOMP as JSON-RPC notifications on the destination
`jms.queue.events`; the method names what happened and to whom, and the
params hold one entry keyed by that id plus `notify_time` (milliseconds on
the host's monotonic clock, as VDSM does):

    {"jsonrpc": "2.0", "method": "|virt|VM_status|<vmID>",
     "params": {"<vmID>": {"status": "Up", "pauseCode": "NOERR", "seq": 7},
                "notify_time": 4831024}}

vmhost's events (see vmhost/api/transport/http.py for their fields) map to:

    event "vm"      |virt|VM_status|<vmId>          (VDSM's own name)
    event "job"     |virt|VM_job|<vmId>             merge job state changes:
                    {jobId, drive, from, to, reason, error, seq}
    event "domain"  |storage|domain_status|<domainID>
                    {status: VALID | INVALID, reason, seq}
    any other       |vmhost|<event>|<id or "host">

The entry holds every field of the event except its name, its id and the
bus's wall-clock `time`; so from_notification gives the event back (with
`seq`), which is how vmhost's own client reads STOMP events.
"""
from __future__ import annotations

import time
from typing import Any

EVENTS_DESTINATION = "jms.queue.events"

# event name -> (namespace, method name, the field that identifies whom)
_NAMES = {
    "vm": ("virt", "VM_status", "vmId"),
    "job": ("virt", "VM_job", "vmId"),
    "domain": ("storage", "domain_status", "domainID"),
}
_BY_METHOD = {(ns, name): (event, field) for event, (ns, name, field) in _NAMES.items()}
_HOST = "host"


def to_notification(event: dict[str, Any], notify_time: int | None = None) -> dict[str, Any]:
    kind = str(event.get("event", "message"))
    namespace, name, field = _NAMES.get(kind, ("vmhost", kind, "id"))
    subject = str(event.get(field) or _HOST)
    entry = {k: v for k, v in event.items() if k not in ("event", field, "time")}
    if notify_time is None:
        notify_time = int(time.monotonic() * 1000)
    return {"jsonrpc": "2.0", "method": f"|{namespace}|{name}|{subject}",
            "params": {subject: entry, "notify_time": notify_time}}


def from_notification(message: Any) -> dict[str, Any] | None:
    """The bus event a notification carries, or None if it is not one."""
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return None
    parts = message["method"].split("|")
    params = message.get("params")
    if len(parts) != 4 or parts[0] or not isinstance(params, dict):
        return None
    _, namespace, name, subject = parts
    entry = params.get(subject)
    if not isinstance(entry, dict):
        return None
    kind, field = _BY_METHOD.get((namespace, name), (name, "id"))
    event = {"event": kind, **entry}
    if subject != _HOST or field != "id":
        event[field] = subject
    return event
