"""Moved to vmhost.testing.guestio; this name is kept for code not yet updated."""
from vmhost.testing.guestio import GuestIoError, qemu_io, verify, write  # noqa: F401
