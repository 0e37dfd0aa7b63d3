"""Error types the caller can catch.

Every message names the input that was wrong and what would fix it.
"""

from __future__ import annotations


class AgriFMError(Exception):
    """Base class of every error this package raises on purpose."""


class SettingsError(AgriFMError, ValueError):
    """A setting (environment variable or keyword) has a value we cannot use."""


class InputContractError(AgriFMError, ValueError):
    """An input array does not have a shape or dtype the adapter accepts."""


class CheckpointError(AgriFMError):
    """A checkpoint cannot be found, downloaded, read, or mapped onto the encoder."""


class RepoError(AgriFMError):
    """The official AgriFM source tree cannot be found, cloned, or imported."""


class BackendError(AgriFMError, ValueError):
    """A backend or provider that is unknown or not available for this call."""


class RegionError(AgriFMError, ValueError):
    """A region file or geometry cannot be turned into tiles."""


class ProviderError(AgriFMError):
    """A data provider cannot deliver the requested frames."""


class PerformanceWarning(UserWarning):
    """A setting that works here but runs far slower than its alternative (the message says which)."""
