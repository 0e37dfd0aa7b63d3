"""The one small interface every Sentinel-2 source implements.

A provider turns *(area, frame windows, sensor settings, cloud mask)* into a
raw frame stack: ``(time, band, y, x)`` uint16 on the area's grid, with an
honest record of how each frame was made. Everything above this interface is
source-agnostic; adding a source never touches the pipeline.

The area is an ``odc.geo`` ``GeoBox`` (CRS + affine transform + shape): a
tile's grid (``Tile.geobox()``), a chip's, or a single ROI's in its UTM zone.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox

from agrifm_pipeline.frames import FrameWindow
from agrifm_pipeline.specs import SensorSpec

# Sen2Cor scene classes (SCL).
SCL_CLASSES: dict[int, str] = {
    0: "no_data",
    1: "saturated_or_defective",
    2: "dark_area_pixels",
    3: "cloud_shadows",
    4: "vegetation",
    5: "not_vegetated",
    6: "water",
    7: "unclassified",
    8: "cloud_medium_probability",
    9: "cloud_high_probability",
    10: "thin_cirrus",
    11: "snow",
}
DEFAULT_MASKED_SCL: tuple[int, ...] = (0, 1, 3, 8, 9, 10, 11)


@dataclass(frozen=True)
class CloudMask:
    """Per-pixel masking before compositing.

    ``mode="scl"`` masks the listed SCL classes (default: no data, saturated
    or defective, cloud shadow, medium/high-probability cloud, thin cirrus,
    snow). ``mode="none"`` masks nothing beyond no-data pixels and reproduces
    the peer's scene-filter-only behaviour.
    """

    mode: str = "scl"
    scl_classes: tuple[int, ...] = DEFAULT_MASKED_SCL

    def __post_init__(self) -> None:
        from agrifm_pipeline.errors import SettingsError

        if self.mode not in ("scl", "none"):
            raise SettingsError(f"cloud_mask={self.mode!r}; use 'scl' or 'none'")
        bad = [c for c in self.scl_classes if c not in SCL_CLASSES]
        if bad:
            raise SettingsError(
                f"SCL classes {bad} do not exist; use values from {sorted(SCL_CLASSES)}"
            )
        object.__setattr__(self, "scl_classes", tuple(sorted(set(self.scl_classes))))

    def as_record(self) -> dict[str, Any]:
        return {"mode": self.mode, "scl_classes": list(self.scl_classes)}


@dataclass
class FrameRecord:
    """How one frame was made."""

    index: int
    start: dt.date
    end: dt.date
    n_scenes: int  # scenes in the window that passed the scene-level filter
    scenes: list[str] = field(default_factory=list)  # their ids or dates
    clear_fraction: float = 0.0  # share of pixels with at least one clear observation
    backfilled: bool = False
    backfill_source: str | None = None  # "whole_range" or "frame:<i>"
    # How the window's source items fared, where a provider counts them (the STAC
    # provider: found, merged, over_cloudy_pct, skipped_by_scl, read, failed).
    items: dict[str, int] | None = None

    def as_record(self) -> dict[str, Any]:
        rec = asdict(self)
        rec["start"], rec["end"] = self.start.isoformat(), self.end.isoformat()
        if self.items is None:
            del rec["items"]
        return rec


@dataclass
class FrameStack:
    """A provider's answer: frames on the area's grid plus their record.

    ``data`` is an ``xarray.DataArray`` (time, band, y, x) uint16 with x/y
    coordinates in the CRS's units and the CRS/transform set via rioxarray.
    """

    data: xr.DataArray
    frames: list[FrameRecord]
    provider: str
    provider_version: str
    synthetic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_backfilled_frames(self) -> int:
        return sum(f.backfilled for f in self.frames)

    @property
    def n_distinct_frames(self) -> int:
        return len(self.frames) - self.n_backfilled_frames

    def record(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "provider_version": self.provider_version,
            "synthetic": self.synthetic,
            "n_frames": len(self.frames),
            "n_frames_requested": len(self.frames),
            "n_distinct_frames": self.n_distinct_frames,
            "n_backfilled_frames": self.n_backfilled_frames,
            "frames": [f.as_record() for f in self.frames],
            **self.extra,
        }


def frame_stack_array(
    values: np.ndarray, gbox: GeoBox, windows: Sequence[FrameWindow], bands: Sequence[str]
) -> xr.DataArray:
    """Wrap (T, C, H, W) uint16 values on ``gbox`` as a georeferenced DataArray."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    t, c, h, w = values.shape
    if (h, w) != tuple(gbox.shape) or t != len(windows) or c != len(bands):
        raise ValueError(
            f"frame stack {values.shape} does not match grid {tuple(gbox.shape)}, "
            f"{len(windows)} windows and {len(bands)} bands"
        )
    coords = gbox.coords
    da = xr.DataArray(
        values,
        dims=("time", "band", "y", "x"),
        coords={
            "time": [np.datetime64(win.start, "ns") for win in windows],
            "band": list(bands),
            "y": coords["y"].values,
            "x": coords["x"].values,
        },
        name="s2_frames",
    )
    # In place: ``da`` is ours, and a copy of a whole frame stack is ~130 MB per tile-year.
    da.rio.write_crs(str(gbox.crs), inplace=True)
    return da.rio.write_transform(gbox.affine, inplace=True)


@runtime_checkable
class Provider(Protocol):
    """A source of raw Sentinel-2 frame stacks."""

    name: str
    version: str

    def fetch(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> FrameStack:
        """Composite one frame per window on ``area``'s grid."""
        ...


@runtime_checkable
class SceneIndexed(Protocol):
    """A provider that can list, from headers alone, the scenes a fetch would consider.

    ``scene_index(area, windows, sensor)`` maps the id of every scene of the source
    that intersects ``area`` within the windows' range to a stamp that changes when
    the scene does (a file's size and modification time, a STAC item's ``updated``,
    an Earth Engine granule's generation time). Cloud filters are not applied: a
    scene that becomes clearer matters too (Earth Engine lists the granules that pass
    its scene filter, as a fetch records them, so a granule crossing it appears or
    goes). The
    provider records the same index in its frame stack's record
    (:func:`agrifm_pipeline.lineage.scene_index_record`), so the stale sensor can tell
    a changed, added or removed scene without acquiring anything again. It must stay
    cheap: no pixels read, headers cached.
    """

    def scene_index(
        self, area: GeoBox, windows: Sequence[FrameWindow], sensor: SensorSpec
    ) -> dict[str, str]: ...


@runtime_checkable
class BatchSceneIndexed(SceneIndexed, Protocol):
    """A :class:`SceneIndexed` provider whose listing is a remote request (Earth Engine):
    it lists many tile-years per request, so callers list ahead, in its batches.

    ``listing_batches(requests, sensor)`` splits ``(key, area, windows)`` requests into
    the batches one request each lists; ``scene_indexes(requests, sensor, attempts=)``
    lists them (``{key: scene index}``, raising when a request fails; ``attempts``
    bounds each request's attempts, for a caller on a deadline).
    """

    def listing_batches(
        self, requests: Sequence[tuple[Any, GeoBox, Sequence[FrameWindow]]], sensor: SensorSpec
    ) -> list[list[tuple[Any, GeoBox, Sequence[FrameWindow]]]]: ...

    def scene_indexes(
        self,
        requests: Sequence[tuple[Any, GeoBox, Sequence[FrameWindow]]],
        sensor: SensorSpec,
        *,
        attempts: int | None = None,
    ) -> dict[Any, dict[str, str]]: ...
