"""The storage layer's exception tree: every message names the problem and the fix."""

from __future__ import annotations


class StorageError(ValueError):
    """Base class of every error raised by :mod:`storage` for bad input or a bad store."""


class FingerprintMismatchError(StorageError):
    """A store was opened (or written) with a projection fingerprint or dimension it was not built with."""


class SampleConflictError(StorageError):
    """A different sample arrives under an id that already names another sample."""


class DatasetFormatError(StorageError):
    """A training-data or query file has malformed rows (all of them are listed, nothing is ingested)."""


class ReadOnlySQLError(StorageError):
    """User SQL that is not a single read-only query."""


class DamagedStoreError(StorageError):
    """A table holds several rows for one natural key."""
