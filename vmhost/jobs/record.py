"""One record type for every job kind.

A job kind is a dataclass that mixes in `Record` and names, as class
attributes, its kind, its record version, the field that holds its state
(an enum), the field that names its owner and the upgrades of its older
record versions. A record is the dataclass's fields as a flat JSON object
plus "version" (and "kind", for kinds whose records always carried it): the
formats already on disk and in libvirt metadata are these, so they stay
readable. A record of an older version is upgraded step by step on reading
and written back in the current version by the job's next save.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, ClassVar, TypeVar

from vmhost.ids import check_uuid

R = TypeVar("R", bound="Record")


class Record:
    """Mixed into a job kind's dataclass (see the module docstring)."""
    KIND: ClassVar[str]
    VERSION: ClassVar[int]
    STATES: ClassVar[type[enum.Enum]]
    STATE_FIELD: ClassVar[str] = "state"
    # The field naming who drives the job ("" = the VM whose definition holds it).
    OWNER_FIELD: ClassVar[str] = ""
    UUID_FIELDS: ClassVar[tuple[str, ...]] = ("id",)
    # version n -> a function turning a version-n record into a version-(n+1) one.
    UPGRADES: ClassVar[dict[int, Callable[[dict], dict]]] = {}
    # The version of a record without one (None: such a record is refused).
    UNVERSIONED: ClassVar[int | None] = None
    # Whether records carry "kind" (older kinds' records never did).
    WRITES_KIND: ClassVar[bool] = True

    id: str

    @property
    def job_state(self) -> Any:
        """The value of the kind's state field (an enum member of STATES)."""
        return getattr(self, self.STATE_FIELD)

    @property
    def owner(self) -> str:
        return getattr(self, self.OWNER_FIELD) if self.OWNER_FIELD else ""

    def to_record(self) -> dict:
        head: dict[str, Any] = {"version": self.VERSION}
        if self.WRITES_KIND:
            head["kind"] = self.KIND
        body = dataclasses.asdict(self)   # type: ignore[call-overload]
        body[self.STATE_FIELD] = self.job_state.value
        return {**head, **body}

    @classmethod
    def from_record(cls: type[R], d: dict) -> R:
        """The job of a record of any known version; ValueError, TypeError,
        KeyError or InvalidParameter (naming the field) if it is not one."""
        d = cls.upgrade(d)
        names = {f.name for f in dataclasses.fields(cls)}   # type: ignore[arg-type]
        job = cls(**{k: v for k, v in d.items() if k in names})
        setattr(job, cls.STATE_FIELD, cls.STATES(getattr(job, cls.STATE_FIELD)))
        for name in cls.UUID_FIELDS:
            check_uuid(getattr(job, name), f"job record {name}")
        job.check()
        return job

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """The record in the current version (not validated)."""
        if not isinstance(d, dict):
            raise ValueError("a job record must be an object")
        if d.get("kind", cls.KIND) != cls.KIND:
            raise ValueError(f"not a {cls.KIND} job record: kind {d.get('kind')!r}")
        version = d.get("version", cls.UNVERSIONED)
        while version != cls.VERSION:
            step = cls.UPGRADES.get(version) if isinstance(version, int) else None
            if step is None:
                raise ValueError(f"unknown {cls.KIND} job record version {version!r}")
            d = {**step(d), "version": version + 1}
            version += 1
        return d

    def check(self) -> None:
        """Kind-specific consistency checks of a record read back (ValueError)."""
