"""The agent identity (agent id): one UUID kept in ``<state_dir>/host-id``.

Every VM the agent starts carries it in its libvirt metadata (``hostId``), and
recovery adopts only the VMs carrying its own id. So the id must never change
silently: an agent that lost the file and made a new id would ignore every
running VM, and an engine that then restarts them elsewhere has the same disks
open on two hosts (split brain).

What start-up decides (`resolve`):

- the file holds a UUID: that is the agent id; libvirt is not asked;
- the file is missing: libvirt is asked for running VMs with vmhost metadata
  that carry an agent id and have a drive on a storage domain this state dir
  knows (its domains.json). Such VMs were this agent's: refuse to start,
  naming the file, the ids and VMs found and the ways out (restore the file,
  or ``vmhost serve --adopt-identity ID``). None: a fresh agent; a new id is
  made and written crash-safely. VMs of other agent ids on domains it does
  not know are another agent's (several agents share a libvirtd in the
  tests) and only logged: a state dir that lost everything, domains.json
  too, cannot tell its VMs from theirs; the warning names them, and
  --adopt-identity takes them over;
- the file cannot be read, or does not hold a UUID: refuse, always. It is
  never replaced silently, whether VMs run or not.

``--adopt-identity ID`` (once, by an operator) writes ID into the file when it
is missing, unreadable or corrupt. It refuses when the file holds another
valid id, and when VMs of this state dir's domains run but none of them
carries ID (a typo would leave them all unmanaged).

(Named "agent id" to keep it apart from the sanlock host id, a number.)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from typing import Callable

import libvirt

from vmhost.fsutil import atomic_write
from vmhost.ids import is_uuid
from vmhost.virt import domxml

log = logging.getLogger(__name__)

FILE_NAME = "host-id"


class IdentityError(Exception):
    """The agent must not start: the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class AgentVm:
    """A libvirt domain that carries vmhost metadata with an agent id."""
    uuid: str
    name: str
    agent_id: str
    domains: frozenset[str] = frozenset()   # storage domains of its drives


ListVms = Callable[[], list[AgentVm]]


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def resolve(state_dir: str, list_vms: ListVms, known_domains: set[str],
            adopt: str | None = None) -> str:
    """This agent's id, or IdentityError. `known_domains`: the storage domains
    in this state dir's registry. `list_vms` may raise libvirt.libvirtError
    when libvirtd does not answer (the caller retries: nothing is written
    before the decision is made)."""
    path = path_in(state_dir)
    state, value = _read(path)
    if adopt is not None:
        return _adopt(path, state, value, adopt, _ours(list_vms, known_domains))
    if state == "ok":
        return value
    if state == "missing":
        everyone = list_vms()
        vms = [vm for vm in everyone if vm.domains & known_domains]
        if vms:
            raise IdentityError(
                f"the agent identity file {path} is missing, but libvirt runs "
                f"{_describe(vms)}. A new identity would leave them unmanaged (recovery "
                f"adopts only the VMs of its own agent id). Restore {path} from a backup, "
                f"or, if no other vmhost agent drives these VMs, start once with "
                f"`vmhost serve --adopt-identity {_likely(vms)}`.")
        new = str(uuid.uuid4())
        atomic_write(path, new.encode() + b"\n")
        if everyone:
            log.warning("new agent id %s, kept in %s. libvirt runs %s, on storage domains this "
                        "state dir does not know: left alone as another agent's. If they were "
                        "this host's, stop the agent and start it once with --adopt-identity.",
                        new, path, _describe(everyone))
        else:
            log.info("new agent id %s (no VM of any vmhost agent runs here), kept in %s",
                     new, path)
        return new
    problem = (f"cannot be read ({value})" if state == "unreadable"
               else f"does not hold an agent id (a UUID) but {value!r:.60}")
    raise IdentityError(
        f"the agent identity file {path} {problem}; it is never replaced silently. "
        f"{_way_out(path, _ours(list_vms, known_domains))}")


def list_agent_vms(uri: str) -> list[AgentVm]:
    """Domains of libvirt at `uri` with vmhost metadata naming an agent id
    (on a connection of its own, closed again)."""
    conn = libvirt.open(uri)
    try:
        found = []
        for dom in conn.listAllDomains(0):
            try:
                record = record_of(dom.XMLDesc(0))
                agent_id = record.get("hostId")
                if isinstance(agent_id, str) and agent_id:
                    found.append(AgentVm(dom.UUIDString(), dom.name(), agent_id,
                                         _drive_domains(record)))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise   # else: went away while we listed
        return found
    finally:
        conn.close()


def record_of(domain_xml: str) -> dict:
    """A domain's vmhost metadata as a plain dict, {} if none. Read leniently
    (any record version, other fields broken): a record recovery cannot load
    still says whose VM it is and where its disks are."""
    payload = domxml.read_metadata(domain_xml)
    try:
        record = json.loads(payload) if payload is not None else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _drive_domains(record: dict) -> frozenset[str]:
    drives = record.get("drives")
    return frozenset(d["domainID"] for d in drives if isinstance(d, dict)
                     and isinstance(d.get("domainID"), str)) if isinstance(drives, list) else frozenset()


# --- helpers -----------------------------------------------------------------

def _read(path: str) -> tuple[str, str | None]:
    """("ok", id) | ("missing", None) | ("unreadable", error) | ("corrupt", content)."""
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except FileNotFoundError:
        return "missing", None
    except OSError as e:
        return "unreadable", str(e)
    text = data.decode("utf-8", "replace").strip()
    return ("ok", text) if is_uuid(text) else ("corrupt", text)


def _ours(list_vms: ListVms, known_domains: set[str]) -> ListVms:
    """The VMs with a drive on a domain of this state dir."""
    return lambda: [vm for vm in list_vms() if vm.domains & known_domains]


def _adopt(path: str, state: str, value: str | None, adopt: str, list_vms: ListVms) -> str:
    if not is_uuid(adopt):
        raise IdentityError(f"--adopt-identity must be an agent id (a lower-case UUID), "
                            f"got {adopt!r:.60}")
    if state == "ok":
        if value == adopt:
            return adopt
        raise IdentityError(
            f"the agent identity file {path} holds agent id {value}, not {adopt}; "
            f"--adopt-identity does not replace a valid identity (move the file away first "
            f"if you really mean to)")
    vms = list_vms()
    ids = {vm.agent_id for vm in vms}
    if ids and adopt not in ids:
        raise IdentityError(
            f"no VM here carries agent id {adopt}: libvirt runs {_describe(vms)}. "
            f"Adopting {adopt} would leave them unmanaged.")
    atomic_write(path, adopt.encode() + b"\n")
    mine = [vm for vm in vms if vm.agent_id == adopt]
    log.warning("adopted agent id %s (%d VM(s) carry it), kept in %s", adopt, len(mine), path)
    return adopt


def _way_out(path: str, list_vms: ListVms) -> str:
    """What to do, best effort: which ids the running VMs carry."""
    try:
        vms = list_vms()
    except libvirt.libvirtError as e:
        return (f"Restore it from a backup, or start once with `vmhost serve "
                f"--adopt-identity ID` (libvirt could not be asked which agent ids its VMs "
                f"carry: {e}).")
    if not vms:
        return (f"No VM on this state dir's storage domains runs here: restore it, or remove "
                f"{path} to make a new identity.")
    return (f"libvirt runs {_describe(vms)}. Restore it from a backup, or, if no other "
            f"vmhost agent drives these VMs, start once with "
            f"`vmhost serve --adopt-identity {_likely(vms)}`.")


def _describe(vms: list[AgentVm], limit: int = 5) -> str:
    by_id: dict[str, list[str]] = {}
    for vm in vms:
        by_id.setdefault(vm.agent_id, []).append(vm.name)
    parts = []
    for agent_id, names in sorted(by_id.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(sorted(names)[:limit]) + (", ..." if len(names) > limit else "")
        parts.append(f"{len(names)} VM(s) of agent id {agent_id} ({shown})")
    return "; ".join(parts)


def _likely(vms: list[AgentVm]) -> str:
    """The agent id most VMs carry (one agent per libvirtd is the rule)."""
    counts: dict[str, int] = {}
    for vm in vms:
        counts[vm.agent_id] = counts.get(vm.agent_id, 0) + 1
    return max(sorted(counts), key=counts.get)
