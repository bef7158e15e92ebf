"""Identifier validation: every UUID is checked here before it reaches a path
or a libvirt call, so no `../` or odd bytes can ever name a file."""
from __future__ import annotations

import re

from vmhost.errors import InvalidParameter

BLANK_UUID = "00000000-0000-0000-0000-000000000000"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_uuid(value: object) -> bool:
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def check_uuid(value: object, name: str) -> str:
    """Return value if it is a lower-case canonical UUID, else raise naming `name`."""
    if not is_uuid(value):
        raise InvalidParameter(f"{name} must be a UUID, got {value!r:.80}")
    return value  # type: ignore[return-value]
