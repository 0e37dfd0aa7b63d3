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


class SourceRequestError(ProviderError):
    """A request to a remote source (a STAC API's search, an archive's file, a token
    service) failed for good: refused outright, or still failing when its retries ran out.

    ``url`` is what was asked (a file's address unsigned), ``status`` the last HTTP
    status (None when the connection itself failed), ``reason`` the last failure in
    words, ``attempts`` how many were made; a read also names its ``item`` and ``asset``.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int | None,
        reason: str,
        attempts: int,
        item: str | None = None,
        asset: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url, self.status, self.reason, self.attempts = url, status, reason, attempts
        self.item, self.asset = item, asset


class PerformanceWarning(UserWarning):
    """A setting that works here but runs far slower than its alternative (the message says which)."""


class NoCoverageError(ProviderError):
    """No scene of the source reaches the requested area at all, whatever the dates or
    clouds: the tile lies outside the source's data.

    ``area`` names the tile or grid asked for, ``source`` the data source (a local
    root, a STAC catalog, a collection), ``extent`` where its scenes are (see
    :meth:`extent_label`), or None when it has none.
    """

    def __init__(self, area: str, source: str, extent: str | None) -> None:
        self.area, self.source, self.extent = area, source, extent
        where = f"its scenes cover {extent}" if extent else "it has no scenes at all"
        super().__init__(
            f"no scene of {source} covers {area}: {where}. The tile lies outside the "
            "source's data (cloud and date settings cannot help); use a region inside that "
            "extent, or a source whose scenes cover the tile"
        )

    @staticmethod
    def extent_label(bounds_wgs84: tuple[float, float, float, float], n_scenes: int) -> str:
        """``lon a..b, lat c..d (WGS84, N scenes)`` from (min lon, min lat, max lon, max lat)."""
        w, s, e, n = bounds_wgs84
        return f"lon {w:.4f}..{e:.4f}, lat {s:.4f}..{n:.4f} (WGS84, {n_scenes} scene(s))"
