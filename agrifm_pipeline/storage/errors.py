"""The storage layer's errors; every one is an :class:`~agrifm_pipeline.errors.AgriFMError`
whose message names the partition (or store) and what to do."""

from __future__ import annotations

import errno

from agrifm_pipeline.errors import AgriFMError, SettingsError


class StorageError(AgriFMError):
    """A store cannot be opened, written or committed, or holds data that fails its checksums."""


class StorageRootError(StorageError, SettingsError):
    """A storage root or its fsspec options that cannot be used: an unknown URL protocol,
    one whose filesystem package is missing, options that are not a JSON object.

    Raised by :func:`~agrifm_pipeline.storage.fs.check_storage_url` wherever the root
    came from (``AGRIFM_PIPELINE_STORAGE``, a resource field, ``--store``), so it is
    both a StorageError (the store cannot be opened) and a SettingsError (the value to
    fix is a setting); the message names the variable or says ``storage root``."""


class CorruptionError(StorageError):
    """A stored object's bytes differ from its manifest's checksum."""


class DamagedPointerError(StorageError):
    """A partition's pointer document is not JSON (a torn or hand-edited file).

    Readers stop at it; the next commit of the partition, or ``agrifm-pipeline
    verify``, moves its bytes aside (``_current.json.damaged-<time>``) and the
    partition is then re-made like a missing one."""


class StorageWriteError(StorageError, OSError):
    """Writing to the store failed (full disk, read-only mount, lost permission): the
    message names the store path and the partition; ``errno`` is the system's."""


class IndexLagError(StorageError):
    """A version was committed but the year's index could not be told: the version is
    current and safe; the index lags until ``agrifm-pipeline verify`` rebuilds it."""

    def __init__(self, message: str, version: str = ""):
        super().__init__(message)
        self.version = version


class ReadOnlyStoreError(StorageError):
    """A command that must write was pointed at a store it cannot write."""


# errno values meaning "this store cannot be written here" rather than a transient fault
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
