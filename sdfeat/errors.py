"""Domain errors. Every error a user can cause is an `SdfeatError`; the CLI prints its message on one line
and exits with code 2. Each also subclasses the builtin a Python caller would expect to catch."""

from __future__ import annotations

import errno


class SdfeatError(Exception):
    """Base of every error sdfeat raises for bad input or a failed job."""


class SpecError(SdfeatError, ValueError):
    """The job spec is invalid; the message names the field."""


class ArgumentError(SdfeatError, ValueError):
    """An argument of a command or library call is out of its range or shape; the message names the argument
    (its Python name: the CLI's option of the same name says the same)."""


class UnknownBlockError(SdfeatError, KeyError):
    """A block name that the model does not have; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(SdfeatError, FileNotFoundError):
    """Weights or configs for a model are not available locally and cannot be fetched."""


class SourceError(SdfeatError, ValueError):
    """An image source cannot be planned or read (unknown layout, unreadable shard)."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """An image source path, glob or URL matches nothing."""


class StoreError(SdfeatError, ValueError):
    """A feature store is missing, incomplete, inconsistent, or belongs to another spec."""


class UnitFailedError(SdfeatError, RuntimeError):
    """A work unit failed (after its retries); the message names the unit."""


class ClusterConnectionError(SdfeatError, ConnectionError):
    """A Ray cluster or its Jobs API cannot be reached or refuses this client; the message names the address."""


class RowNotReadyError(StoreError):
    """A store row has no activations to show yet (its unit is unfinished) or never will (its image failed).
    `what` is the message without its `hint` (what the caller can do), so a command can give its own hint."""

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(f"{what}; {hint}" if hint else what)
        self.what = what


class StorageError(SdfeatError, OSError):
    """Storage refused an operation (read-only, full, no permission, quota); the message names the path and the
    errno. Made from an OSError by `storage_error`, the one place that maps them."""

    def __str__(self) -> str:  # OSError would prefix "[Errno N]" and append the file name again
        return str(self.args[0]) if self.args else ""


_STORAGE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def storage_error(err: OSError, path: str | None = None) -> StorageError | None:
    """A one-line StorageError for an OSError that means "this storage cannot be written or read" (EROFS, ENOSPC,
    EDQUOT, EACCES, EPERM, EFBIG, EIO), naming the file (else `path`, the output being written); None for others."""
    if err.errno not in _STORAGE_ERRNOS:
        return None
    where = err.filename or path or "the output"
    mapped = StorageError(f"{where}: {err.strerror or err} ({errno.errorcode.get(err.errno, err.errno)})")
    mapped.errno, mapped.filename = err.errno, where
    return mapped


class MissingRowsWarning(UserWarning):
    """Rows asked for hold no activations (unfinished or failed) and were returned as NaN (`allow_missing`)."""
