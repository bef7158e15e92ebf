"""The VM definition: what the agent knows about a VM, persisted in one place,
the libvirt domain's <metadata>, so it survives an agent restart and travels
with the domain. Each drive's chain is kept here once and nowhere else.

Job records (vmhost.jobs) live in two maps: `jobs` holds the live merge's
(VDSM's block job layout, what vmJobs reports), `agentJobs` the records of
vmhost's own VM-bound kinds (snapshot, disk sync), each carrying its "kind".
Definitions written before those kinds were jobs carry their write-ahead
fields instead, `pendingSync` (drives a snapshot is switching) and
`storageSync` (drive -> leaf of a pending storage repair): they are read
into `legacy` and turned into records by recovery (each kind's
`from_legacy`); they are never written again, so the next persist writes
the new format.
"""
from __future__ import annotations

import dataclasses
import json

from vmhost.refs import VolumeRef

FORMAT_VERSION = 1
RESUME_BEHAVIORS = ("auto_resume", "leave_paused", "kill")


class DefinitionError(ValueError):
    pass


@dataclasses.dataclass
class Drive:
    name: str                  # libvirt target, stable across pivots: "vda"
    domain: str
    image: str
    chain: list[VolumeRef]     # base first; the last one is the active leaf
    format: str = "qcow2"      # qemu format of the leaf

    @property
    def volume(self) -> str:
        return self.chain[-1].volume

    @property
    def path(self) -> str:
        return self.chain[-1].path

    def volume_ids(self) -> list[str]:
        return [v.volume for v in self.chain]

    def to_dict(self) -> dict:
        return {"name": self.name, "domainID": self.domain, "imageID": self.image,
                "format": self.format, "volumeChain": [v.to_api() for v in self.chain]}

    @classmethod
    def from_dict(cls, d: dict) -> "Drive":
        return cls(name=d["name"], domain=d["domainID"], image=d["imageID"],
                   chain=[VolumeRef.from_api(v) for v in d["volumeChain"]],
                   format=d.get("format", "qcow2"))


@dataclasses.dataclass
class VmDefinition:
    vm_id: str
    name: str
    mem_mib: int
    drives: list[Drive]
    resume_behavior: str = "auto_resume"
    # Block job records (vmhost.virt.merge), keyed by job id.
    jobs: dict[str, dict] = dataclasses.field(default_factory=dict)
    # The agent that runs the VM (its host id); recovery adopts only its own.
    host_id: str = ""
    # Records of the agent's own job kinds (vmhost.virt.snapshot,
    # vmhost.virt.disksync), keyed by job id; never reported as vmJobs.
    agent_jobs: dict[str, dict] = dataclasses.field(default_factory=dict)
    # The old write-ahead fields as read ({"pendingSync": [...], "storageSync":
    # {...}}), until recovery upgrades them into agent_jobs; never written.
    legacy: dict = dataclasses.field(default_factory=dict)

    def drive(self, name: str) -> Drive:
        for d in self.drives:
            if d.name == name:
                return d
        raise KeyError(name)

    def find_drive(self, domain: str, image: str) -> Drive | None:
        for d in self.drives:
            if d.domain == domain and d.image == image:
                return d
        return None

    def to_json(self) -> str:
        return json.dumps({
            "version": FORMAT_VERSION, "vmId": self.vm_id, "vmName": self.name,
            "memSize": self.mem_mib, "resumeBehavior": self.resume_behavior,
            "drives": [d.to_dict() for d in self.drives],
            "jobs": self.jobs, "agentJobs": self.agent_jobs, "hostId": self.host_id,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VmDefinition":
        try:
            d = json.loads(text)
            version = d.get("version")
            if version != FORMAT_VERSION:
                raise DefinitionError(f"unknown VM definition version {version!r}")
            return cls(vm_id=d["vmId"], name=d["vmName"], mem_mib=int(d["memSize"]),
                       drives=[Drive.from_dict(x) for x in d["drives"]],
                       resume_behavior=d.get("resumeBehavior", "auto_resume"),
                       jobs=dict(d.get("jobs", {})), agent_jobs=dict(d.get("agentJobs", {})),
                       legacy=_legacy(d), host_id=d.get("hostId", ""))
        except DefinitionError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise DefinitionError(f"bad VM definition: {e!r}") from None


def _legacy(d: dict) -> dict:
    """The old write-ahead fields that still hold work (empty ones are dropped)."""
    legacy = {"pendingSync": list(d.get("pendingSync") or []),
              "storageSync": dict(d.get("storageSync") or {})}
    return {k: v for k, v in legacy.items() if v}
