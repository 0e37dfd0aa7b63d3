"""Sentinel-2 L2A from a STAC API: Earth Search (default), the Planetary Computer, any other.

Who does what:

* **pystac-client** searches (``POST /search``, paged, 100 items a page): one small
  search per tile-year (the tile's footprint, the year widened by a day on each side
  for the solar day, ``fields`` trimmed to the properties and assets used), through
  :class:`~agrifm_pipeline.providers.stac_http.RetryingStacIO`. The items' JSON is
  kept per tile-year in the store (``<storage root>/_sources/stac/…``), so a re-run
  does not search again; the stale sensor's listing searches afresh and refreshes it.
* **rasterio/GDAL** decode the COGs, and **requests** fetches their bytes: GDAL
  reads each asset through :class:`~agrifm_pipeline.providers.stac_http.RemoteFile`
  (HTTP Range requests: the header, then exactly the tiles of the window), so every
  request is retried, counted, signed at send time and, when it fails for good, named
  with its item, asset and HTTP status. A grid in the asset's own CRS is read as a
  window (a 20 m band or SCL onto the 10 m grid by nearest neighbour: each output
  pixel the source pixel that contains its centre); another CRS (a neighbouring UTM
  zone's granule) through GDAL's warper, nearest neighbour, as the ``local`` provider
  reads. SCL is never averaged, and no band is resampled other than by nearest.
* :mod:`~agrifm_pipeline.providers.compositing` composites, by the rules every
  provider shares.

The numbers are those of the ``local`` and ``gee`` providers, reflectance x 10000:

* **offset** per item from ``s2:processing_baseline`` (else the ``_Nxxxx_`` of its
  product URI), never from its date: from 04.00 on, 1000 is taken off every
  reflectance DN (every Earth Search Collection-1 item, whatever its date). DN 0 stays
  no data; a valid dark pixel (1..1000 before, reflectance <= 0) becomes DN 1, the
  darkest valid value, never no data.
* **duplicates**: one acquisition (MGRS tile + datatake, its baseline suffix left
  out) is one observation: the highest baseline wins, then the newest generation
  (``s2:generation_time``), then the item id; the others count as *merged*.
* **one pass**: the granules kept are grouped per solar day (the item's time plus
  its longitude / 15 hours) into one observation, fused per pixel: the first granule
  with data (SCL not 0) there gives the pixel's SCL and bands, granules in the
  area's own CRS first (no reprojection), then by id.
* the scene filter (``eo:cloud_cover <= cloudy_pct``) applies to each granule kept.

**Fewer bytes**: every granule's SCL is read first; a granule none of whose pixels on
the tile is clear (by the cloud mask's classes) is *skipped by SCL*: its reflectance is
never read. When SCL says a window will be empty (so the whole-range back-fill needs
every observation again), the observations read are kept for it instead of read twice.

**No silent holes**: a read that still fails after its retries fails the tile-year
with :class:`~agrifm_pipeline.errors.SourceRequestError` (item, asset, HTTP status);
with ``on_read_error="record"`` the granule is left out instead and recorded (each
frame's ``items`` counts it as *failed*; the stack's ``missing`` names it), never
turned into no data that looks like cloud. A tile that no item of the collection
reaches, at any date, fails with :class:`~agrifm_pipeline.errors.NoCoverageError`.

Each frame's record counts its items: ``found`` (solar day in the window),
``merged`` (duplicates and granules fused into another's observation),
``over_cloudy_pct``, ``skipped_by_scl``, ``read`` and ``failed``; they add up to
``found``.

**Change**: ``scene_index`` maps each item found in the range to its ``updated`` time,
generation time and baseline (a digest of its JSON when it has none of them), so a
reprocessed item under the same id is a changed scene. Listing is a request per
tile-year, so the provider lists as Earth Engine does, in batches (here of one),
a share per sensor tick (:mod:`agrifm_pipeline.scene_listing`).

GDAL's options (:data:`GDAL_OPTIONS`: no directory listing or sidecar probing on
open, CRS from the GeoTIFF keys) are fixed here, held by the provider (which is
pickled to dask workers with the resource that builds it) and entered once in each of
its read threads.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import rasterio
from odc.geo.geobox import GeoBox
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from agrifm_pipeline.errors import NoCoverageError, ProviderError, SettingsError, SourceRequestError
from agrifm_pipeline.frames import FrameWindow
from agrifm_pipeline.lineage import SCENE_INDEX_KEY, scene_index_record
from agrifm_pipeline.providers.base import CloudMask, FrameRecord, FrameStack, frame_stack_array
from agrifm_pipeline.providers.compositing import Scene, composite_windows
from agrifm_pipeline.providers.stac_http import (
    Counters,
    RangeGetter,
    RemoteFile,
    RequestFailed,
    RetryingStacIO,
    RetryPolicy,
    SasSigner,
    make_session,
)
from agrifm_pipeline.providers.stac_profiles import (
    SCL,
    StacProfile,
    baseline_tuple,
    boa_offset,
    resolve_profile,
)
from agrifm_pipeline.specs import SensorSpec

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)

#: GDAL's options for every read (see the module docstring), entered once per read thread.
GDAL_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing, no .aux.xml/.msk/.ovr probes
    "GTIFF_SRS_SOURCE": "GEOKEYS",  # the CRS the file's keys say, without PROJ look-ups
}
ON_READ_ERROR = ("fail", "record")
DEFAULT_READ_WORKERS = 8
MAX_READ_WORKERS = 64
#: Searches in flight at once when the stale sensor or the audit lists tile-years.
LIST_WORKERS = 4
PAGE_LIMIT = 100
CACHE_FORMAT = 1
#: Item properties a search asks for (``fields``), beside id, bbox, datetime and assets.
ITEM_PROPERTIES = (
    "datetime",
    "updated",
    "platform",
    "eo:cloud_cover",
    "s2:processing_baseline",
    "s2:generation_time",
    "s2:datatake_id",
    "s2:product_uri",
    "s2:mgrs_tile",
    "mgrs:utm_zone",
    "mgrs:latitude_band",
    "mgrs:grid_square",
    "grid:code",
    "sat:relative_orbit",
    "proj:epsg",
    "proj:code",
)
_PRODUCT = re.compile(
    r"^(?P<craft>S2[A-D])_MSIL2A_(?P<sensed>\d{8}T\d{6})_N(?P<pb>\d{4})_R(?P<orbit>\d{3})_"
    r"T(?P<tile>\d{2}[A-Z]{3})_(?P<generated>\d{8}T\d{6})"
)
_ITEM_ID = re.compile(r"^(?P<craft>S2[A-D])_T?(?P<tile>\d{2}[A-Z]{3})_(?P<sensed>\d{8}T\d{6})")
_DATATAKE_BASELINE = re.compile(r"_N\d{2}\.\d{2}$")
_STATUS_KEYS = ("merged", "over_cloudy_pct", "skipped_by_scl", "read", "failed")


def _package_version() -> str:
    from agrifm_pipeline import __version__

    return __version__


def check_on_read_error(value: str, *, name: str = "on_read_error") -> str:
    """``fail`` (a read failing for good fails the tile-year) or ``record`` (the granule is
    left out and recorded as a missing observation)."""
    text = str(value).strip().lower()
    if text not in ON_READ_ERROR:
        raise SettingsError(
            f"{name}={value!r}; use 'fail' (a read that fails after its retries fails the "
            "tile-year) or 'record' (the granule is left out, counted and named in the record)"
        )
    return text


# -- items ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Granule:
    """One STAC item as the provider uses it."""

    id: str
    when: dt.datetime  # UTC
    day: dt.date  # solar day
    platform: str  # S2A, S2B, …
    tile: str  # MGRS tile, e.g. 31UES
    datatake: str  # without its baseline suffix
    baseline: tuple[int, int]
    generation: dt.datetime | None
    cloud_pct: float | None
    epsg: int | None
    hrefs: dict[str, str]  # band -> asset href (unsigned)
    offset: int  # DN taken off reflectance (0 or 1000)
    stamp: str  # what changes when the item does

    @property
    def acquisition(self) -> tuple[str, str]:
        return self.tile, self.datatake

    def rank(self) -> tuple[Any, ...]:
        """Which of one acquisition's deliveries wins: highest baseline, newest generation."""
        gen = self.generation or dt.datetime.min.replace(tzinfo=dt.UTC)
        return self.baseline, gen, self.id


def _time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    text = str(value).strip()
    try:
        if re.fullmatch(r"\d{8}T\d{6}", text):
            return dt.datetime.strptime(text, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
        out = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return out if out.tzinfo else out.replace(tzinfo=dt.UTC)


def _solar_day(when: dt.datetime, bbox: Sequence[float] | None) -> dt.date:
    """The local solar day of an acquisition: UTC plus the footprint's longitude / 15 h."""
    if not bbox or len(bbox) < 4:
        return when.date()
    west, east = float(bbox[0]), float(bbox[2])
    lon = (west + east) / 2 if west <= east else ((west + east + 360) / 2 + 180) % 360 - 180
    return (when + dt.timedelta(hours=lon / 15)).date()


def _stamp(item: dict[str, Any], props: dict[str, Any]) -> str:
    parts = [
        f"{label} {props[key]}"
        for label, key in (
            ("updated", "updated"),
            ("generated", "s2:generation_time"),
            ("baseline", "s2:processing_baseline"),
        )
        if props.get(key)
    ]
    if parts:
        return " ".join(parts)
    text = json.dumps(item, sort_keys=True, default=str)
    return f"json {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def granule_of(item: dict[str, Any], profile: StacProfile, bands: Sequence[str]) -> Granule:
    """The item's id, times, acquisition, baseline, offset and asset hrefs, or a
    :class:`ProviderError` naming the item and what it lacks."""
    iid = str(item.get("id") or "")
    props = item.get("properties") or {}
    where = f"STAC item {iid or '<no id>'} of {profile.collection} ({profile.api_url})"
    when = _time(props.get("datetime")) or _time(props.get("start_datetime"))
    if not iid or when is None:
        raise ProviderError(f"{where} has no id or datetime; the archive's items are malformed")
    product = _PRODUCT.match(str(props.get("s2:product_uri") or ""))
    from_id = _ITEM_ID.match(iid)
    craft = str(props.get("platform") or "").strip().lower()
    platform = (
        f"S2{craft[-1].upper()}" if re.fullmatch(r"sentinel-?2[a-d]", craft) else
        product["craft"] if product else from_id["craft"] if from_id else craft.upper() or "S2"
    )  # fmt: skip
    tile = _mgrs_tile(props, product, from_id)
    datatake = str(props.get("s2:datatake_id") or "").strip()
    if datatake:
        datatake = _DATATAKE_BASELINE.sub("", datatake)
    elif product:
        datatake = f"{product['craft']}_{product['sensed']}_R{product['orbit']}"
    elif from_id:
        datatake = f"{from_id['craft']}_{from_id['sensed']}"
    if tile is None or not datatake:
        raise ProviderError(
            f"{where} lacks its MGRS tile (s2:mgrs_tile, grid:code, mgrs:*) or its datatake "
            "(s2:datatake_id, s2:product_uri): duplicates of one acquisition cannot be told "
            "apart; use an archive whose items carry the Sentinel-2 STAC extension"
        )
    baseline = baseline_tuple(props.get("s2:processing_baseline"))
    if baseline is None and product:
        baseline = (int(product["pb"][:2]), int(product["pb"][2:]))
    if baseline is None:
        if profile.harmonize != "none":
            raise ProviderError(
                f"{where} has no s2:processing_baseline (nor a product URI that names it): "
                "whether its reflectance carries the +1000 offset of baseline 04.00 cannot "
                "be decided, and never from the date alone; use an archive whose items "
                "carry it, or harmonize='none' (AGRIFM_PIPELINE_STAC_HARMONIZE=none) if this "
                "archive serves harmonized values"
            )
        baseline = (0, 0)
    assets = item.get("assets") or {}
    hrefs: dict[str, str] = {}
    missing = []
    for band in (*bands, SCL):
        key = profile.asset_key(band)
        href = (assets.get(key) or {}).get("href")
        if href:
            hrefs[band] = str(href)
        else:
            missing.append(f"{band} ({key})")
    if missing:
        raise ProviderError(
            f"{where} has no asset(s) {', '.join(missing)}; it has {sorted(assets)}. Give "
            "the archive's keys as assets={'B2': '<key>', …, 'SCL': '<key>'} "
            "(AGRIFM_PIPELINE_STAC_ASSETS)"
        )
    cloud = props.get("eo:cloud_cover")
    return Granule(
        id=iid,
        when=when,
        day=_solar_day(when, item.get("bbox")),
        platform=platform,
        tile=tile,
        datatake=datatake,
        baseline=baseline,
        generation=_time(props.get("s2:generation_time"))
        or (_time(product["generated"]) if product else None),
        cloud_pct=None if cloud is None else float(cloud),
        epsg=_epsg_of(props),
        hrefs=hrefs,
        offset=boa_offset(baseline, profile.harmonize),
        stamp=_stamp(item, props),
    )


def _mgrs_tile(props: dict[str, Any], product: Any, from_id: Any) -> str | None:
    text = str(props.get("s2:mgrs_tile") or "").strip().upper().lstrip("T")
    if re.fullmatch(r"\d{1,2}[A-Z]{3}", text):
        return text.zfill(5)
    code = str(props.get("grid:code") or "")
    if code.upper().startswith("MGRS-"):
        return code[5:].upper().zfill(5)
    zone, band, square = (
        props.get(k) for k in ("mgrs:utm_zone", "mgrs:latitude_band", "mgrs:grid_square")
    )
    if zone is not None and str(zone).isdigit() and band and square:
        return f"{int(zone):02d}{band}{square}".upper()
    if product:
        return str(product["tile"])
    if from_id:
        return str(from_id["tile"])
    return None


def _epsg_of(props: dict[str, Any]) -> int | None:
    code = props.get("proj:epsg")
    if code is None and str(props.get("proj:code") or "").upper().startswith("EPSG:"):
        code = str(props["proj:code"]).split(":", 1)[1]
    try:
        return None if code is None else int(code)
    except (TypeError, ValueError):
        return None


def dedupe(granules: Iterable[Granule]) -> tuple[list[Granule], list[Granule]]:
    """(kept, superseded): one granule per acquisition (MGRS tile + datatake), the one of
    highest baseline, then newest generation, then id."""
    best: dict[tuple[str, str], Granule] = {}
    superseded: list[Granule] = []
    for g in sorted(granules, key=lambda g: g.id):
        held = best.get(g.acquisition)
        if held is None:
            best[g.acquisition] = g
        elif g.rank() > held.rank():
            superseded.append(held)
            best[g.acquisition] = g
        else:
            superseded.append(g)
    return sorted(best.values(), key=lambda g: (g.when, g.id)), superseded


@dataclass
class Observation:
    """The granules of one solar day over the area, fused per pixel in this order."""

    id: str
    day: dt.date
    granules: list[Granule]


def observations(granules: Iterable[Granule], area_epsg: int | None) -> list[Observation]:
    """Granules grouped per solar day; within a day those in the area's CRS first."""
    by_day: dict[dt.date, list[Granule]] = {}
    for g in granules:
        by_day.setdefault(g.day, []).append(g)
    out = []
    for day, members in sorted(by_day.items()):
        members.sort(key=lambda g: (g.epsg != area_epsg, g.id))
        crafts = "+".join(sorted({g.platform for g in members}))
        out.append(Observation(f"{day.isoformat()}_{crafts}", day, members))
    return out


# -- pixels --------------------------------------------------------------------------------------


def _same_crs(src: Any, area: GeoBox) -> bool:
    assert area.crs is not None, "an area grid always has a CRS"
    if src.crs is None:
        return False
    epsg = area.crs.epsg
    if epsg is not None:
        return bool(src.crs.to_epsg() == epsg)
    return bool(src.crs == rasterio.crs.CRS.from_wkt(area.crs.to_wkt()))


def read_onto(src: Any, area: GeoBox, dtype: str) -> np.ndarray:
    """Band 1 of ``src`` on ``area``'s grid by nearest neighbour, 0 where it has no data.

    Same CRS and axis-aligned grids (any pixel sizes): the window the area needs, each
    output pixel the source pixel containing its centre (a 20 m band or SCL onto 10 m:
    each source pixel repeated, never averaged). Otherwise GDAL's warper, nearest
    neighbour, as the ``local`` provider reads."""
    a, s = area.affine, src.transform
    h, w = area.shape
    if _same_crs(src, area) and not (a.b or a.d or s.b or s.d):
        cols = np.floor((a.c + (np.arange(w) + 0.5) * a.a - s.c) / s.a).astype(np.int64)
        rows = np.floor((a.f + (np.arange(h) + 0.5) * a.e - s.f) / s.e).astype(np.int64)
        out = np.zeros((h, w), dtype=dtype)
        cin = (cols >= 0) & (cols < src.width)
        rin = (rows >= 0) & (rows < src.height)
        if not cin.any() or not rin.any():
            return out
        c0, c1 = int(cols[cin].min()), int(cols[cin].max()) + 1
        r0, r1 = int(rows[rin].min()), int(rows[rin].max()) + 1
        block = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0), out_dtype=dtype)
        out[np.ix_(rin, cin)] = block[np.ix_(rows[rin] - r0, cols[cin] - c0)]
        return out
    assert area.crs is not None
    with WarpedVRT(
        src,
        crs=_wkt_of(area.crs),
        transform=area.affine,
        width=w,
        height=h,
        resampling=Resampling.nearest,
        nodata=0,
    ) as vrt:
        return np.asarray(vrt.read(1, out_dtype=dtype))


@functools.lru_cache(maxsize=64)
def _wkt_of(crs: Any) -> str:
    return str(crs.to_wkt())


def harmonize(values: np.ndarray, offset: int) -> np.ndarray:
    """Reflectance DN on the harmonized scale, in place: ``offset`` taken off; 0 (no data)
    stays 0; a valid DN at or below the offset (reflectance <= 0) becomes 1."""
    if offset:
        dark = (values > 0) & (values <= offset)
        np.subtract(values, offset, out=values, where=values > offset)
        values[dark] = 1
    return values


def _enter_gdal(options: dict[str, str]) -> None:
    """A read thread's GDAL options, for its life (rasterio's environment is per thread)."""
    env = rasterio.Env(**options)
    env.__enter__()
    _THREAD.env = env


_THREAD = threading.local()


@dataclass
class _Plan:
    """What one fetch knows of its granules: status, fused SCL per observation."""

    status: dict[str, str] = field(default_factory=dict)  # granule id -> one of _STATUS_KEYS
    missing: list[dict[str, Any]] = field(default_factory=list)
    scl: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # obs -> scl, pick


class _TileReads:
    """The reads of one fetch: SCL of every observation first, then the bands of the
    granules SCL says are worth it, a window's observations at a time (see the module
    docstring)."""

    def __init__(
        self,
        provider: StacProvider,
        area: GeoBox,
        sensor: SensorSpec,
        cloud_mask: CloudMask,
        counters: Counters,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.p, self.area, self.sensor, self.mask = provider, area, sensor, cloud_mask
        self.counters, self.pool = counters, pool
        self.plan = _Plan()
        self.keep = False  # keep bands read for the back-fill (SCL says a window is empty)
        self._bands: dict[str, list[tuple[int, str, Future[np.ndarray]]]] = {}
        self._kept: dict[str, np.ndarray] = {}
        self._zeros: np.ndarray | None = None
        self._lock = threading.Lock()

    # -- one asset -------------------------------------------------------------------
    def read(self, g: Granule, band: str) -> np.ndarray:
        """One asset of ``g`` on the area's grid (uint8 SCL, uint16 harmonized bands)."""
        href = g.hrefs[band]
        remote = RemoteFile(href, self.p.getter, self.counters)
        dtype = "uint8" if band == SCL else "uint16"
        try:
            with rasterio.open(remote.path, opener=remote.opener) as src:
                values = read_onto(src, self.area, dtype)
        except RasterioError as exc:
            if remote.failure is not None:
                raise self.p.read_error(g, band, remote.failure) from exc
            raise SourceRequestError(
                f"{g.id} asset {self.p.profile.asset_key(band)} ({href}) cannot be decoded: "
                f"{exc}; the file is damaged or not a GeoTIFF",
                url=href, status=None, reason=str(exc), attempts=1, item=g.id, asset=band,
            ) from exc  # fmt: skip
        if remote.failure is not None:  # a short read GDAL let through
            raise self.p.read_error(g, band, remote.failure)
        return values if band == SCL else harmonize(values, g.offset)

    def _failed(self, g: Granule, exc: SourceRequestError) -> None:
        if self.p.on_read_error == "fail":
            raise exc
        with self._lock:
            if self.plan.status.get(g.id) != "failed":
                self.plan.status[g.id] = "failed"
                self.plan.missing.append(
                    {
                        "item": g.id,
                        "asset": self.p.profile.asset_key(exc.asset or SCL),
                        "url": exc.url,
                        "status": exc.status,
                        "reason": exc.reason,
                        "attempts": exc.attempts,
                    }
                )
        log.warning("left out (on_read_error=record): %s", exc)

    # -- SCL first ---------------------------------------------------------------------
    def scl(self, obs: Sequence[Observation], windows: Sequence[FrameWindow]) -> None:
        futures = {
            (o.id, g.id): self.pool.submit(self.read, g, SCL) for o in obs for g in o.granules
        }
        masked = self.mask.scl_classes if self.mask.mode == "scl" else ()
        for o in obs:
            scl = np.zeros(self.area.shape, np.uint8)
            pick = np.full(self.area.shape, -1, np.int8)
            has_data: list[bool] = []
            for k, g in enumerate(o.granules):
                try:
                    layer = futures[(o.id, g.id)].result()
                except SourceRequestError as exc:
                    self._failed(g, exc)
                    has_data.append(False)
                    continue
                data = layer != 0
                has_data.append(bool(data.any()))
                take = data & (pick < 0)
                scl[take], pick[take] = layer[take], k
            clear = (scl != 0) & ~np.isin(scl, masked)
            for k, g in enumerate(o.granules):
                if self.plan.status.get(g.id) == "failed":
                    continue
                mine = pick == k
                if (mine & clear).any():
                    self.plan.status[g.id] = "read"
                elif mine.any() or not has_data[k]:
                    self.plan.status[g.id] = "skipped_by_scl"
                else:  # data, but every pixel of it taken by a granule before it
                    self.plan.status[g.id] = "merged"
            self.plan.scl[o.id] = (scl, pick)
        # A window none of whose observations has a clear pixel will be back-filled from
        # the whole range: keep what is read for it rather than read it twice.
        reading = {o.day for o in obs if any(self._wanted(o))}
        self.keep = any(not any(w.contains(d) for d in reading) for w in windows)

    def _wanted(self, o: Observation) -> list[int]:
        return [k for k, g in enumerate(o.granules) if self.plan.status.get(g.id) == "read"]

    # -- then the bands -------------------------------------------------------------------
    def _submit(self, o: Observation) -> None:
        if o.id in self._bands or o.id in self._kept:
            return
        self._bands[o.id] = [
            (k, band, self.pool.submit(self.read, o.granules[k], band))
            for k in self._wanted(o)
            for band in self.sensor.bands
        ]

    def loader(
        self, o: Observation, window_of: Callable[[Observation], list[Observation]]
    ) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def load() -> tuple[np.ndarray, np.ndarray]:
            scl, pick = self.plan.scl[o.id]
            if not self._wanted(o):
                return self._nothing(), scl
            if o.id in self._kept:
                return self._kept[o.id], scl
            if o.id not in self._bands:  # the window's reads in flight together
                for other in window_of(o):
                    self._submit(other)
            data = np.zeros((len(self.sensor.bands), *self.area.shape), np.uint16)
            index = {b: i for i, b in enumerate(self.sensor.bands)}
            failed: set[int] = set()
            for k, band, future in self._bands.pop(o.id):
                try:
                    values = future.result()
                except SourceRequestError as exc:
                    self._failed(o.granules[k], exc)
                    failed.add(k)
                    continue
                mine = pick == k
                data[index[band]][mine] = values[mine]
            for k in failed:  # a granule's pixels are an observation only with every band
                data[:, pick == k] = 0
            if self.keep:
                self._kept[o.id] = data
            return data, scl

        return load

    def _nothing(self) -> np.ndarray:
        if self._zeros is None:
            self._zeros = np.zeros((len(self.sensor.bands), *self.area.shape), np.uint16)
            self._zeros.flags.writeable = False
        return self._zeros


# -- the provider --------------------------------------------------------------------------------


class StacProvider:
    """Sentinel-2 L2A frame stacks from a STAC API (see the module docstring)."""

    name = "stac"

    synthetic = False

    @staticmethod
    def identity(
        profile: str = "earth-search",
        api_url: str | None = None,
        collection: str | None = None,
        assets: Any = None,
        sas_url: str | None = None,
        harmonize: str | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        """What names this source in lineage and fingerprints: the profile, API,
        collection, asset map and harmonization (not the cache, retries or workers)."""
        p = resolve_profile(
            profile, api_url=api_url, collection=collection, assets=assets, sas_url=sas_url,
            harmonize=harmonize,
        )  # fmt: skip
        rec = p.as_record()
        rec.pop("signing")
        return {"name": "stac", **rec}

    def __init__(
        self,
        profile: str = "earth-search",
        *,
        api_url: str | None = None,
        collection: str | None = None,
        assets: Any = None,
        sas_url: str | None = None,
        harmonize: str | None = None,
        item_cache: str | None = None,
        item_cache_options: dict[str, Any] | None = None,
        on_read_error: str = "fail",
        read_workers: int = DEFAULT_READ_WORKERS,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        user_agent: str | None = None,
        page_limit: int = PAGE_LIMIT,
    ) -> None:
        self.profile = resolve_profile(
            profile, api_url=api_url, collection=collection, assets=assets, sas_url=sas_url,
            harmonize=harmonize,
        )  # fmt: skip
        self.on_read_error = check_on_read_error(on_read_error)
        if isinstance(read_workers, bool) or not isinstance(read_workers, int):
            raise SettingsError(f"read_workers={read_workers!r}; use a whole number 1..64")
        if not 1 <= read_workers <= MAX_READ_WORKERS:
            raise SettingsError(
                f"read_workers={read_workers}; use 1..{MAX_READ_WORKERS} (reads in flight per "
                "tile-year; the step fetches several tile-years at once besides)"
            )
        self.read_workers = read_workers
        self.page_limit = page_limit
        self.policy = retry or RetryPolicy()
        self._sleep = sleep
        self.item_cache = (item_cache or "").rstrip("/") or None
        self.item_cache_options = dict(item_cache_options or {})
        self.gdal_options = dict(GDAL_OPTIONS)
        self.source_title = self.profile.title
        self.headers = {"User-Agent": user_agent or f"agrifm-pipeline/{_package_version()}"}
        self.version = (
            f"{_package_version()} pystac-client {_pystac_client_version()} "
            f"rasterio {rasterio.__version__} GDAL {rasterio.__gdal_version__}"
        )
        self._session_lock = threading.Lock()
        self._session_obj: Any = None
        self._signer: SasSigner | None = None

    # -- connections (made on first use: the provider is pickled to dask workers) ------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_session_obj=None, _signer=None, _session_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._session_lock = threading.Lock()

    @property
    def session(self) -> Any:
        with self._session_lock:
            if self._session_obj is None:
                self._session_obj = make_session(pool=max(32, 4 * self.read_workers))
                self._session_obj.headers.update(self.headers)
                if self.profile.signing == "planetary-computer":
                    assert self.profile.sas_url is not None
                    self._signer = SasSigner(
                        self.profile.sas_url, self._session_obj, self.policy, sleep=self._sleep
                    )
            return self._session_obj

    @property
    def getter(self) -> RangeGetter:
        session = self.session
        return RangeGetter(session, self.policy, signer=self._signer, sleep=self._sleep)

    @property
    def signer(self) -> SasSigner | None:
        _ = self.session
        return self._signer

    # -- searching ------------------------------------------------------------------------
    def _query(self, area: GeoBox, start: dt.date, end: dt.date) -> dict[str, Any]:
        """The search of one tile-year: the area's footprint, the range widened by a day on
        each side (solar days), the collection and the fields used."""
        from shapely.geometry.polygon import orient

        footprint = area.extent.to_crs("EPSG:4326")
        bbox = [round(float(v), 7) for v in footprint.boundingbox]
        # Counter-clockwise (RFC 7946), rounded: the cache key must not hang on PROJ's last digits.
        ring = orient(footprint.geom, 1.0).exterior.coords
        geometry = {
            "type": "Polygon",
            "coordinates": [[[round(float(x), 7), round(float(y), 7)] for x, y in ring]],
        }
        first = start - dt.timedelta(days=1)
        last = end + dt.timedelta(days=1)
        return {
            "api": self.profile.api_url,
            "collection": self.profile.collection,
            "bbox": bbox,
            "intersects": geometry,
            "datetime": f"{first.isoformat()}T00:00:00Z/{last.isoformat()}T00:00:00Z",
            "range": [start.isoformat(), end.isoformat()],
            "assets": sorted(set(self.profile.assets.values())),
        }

    def _fields(self) -> list[str]:
        keys = sorted(set(self.profile.assets.values()))
        return [
            "id",
            "bbox",
            *(f"properties.{p}" for p in ITEM_PROPERTIES),
            *(f"assets.{k}" for k in keys),
            "-geometry",
            "-links",
        ]

    def _search(
        self,
        query: dict[str, Any],
        counters: Counters,
        policy: RetryPolicy,
        *,
        dated: bool = True,
        max_items: int | None = None,
    ) -> list[dict[str, Any]]:
        """Every item the API finds for ``query`` (all pages), retried; the search failing
        for good is a :class:`SourceRequestError` naming the API and the status."""
        from pystac_client.item_search import ItemSearch

        stac_io = RetryingStacIO(self.session, policy, counters, sleep=self._sleep)
        search = ItemSearch(
            f"{self.profile.api_url}/search",
            method="POST",
            stac_io=stac_io,
            collections=[self.profile.collection],
            intersects=query["intersects"],
            datetime=query["datetime"] if dated else None,
            limit=self.page_limit if max_items is None else max_items,
            max_items=max_items,
            fields=self._fields(),
        )
        try:
            out: list[dict[str, Any]] = []
            for page in search.pages_as_dicts():
                out.extend(page.get("features", []))
                if max_items is not None and len(out) >= max_items:
                    break
            return out
        except RequestFailed as exc:
            raise SourceRequestError(
                f"the search of {self.profile.title} ({self.profile.api_url}) for "
                f"{self.profile.collection} over {query['bbox']} in {query['range']} failed: "
                f"{exc.why()}. Try again later; if it keeps failing, check the API's status "
                "and the profile's api_url and collection",
                url=exc.url, status=exc.status, reason=exc.reason, attempts=exc.attempts,
            ) from exc  # fmt: skip

    def _cache_url(self, query: dict[str, Any]) -> str | None:
        if self.item_cache is None:
            return None
        digest = hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:24]
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", urlparse(self.profile.api_url).netloc) or "api"
        coll = re.sub(r"[^A-Za-z0-9_.-]", "_", self.profile.collection)
        year = query["range"][0][:4]
        return f"{self.item_cache}/{host}/{coll}/{year}/{digest}.json"

    def _cache_read(self, url: str) -> list[dict[str, Any]] | None:
        from agrifm_pipeline.storage.fs import filesystem

        fs, path = filesystem(url, self.item_cache_options)
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            if doc.get("format") != CACHE_FORMAT or not isinstance(doc.get("items"), list):
                raise ValueError(f"format {doc.get('format')!r}")
        except (ValueError, AttributeError) as exc:
            log.warning("item cache %s is unreadable (%s): searching again", url, exc)
            return None
        return list(doc["items"])

    def _cache_write(self, url: str, query: dict[str, Any], items: list[dict[str, Any]]) -> None:
        from agrifm_pipeline.storage.fs import write_file_atomic

        doc = {
            "format": CACHE_FORMAT,
            "query": query,
            "searched": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "items": items,
        }
        write_file_atomic(url, json.dumps(doc, sort_keys=True).encode(), self.item_cache_options)

    def items(
        self,
        area: GeoBox,
        start: dt.date,
        end: dt.date,
        counters: Counters,
        *,
        fresh: bool = False,
        policy: RetryPolicy | None = None,
    ) -> tuple[list[dict[str, Any]], str]:
        """The items of one tile-year's search and where they came from (``cache`` or
        ``api``). ``fresh``: search even when cached (a listing), refreshing the cache
        when the answer differs."""
        query = self._query(area, start, end)
        url = self._cache_url(query)
        cached = self._cache_read(url) if url is not None else None
        if cached is not None and not fresh:
            return cached, "cache"
        found = self._search(query, counters, policy or self.policy)
        if url is not None and found != cached:
            self._cache_write(url, query, found)
        return found, "api"

    def _covered(self, area: GeoBox, counters: Counters) -> bool:
        """Whether any item of the collection, of any date, reaches ``area`` (one request)."""
        query = self._query(area, dt.date(2000, 1, 1), dt.date(2000, 1, 2))
        return bool(self._search(query, counters, self.policy, dated=False, max_items=1))

    def granules(
        self, items: Iterable[dict[str, Any]], sensor: SensorSpec, start: dt.date, end: dt.date
    ) -> list[Granule]:
        """The items whose solar day is in ``[start, end)``, as granules."""
        out = [granule_of(item, self.profile, sensor.bands) for item in items]
        return [g for g in out if start <= g.day < end]

    def read_error(self, g: Granule, band: str, exc: RequestFailed) -> SourceRequestError:
        key = self.profile.asset_key(band)
        fix = (
            "set on_read_error='record' (AGRIFM_PIPELINE_STAC_ON_READ_ERROR=record) to leave "
            "such a granule out and record it"
        )
        if exc.status == 404:
            fix = "the archive lists an asset it does not hold; report it to the archive, or " + fix
        elif exc.status in (401, 403, 409):
            fix = (
                "the storage refuses anonymous reads: use the profile that signs them "
                "(planetary-computer) or check the archive's access rules; or " + fix
            )
        else:
            fix = "try again later; or " + fix
        return SourceRequestError(
            f"reading {g.id} asset {key} ({exc.url}) failed: {exc.why()}; {fix}",
            url=exc.url, status=exc.status, reason=exc.reason, attempts=exc.attempts,
            item=g.id, asset=band,
        )  # fmt: skip

    # -- change detection -------------------------------------------------------------------
    @staticmethod
    def stamps(granules: Iterable[Granule]) -> dict[str, str]:
        return {g.id: g.stamp for g in granules}

    def listing_batches(
        self, requests: Sequence[tuple[K, GeoBox, Sequence[FrameWindow]]], sensor: SensorSpec
    ) -> list[list[tuple[K, GeoBox, Sequence[FrameWindow]]]]:
        """One search per tile-year: each request a batch of its own."""
        return [[r] for r in requests]

    def scene_indexes(
        self,
        requests: Sequence[tuple[K, GeoBox, Sequence[FrameWindow]]],
        sensor: SensorSpec,
        *,
        attempts: int | None = None,
    ) -> dict[K, dict[str, str]]:
        """``{key: {item id: stamp}}``: what a fetch of each (area, windows) would record now,
        from a fresh search each (the item cache refreshed where it differs); raises when a
        search fails for good (``attempts`` bounds each request's attempts)."""
        policy = self.policy.with_attempts(attempts)

        def one(req: tuple[K, GeoBox, Sequence[FrameWindow]]) -> tuple[K, dict[str, str]]:
            key, area, windows = req
            start, end = windows[0].start, windows[-1].end
            found, _ = self.items(area, start, end, Counters(), fresh=True, policy=policy)
            return key, self.stamps(self.granules(found, sensor, start, end))

        workers = max(1, min(LIST_WORKERS, len(requests)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return dict(pool.map(one, requests))

    def scene_index(
        self, area: GeoBox, windows: Sequence[FrameWindow], sensor: SensorSpec
    ) -> dict[str, str]:
        """The items a fetch of ``area`` would record now (one fresh search)."""
        return self.scene_indexes([(0, area, windows)], sensor)[0]

    # -- the interface ----------------------------------------------------------------------
    def fetch(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> FrameStack:
        for band in sensor.bands:
            self.profile.asset_key(band)  # every band mapped, before any request
        counters = Counters()
        start, end = windows[0].start, windows[-1].end
        label = f"{area.crs} {tuple(area.extent.boundingbox)}"
        items, source = self.items(area, start, end, counters)
        found = self.granules(items, sensor, start, end)
        if not found and not self._covered(area, counters):
            where = f"{self.profile.title} collection {self.profile.collection} ({self.profile.api_url})"
            raise NoCoverageError(label, where, None)
        kept, superseded = dedupe(found)
        passing = [g for g in kept if g.cloud_pct is None or g.cloud_pct <= sensor.cloudy_pct]
        obs = observations(passing, area.crs.epsg if area.crs is not None else None)
        by_window = {
            w.index: [o for o in obs if w.contains(o.day)] for w in windows
        }  # fmt: skip

        members = {o.id: m for m in by_window.values() for o in m}

        def window_of(o: Observation) -> list[Observation]:
            return members.get(o.id, [o])

        pool = ThreadPoolExecutor(
            max_workers=self.read_workers,
            thread_name_prefix="stac-read",
            initializer=_enter_gdal,
            initargs=(self.gdal_options,),
        )
        try:
            reads = _TileReads(self, area, sensor, cloud_mask, counters, pool)
            reads.scl(obs, windows)
            scenes = [Scene(o.id, o.day, None, reads.loader(o, window_of)) for o in obs]
            try:
                values, records = composite_windows(
                    scenes, windows, sensor, cloud_mask, area_label=label
                )
            except ProviderError as exc:
                if reads.plan.missing:
                    raise ProviderError(
                        f"{exc}; {len(reads.plan.missing)} granule read(s) failed and were "
                        f"left out (on_read_error=record): {_names(reads.plan.missing)}"
                    ) from exc
                raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        plan = reads.plan
        for g in superseded:
            plan.status[g.id] = "merged"
        for g in kept:
            plan.status.setdefault(g.id, "over_cloudy_pct")
        for rec in records:
            rec.items = _counts(rec, found, plan.status)
        offsets = Counter(g.offset for g in kept)
        return FrameStack(
            data=frame_stack_array(values, area, windows, sensor.bands),
            frames=records,
            provider=self.name,
            provider_version=self.version,
            extra={
                **{k: v for k, v in self.profile.as_record().items() if k != "assets"},
                "items_source": source,
                "items_found": len(found),
                "items_superseded": len(superseded),
                "observations": len(obs),
                "items_by_status": dict(sorted(Counter(plan.status[g.id] for g in found).items())),
                "on_read_error": self.on_read_error,
                "missing": plan.missing,
                "harmonization": {
                    "rule": "baseline >= 04.00: DN - 1000 (0 stays no data, 1..1000 -> 1)"
                    if self.profile.harmonize == "baseline"
                    else "none: DN as served",
                    "items_offset": offsets.get(1000, 0),
                    "items_not_offset": offsets.get(0, 0),
                },
                **{f"http_{k}": v for k, v in counters.record().items()},
                SCENE_INDEX_KEY: scene_index_record(self.stamps(found)),
            },
        )


def _names(missing: Sequence[dict[str, Any]], limit: int = 4) -> str:
    text = ", ".join(
        f"{m['item']} {m['asset']} (HTTP {m['status']})" if m["status"] else
        f"{m['item']} {m['asset']} ({m['reason']})"
        for m in missing[:limit]
    )  # fmt: skip
    return text + (f" and {len(missing) - limit} more" if len(missing) > limit else "")


def _counts(rec: FrameRecord, found: Sequence[Granule], status: dict[str, str]) -> dict[str, int]:
    """How the window's items fared: found = merged + over_cloudy_pct + skipped_by_scl +
    read + failed."""
    mine = [g for g in found if rec.start <= g.day < rec.end]
    out = {"found": len(mine), **dict.fromkeys(_STATUS_KEYS, 0)}
    for g in mine:
        out[status[g.id]] += 1
    return out


def _pystac_client_version() -> str:
    try:
        from importlib.metadata import version

        return version("pystac-client")
    except Exception:  # pragma: no cover - metadata missing in an odd install
        return "unknown"
