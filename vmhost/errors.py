"""Domain errors with VDSM's numeric codes.

Services raise these; the API turns them into JSON-RPC error objects whose
``code`` is the VDSM code, so an engine written against VDSM understands them.
Anything that is not a VmhostError reaches the client as code 100 with a
generic message (never a traceback).
"""
from __future__ import annotations


class VmhostError(Exception):
    code = 100
    message = "General Exception"

    def __init__(self, detail: str | None = None):
        self.detail = detail
        super().__init__(self.text)

    @property
    def text(self) -> str:
        return f"{self.message}: {self.detail}" if self.detail else self.message


class GeneralError(VmhostError):
    code = 100


class NoSuchVM(VmhostError):
    code = 1
    message = "Virtual machine does not exist"


class VMExists(VmhostError):
    code = 4
    message = "Virtual machine already exists"


class ImageFileNotFound(VmhostError):
    """An image or volume that is not there (VDSM's code 13)."""
    code = 13
    message = "Drive image file could not be found"


class SnapshotFailed(VmhostError):
    code = 48
    message = "Snapshot failed"


class MergeFailed(VmhostError):
    code = 52
    message = "Merge failed"


class DestinationVolumeTooSmall(VmhostError):
    code = 79
    message = "Destination volume is too small"


class GenerationMismatch(VmhostError):
    """A volume's GEN is not the one the caller read (VDSM's fencing of
    storage jobs; its storage exception of the same name, code 911)."""
    code = 911
    message = "The provided generation does not match the actual generation"


# VDSM's host-job errors (vdsm.jobs.ClientError and kin) carry no code of their
# own: its API answers them as a general exception, code 100, as these do.
class JobExists(VmhostError):
    """A host job with this id is known (VDSM's jobs.JobExistsError)."""
    code = 100
    message = "Job already exists"


class NoSuchJob(VmhostError):
    code = 100
    message = "No such job"


class JobInWrongState(VmhostError):
    """Abort of a job past the point of no return, delete of a running one."""
    code = 100
    message = "Job is in the wrong state for this"


class RecoveryInProgress(VmhostError):
    code = 99
    message = "Recovering from crash or Initializing"


class VolumeIsBusy(VmhostError):
    code = 203
    message = "Volume is busy"


class VolumeImageHasChildren(VmhostError):
    code = 204
    message = "Cannot delete volume which has children"


class VolumeCreationError(VmhostError):
    code = 205
    message = "Error creating a new volume"


class VolumeMetadataReadError(VmhostError):
    code = 207
    message = "Error while processing volume meta data"


class VolumeAlreadyExists(VmhostError):
    code = 212
    message = "Volume already exists"


class PrepareIllegalVolume(VmhostError):
    code = 227
    message = "Cannot prepare illegal volume"


class StorageDomainDoesNotExist(VmhostError):
    code = 358
    message = "Storage domain does not exist"


class StorageDomainUnavailable(VmhostError):
    code = 379
    message = "Domain is either partially accessible or entirely inaccessible"


class StorageDomainAlreadyExists(VmhostError):
    code = 365
    message = "Storage domain already exists"


class StorageDomainCreationError(VmhostError):
    code = 351
    message = "Error creating a storage domain"


class StorageDomainDetachError(VmhostError):
    """Disconnecting a domain this host still uses."""
    code = 356
    message = "Error detaching storage domain"


class AcquireLockFailure(VmhostError):
    """A VM's lease is held by another host (the VM runs there)."""
    code = 651
    message = "Cannot obtain lock"


class AcquireHostIdFailure(VmhostError):
    """Joining a shared domain's sanlock lockspace failed (or this host has no host id)."""
    code = 661
    message = "Cannot acquire host id"


class ReleaseHostIdFailure(VmhostError):
    code = 662
    message = "Cannot release host id"


class NoSuchLease(VmhostError):
    code = 936
    message = "No such lease"


class InvalidParameter(VmhostError):
    """A value that passed the schema but is still wrong (e.g. size 0)."""
    code = 1000
    message = "Invalid parameter"
