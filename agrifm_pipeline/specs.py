"""Request specs in the peer's (rs-embed's) shape: where, when, what output.

``PointBuffer``/``BBox`` say where, ``TemporalSpec`` when, ``SensorSpec`` which
collection and compositing, and ``OutputSpec`` whether a call returns a pooled
vector or the embedding grid.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from agrifm_pipeline.errors import InputContractError, SettingsError
from agrifm_pipeline.model.config import AGRIFM_S2_BANDS

S2_L2A_FIRST_YEAR = 2017


def _date(value: str | dt.date, name: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise InputContractError(
            f"{name}={value!r} is not a date; use ISO format YYYY-MM-DD"
        ) from None


@dataclass(frozen=True)
class PointBuffer:
    """A square of ``2 * buffer_m`` metres centred on (lon, lat) in WGS84."""

    lon: float
    lat: float
    buffer_m: float

    def __post_init__(self) -> None:
        if not -180 <= self.lon <= 180 or not -90 <= self.lat <= 90:
            raise InputContractError(
                f"PointBuffer lon={self.lon}, lat={self.lat} is not a WGS84 position"
            )
        if not self.buffer_m > 0:
            raise InputContractError(
                f"PointBuffer buffer_m={self.buffer_m}; use a positive distance in metres"
            )

    def as_record(self) -> dict[str, Any]:
        return {"type": "PointBuffer", **asdict(self)}


@dataclass(frozen=True)
class BBox:
    """A rectangle in ``crs`` units (default WGS84 degrees)."""

    minx: float
    miny: float
    maxx: float
    maxy: float
    crs: str = "EPSG:4326"

    def __post_init__(self) -> None:
        if not (self.maxx > self.minx and self.maxy > self.miny):
            raise InputContractError(
                f"BBox({self.minx}, {self.miny}, {self.maxx}, {self.maxy}) is empty; "
                "give minx < maxx and miny < maxy"
            )

    def as_record(self) -> dict[str, Any]:
        return {"type": "BBox", **asdict(self)}


@dataclass(frozen=True)
class TemporalSpec:
    """An end-exclusive date range ``[start, end)``."""

    start: dt.date
    end: dt.date

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _date(self.start, "start"))
        object.__setattr__(self, "end", _date(self.end, "end"))
        if self.end <= self.start:
            raise InputContractError(
                f"temporal range [{self.start}, {self.end}) is empty; the end must be after the start"
            )

    @classmethod
    def range(cls, start: str | dt.date, end: str | dt.date) -> TemporalSpec:
        return cls(_date(start, "start"), _date(end, "end"))

    @classmethod
    def year(cls, year: int) -> TemporalSpec:
        if not isinstance(year, int) or year < 1:
            raise InputContractError(f"year={year!r} is not a calendar year")
        return cls(dt.date(year, 1, 1), dt.date(year + 1, 1, 1))

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    def as_record(self) -> dict[str, Any]:
        return {"type": "range", "start": self.start.isoformat(), "end": self.end.isoformat()}


@dataclass(frozen=True)
class SensorSpec:
    """Which S2 collection and bands, and how frames are composited."""

    collection: str = "COPERNICUS/S2_SR_HARMONIZED"
    bands: tuple[str, ...] = AGRIFM_S2_BANDS
    scale_m: float = 10.0
    cloudy_pct: float = 30.0
    composite: str = "median"
    fill_value: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(self.bands))
        if len(self.bands) != 10:
            raise SettingsError(
                f"bands={list(self.bands)} has {len(self.bands)} bands; AgriFM takes 10 "
                f"(default {list(AGRIFM_S2_BANDS)})"
            )
        if not 0 <= self.cloudy_pct <= 100:
            raise SettingsError(f"cloudy_pct={self.cloudy_pct}; use a percentage 0..100")
        if not self.scale_m > 0:
            raise SettingsError(f"scale_m={self.scale_m}; use a positive pixel size in metres")
        if self.composite not in ("median", "mosaic"):
            raise SettingsError(f"composite={self.composite!r}; use 'median' or 'mosaic'")

    def as_record(self) -> dict[str, Any]:
        rec = asdict(self)
        rec["bands"] = list(self.bands)
        return rec


@dataclass(frozen=True)
class OutputSpec:
    """``OutputSpec.pooled()`` (spatial mean, or ``pooling="max"``) or ``OutputSpec.grid()``."""

    mode: str = "pooled"
    pooling: str = "mean"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in ("pooled", "grid"):
            raise SettingsError(
                f"output mode {self.mode!r}; use OutputSpec.pooled() or OutputSpec.grid()"
            )
        if self.pooling not in ("mean", "max"):
            raise SettingsError(f"pooling={self.pooling!r}; use 'mean' or 'max'")

    @classmethod
    def pooled(cls, pooling: str = "mean") -> OutputSpec:
        return cls("pooled", pooling)

    @classmethod
    def grid(cls) -> OutputSpec:
        return cls("grid")

    @property
    def pooling_label(self) -> str:
        return f"spatial_{self.pooling}"
