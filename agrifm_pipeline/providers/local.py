"""Sentinel-2 L2A scenes you already have: a directory of GeoTIFFs/COGs, or a static STAC catalog.

Directory layout (the layout of ``data/s2_sample``)::

    root/
      YYYY-MM-DD.tif          one scene per acquisition date, uint16 DN (reflectance x 10000),
                              the 10 bands in SensorSpec order (or named by band descriptions),
                              nodata 0, any CRS and resolution
      masks/YYYY-MM-DD.tif    same grid; band 2 (or the band described "SCL") = Sen2Cor SCL
      manifest.json           optional; ``dates[].cloud_fraction`` gives each scene's cloudy
                              share (0..1) for the ``cloudy_pct`` filter

Without a manifest, a scene's cloudy percentage is computed from its own SCL
(medium/high-probability cloud and thin cirrus, over the pixels with data), as
Sen2Cor's ``CLOUDY_PIXEL_PERCENTAGE`` is.

STAC: ``root`` is a static ``catalog.json`` (or a directory holding one) whose
items carry one asset per band (named as in ``SensorSpec.bands``) plus an
``SCL`` asset, and ``eo:cloud_cover`` in their properties; items are read
with odc-stac.

Pixels are read onto the requested grid with rasterio's warper (odc-stac for
STAC), nearest-neighbour for both reflectance and SCL: every output pixel is
then a real observation that agrees with its own SCL class, and on a grid
aligned with the source (same UTM zone and 10 m lattice) the read is exact.
Parts of the grid a scene does not cover are no data, which lowers the clear
fraction rather than failing.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from odc.geo.geobox import GeoBox
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from agrifm_pipeline.errors import NoCoverageError, ProviderError
from agrifm_pipeline.frames import FrameWindow
from agrifm_pipeline.lineage import SCENE_INDEX_KEY, scene_index_record
from agrifm_pipeline.providers.base import CloudMask, FrameStack, frame_stack_array
from agrifm_pipeline.providers.compositing import Scene, composite_windows, fill_dn
from agrifm_pipeline.specs import SensorSpec

# A GeoTIFF's CRS as its GeoKeys define it. GDAL's default (AUTO) looks the EPSG
# code up in PROJ's database and compares the two definitions on every open, a
# large share of opening a small scene (bench/bench_provider.py), for the same CRS
# whenever the file is consistent.
_GDAL_OPTIONS = {"GTIFF_SRS_SOURCE": "GEOKEYS"}
_DATE_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.tif{1,2}$", re.IGNORECASE)
CLOUDY_SCL = (8, 9, 10)


def _package_version() -> str:
    from agrifm_pipeline import __version__

    return __version__


@dataclass(frozen=True)
class _Header:
    """What the provider needs to know about a file before reading pixels from it."""

    crs: Any  # rasterio CRS or None
    bounds: tuple[float, float, float, float]
    transform: tuple[float, ...]
    shape: tuple[int, int]
    count: int
    descriptions: tuple[str, ...]


@functools.lru_cache(maxsize=8192)
def _header_of(path: str, mtime_ns: int, size: int) -> _Header:
    with rasterio.open(path) as src:
        return _Header(
            crs=src.crs,
            bounds=tuple(src.bounds),
            transform=tuple(src.transform),
            shape=tuple(src.shape),
            count=src.count,
            descriptions=tuple(d or "" for d in src.descriptions),
        )


def _header(path: Path) -> _Header:
    """The file's header, opened once per process and version of the file.

    A tile-year asks for every scene's bounds, bands and mask layout several
    times, and a backfill asks again for every tile; keyed by modification
    time and size, so a replaced file is read afresh.
    """
    st = path.stat()
    return _header_of(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8192)
def _cloudy_pct_of(path: str, mtime_ns: int, size: int, index: int) -> float:
    with rasterio.open(path) as m:
        scl = m.read(index)
    valid = scl != 0
    return 100.0 * float(np.isin(scl[valid], CLOUDY_SCL).sum()) / max(1, int(valid.sum()))


def _wkt(area: GeoBox) -> str:
    assert area.crs is not None, "an area grid always has a CRS"
    return _wkt_of(area.crs)


@functools.lru_cache(maxsize=64)
def _wkt_of(crs: Any) -> str:
    return str(crs.to_wkt())


@functools.lru_cache(maxsize=65536)
def _bounds_in(src_bounds: tuple[float, ...], src_crs: Any, dst: str) -> tuple[float, ...]:
    """A scene's bounds in another CRS (once per scene version and CRS: a tile-year, the
    stale sensor and a backfill ask for the same few CRSs many times)."""
    return tuple(transform_bounds(src_crs, dst, *src_bounds, densify_pts=21))


def _overlaps(src_bounds: Any, src_crs: Any, area: GeoBox) -> bool:
    left, bottom, right, top = _bounds_in(tuple(src_bounds), src_crs, _wkt(area))
    a = area.extent.boundingbox
    return left < a.right and right > a.left and bottom < a.top and top > a.bottom


def _stamp(path: Path) -> str:
    """What changes when the file does: its size and modification time (ns)."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _lonlat_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two (west, south, east, north) boxes meet; a box across 180° always may."""
    if a[0] > a[2] or b[0] > b[2]:
        return a[1] < b[3] and a[3] > b[1]
    return a[0] < b[2] and a[2] > b[0] and a[1] < b[3] and a[3] > b[1]


def _lonlat(area: GeoBox) -> tuple[float, float, float, float]:
    bb = area.extent.to_crs("EPSG:4326").boundingbox
    return (bb.left, bb.bottom, bb.right, bb.top)


@functools.lru_cache(maxsize=64)
def _epsg(crs: Any) -> int | None:
    return None if crs is None else crs.to_epsg()


def _aligned_offset(head: _Header, area: GeoBox) -> tuple[int, int] | None:
    """(row, col) of ``area``'s top-left pixel in the scene ``head`` describes when both
    share CRS, pixel size and lattice (a scene already on the tile's UTM grid); None
    otherwise."""
    a, s = area.affine, Affine(*head.transform[:6])
    if a.b or a.d or s.b or s.d or (a.a, a.e) != (s.a, s.e) or area.crs is None:
        return None
    if _epsg(head.crs) != area.crs.epsg:
        return None
    col, row = (a.c - s.c) / s.a, (a.f - s.f) / s.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(row), round(col)


def _read_onto(path: Path, area: GeoBox, indexes: list[int], dtype: str) -> np.ndarray:
    """The bands ``indexes`` of ``path`` on ``area``'s grid (nearest neighbour, 0 = no data)."""
    offset = _aligned_offset(_header(path), area)
    with rasterio.open(path) as src:
        if offset is not None:
            # Same lattice: nearest-neighbour warping is a plain copy of the overlap,
            # read directly (no warper) into a no-data canvas.
            out = np.zeros((len(indexes), *area.shape), dtype=dtype)
            (r, c), (h, w) = offset, area.shape
            r0, c0 = max(r, 0), max(c, 0)
            r1, c1 = min(r + h, src.height), min(c + w, src.width)
            if r1 > r0 and c1 > c0:
                window = Window(c0, r0, c1 - c0, r1 - r0)
                out[:, r0 - r : r1 - r, c0 - c : c1 - c] = src.read(
                    indexes, window=window, out_dtype=dtype
                )
            return out
        with WarpedVRT(
            src,
            crs=_wkt(area),
            transform=area.affine,
            width=area.shape[1],
            height=area.shape[0],
            resampling=Resampling.nearest,
            nodata=0,
        ) as vrt:
            return vrt.read(indexes, out_dtype=dtype)


@dataclass(frozen=True)
class _Item:
    """A STAC item as the provider uses it: when, where (WGS84 bbox) and its stamp."""

    item: Any  # pystac.Item
    day: dt.date
    bbox: tuple[float, ...] | None
    stamp: str  # its ``updated`` time, else a digest of the item's JSON


class LocalProvider:
    """Scenes from a local directory or static STAC catalog (see the module docstring)."""

    name = "local"

    synthetic = False

    @staticmethod
    def identity(root: str | Path) -> dict[str, Any]:
        """What names this source in lineage and fingerprints."""
        return {"name": "local", "root": str(root)}

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise ProviderError(
                f"local provider root {self.root} does not exist; give a scene directory or catalog.json"
            )
        catalog = self.root if self.root.suffix == ".json" else self.root / "catalog.json"
        self.catalog = catalog if catalog.is_file() else None
        self._items: list[_Item] | None = None  # the catalog's items, read once
        if self.catalog is None:
            self._files = sorted(p for p in self.root.iterdir() if _DATE_FILE.match(p.name))
            if not self._files:
                raise ProviderError(
                    f"{self.root} holds no scenes (expected YYYY-MM-DD.tif files, or a STAC catalog.json)"
                )
            self._cloud = self._manifest_cloud()
        listing = "\n".join(
            p.name for p in (self._files if self.catalog is None else [self.catalog])
        )
        self.version = f"{_package_version()}+{hashlib.sha256(listing.encode()).hexdigest()[:12]}"

    # -- directory ---------------------------------------------------------------------
    def _files_in(self, start: dt.date, end: dt.date) -> Iterator[tuple[Path, dt.date]]:
        """The scene files dated in [start, end), with their dates."""
        for path in self._files:
            m = _DATE_FILE.match(path.name)
            assert m is not None
            day = dt.date.fromisoformat(m.group(1))
            if start <= day < end:
                yield path, day

    def _manifest_cloud(self) -> dict[str, float]:
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            return {}
        try:
            entries = json.loads(manifest.read_text()).get("dates", [])
            return {
                str(e["date"]): 100.0 * float(e["cloud_fraction"])
                for e in entries
                if "cloud_fraction" in e
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProviderError(
                f"{manifest} is not a readable scene manifest ({exc}); fix or remove it"
            ) from exc

    def _band_indexes(self, path: Path, sensor: SensorSpec) -> list[int]:
        head = _header(path)
        descriptions, count = list(head.descriptions), head.count
        named = [d.upper() for d in descriptions]
        if all(named):
            missing = [b for b in sensor.bands if b.upper() not in named]
            if missing:
                raise ProviderError(
                    f"{path.name} has bands {descriptions}; it lacks {missing} requested by SensorSpec.bands"
                )
            return [named.index(b.upper()) + 1 for b in sensor.bands]
        if count != len(sensor.bands):
            raise ProviderError(
                f"{path.name} has {count} unnamed bands but SensorSpec asks for {len(sensor.bands)} "
                f"({list(sensor.bands)}); write band descriptions or give the bands in that order"
            )
        return list(range(1, count + 1))

    def _mask_path(self, scene: Path) -> Path:
        return self.root / "masks" / scene.name

    def _scl_index(self, mask: Path, scene: Path) -> int:
        m, s = _header(mask), _header(scene)
        if m.crs != s.crs or not np.allclose(m.transform, s.transform) or m.shape != s.shape:
            raise ProviderError(
                f"mask {mask} is not on the grid of {scene.name} (CRS {m.crs} vs {s.crs}, "
                f"shape {m.shape} vs {s.shape}); masks must share their scene's grid"
            )
        names = [d.upper() for d in m.descriptions]
        if "SCL" in names:
            return names.index("SCL") + 1
        if m.count >= 2:
            return 2
        raise ProviderError(
            f"mask {mask} has no SCL band (expected band 2 or a band described 'SCL')"
        )

    def _scl_cloudy_pct(self, mask: Path, index: int) -> float:
        st = mask.stat()
        return _cloudy_pct_of(str(mask), st.st_mtime_ns, st.st_size, index)

    def _directory_scenes(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> list[Scene]:
        start, end = windows[0].start, windows[-1].end
        scenes = []
        for path, day in self._files_in(start, end):
            head = _header(path)
            if head.crs is None:
                raise ProviderError(f"scene {path} has no CRS; it cannot be placed on the grid")
            if not _overlaps(head.bounds, head.crs, area):
                continue
            indexes = self._band_indexes(path, sensor)
            mask = self._mask_path(path)
            scl_index = self._scl_index(mask, path) if mask.is_file() else None
            if scl_index is None and cloud_mask.mode == "scl":
                raise ProviderError(
                    f"scene {path.name} has no mask file masks/{path.name}; add it, or use cloud_mask='none'"
                )
            cloudy = self._cloud.get(day.isoformat())
            if cloudy is None and scl_index is not None:
                cloudy = self._scl_cloudy_pct(mask, scl_index)

            def load(
                path: Path = path,
                idx: list[int] = indexes,
                mask: Path = mask,
                si: int | None = scl_index,
            ) -> Any:
                data = _read_onto(path, area, idx, "uint16")
                scl = None if si is None else _read_onto(mask, area, [si], "uint8")[0]
                return data, scl

            scenes.append(Scene(day.isoformat(), day, cloudy, load))
        return scenes

    # -- STAC ----------------------------------------------------------------------------
    def _stac_items(self) -> list[_Item]:
        """Every item of the catalog with its date, WGS84 bbox and stamp (read once per
        provider: a run's step, or one tick of the stale sensor)."""
        if self._items is None:
            import pystac

            assert self.catalog is not None
            items = []
            for item in pystac.Catalog.from_file(str(self.catalog)).get_items(recursive=True):
                day = (item.datetime or item.common_metadata.start_datetime).date()  # type: ignore[union-attr]
                updated = item.common_metadata.updated
                if updated is not None:
                    stamp = f"updated {updated.isoformat()}"
                else:
                    text = json.dumps(item.to_dict(include_self_link=False), sort_keys=True)
                    stamp = f"json {hashlib.sha256(text.encode()).hexdigest()[:16]}"
                bbox = tuple(float(v) for v in item.bbox[:4]) if item.bbox else None
                items.append(_Item(item, day, bbox, stamp))
            self._items = items
        return self._items

    def _stac_scenes(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> list[Scene]:
        import pystac
        from odc.stac import load as stac_load

        start, end = windows[0].start, windows[-1].end
        where = _lonlat(area)
        items = []
        for entry in self._stac_items():
            item = entry.item
            if start <= entry.day < end and (
                entry.bbox is None or _lonlat_overlap(entry.bbox, where)
            ):
                missing = [b for b in (*sensor.bands, "SCL") if b not in item.assets]
                if missing:
                    raise ProviderError(
                        f"STAC item {item.id} has no asset(s) {missing}; it has {sorted(item.assets)}"
                    )
                items.append(entry)
        if not items:
            return []
        scenes = []
        for entry in items:
            item = entry.item

            def load(item: pystac.Item = item) -> tuple[np.ndarray, np.ndarray]:
                ds = stac_load(
                    [item],
                    bands=[*sensor.bands, "SCL"],
                    geobox=area,
                    resampling="nearest",
                    dtype="uint16",
                    nodata=0,
                ).isel(time=0)
                data = np.stack([ds[b].values for b in sensor.bands]).astype(np.uint16)
                return data, ds["SCL"].values.astype(np.uint8)

            cloudy = item.properties.get("eo:cloud_cover")
            scenes.append(
                Scene(item.id, entry.day, None if cloudy is None else float(cloudy), load)
            )
        return scenes

    def _footprint(self, area: GeoBox, start: dt.date, end: dt.date) -> tuple[slice, slice] | None:
        """Rows/columns of ``area`` that any directory scene in [start, end) can cover.

        Reading and compositing only there is exact (outside it every scene
        is no data); None when the scenes cover the whole area or nothing.
        """
        if self.catalog is not None:
            return None
        inv = ~area.affine
        h, w = area.shape
        r0, c0, r1, c1 = h, w, 0, 0
        for path, _ in self._files_in(start, end):
            head = _header(path)
            if head.crs is None:
                return None
            left, bottom, right, top = _bounds_in(tuple(head.bounds), head.crs, _wkt(area))
            xs, ys = zip(*(inv @ (x, y) for x, y in ((left, top), (right, bottom))), strict=True)
            c0, c1 = min(c0, math.floor(min(xs)) - 1), max(c1, math.ceil(max(xs)) + 1)
            r0, r1 = min(r0, math.floor(min(ys)) - 1), max(r1, math.ceil(max(ys)) + 1)
        r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
        if r1 <= r0 or c1 <= c0 or (r0, c0, r1, c1) == (0, 0, h, w):
            return None
        return slice(r0, r1), slice(c0, c1)

    # -- which scenes ---------------------------------------------------------------------
    def scene_index(
        self, area: GeoBox, windows: Sequence[FrameWindow], sensor: SensorSpec
    ) -> dict[str, str]:
        """Every scene intersecting ``area`` in the windows' range -> its stamp, from
        headers (cached per file version) and file stamps; see
        :class:`~agrifm_pipeline.providers.base.SceneIndexed`.

        Directory: the file name -> size and modification time of the scene, of its
        mask, and its manifest cloud fraction. STAC: the item id -> its ``updated``
        time (a digest of the item's JSON when it has none).
        """
        start, end = windows[0].start, windows[-1].end
        if self.catalog is not None:
            where = _lonlat(area)
            return {
                i.item.id: i.stamp
                for i in self._stac_items()
                if start <= i.day < end and (i.bbox is None or _lonlat_overlap(i.bbox, where))
            }
        out: dict[str, str] = {}
        for path, day in self._files_in(start, end):
            head = _header(path)
            if head.crs is not None and not _overlaps(head.bounds, head.crs, area):
                continue  # (a scene without a CRS cannot be placed: fetch refuses it)
            stamp = _stamp(path)
            mask = self._mask_path(path)
            if mask.is_file():
                stamp += f" mask {_stamp(mask)}"
            cloud = self._cloud.get(day.isoformat())
            if cloud is not None:
                stamp += f" cloud {cloud:.6g}%"
            out[path.name] = stamp
        return out

    def _no_coverage(self, area: GeoBox) -> NoCoverageError | None:
        """The error to raise when no scene of the source, of any date, reaches ``area``;
        None when one does (or when that cannot be told: a scene without a CRS or bbox)."""
        boxes: list[tuple[float, ...]] = []
        if self.catalog is not None:
            where = _lonlat(area)
            for i in self._stac_items():
                if i.bbox is None or _lonlat_overlap(i.bbox, where):
                    return None
                boxes.append(i.bbox)
            source = f"STAC catalog {self.catalog}"
        else:
            for path in self._files:
                head = _header(path)
                if head.crs is None or _overlaps(head.bounds, head.crs, area):
                    return None
                boxes.append(_bounds_in(tuple(head.bounds), head.crs, "EPSG:4326"))
            source = f"local root {self.root}"
        extent = None
        if boxes:
            w, s, e, n = zip(*boxes, strict=True)
            extent = NoCoverageError.extent_label((min(w), min(s), max(e), max(n)), len(boxes))
        return NoCoverageError(f"{area.crs} {tuple(area.extent.boundingbox)}", source, extent)

    # -- the interface -----------------------------------------------------------------
    def fetch(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> FrameStack:
        # One GDAL environment for the whole stack: rasterio.open sets one up and tears it
        # down around every file otherwise.
        with rasterio.Env(**_GDAL_OPTIONS):
            # Stamped before any pixel is read: a scene replaced meanwhile reads as changed.
            index = self.scene_index(area, windows, sensor)
            box = self._footprint(area, windows[0].start, windows[-1].end)
            sub = area if box is None else area[box]
            if self.catalog is not None:
                scenes = self._stac_scenes(sub, windows, sensor, cloud_mask)
            else:
                scenes = self._directory_scenes(sub, windows, sensor, cloud_mask)
            if not scenes and (missing := self._no_coverage(area)) is not None:
                raise missing
            values, records = composite_windows(
                scenes,
                windows,
                sensor,
                cloud_mask,
                area_label=f"{area.crs} {tuple(area.extent.boundingbox)}",
            )
        if box is not None:
            # Outside the scenes' footprint every pixel is fill; clear fractions are of the area.
            fill = np.uint16(fill_dn(sensor.fill_value))
            full = np.full((*values.shape[:2], *area.shape), fill, dtype=np.uint16)
            full[(slice(None), slice(None), *box)] = values
            values = full
            share = sub.shape[0] * sub.shape[1] / (area.shape[0] * area.shape[1])
            for rec in records:
                rec.clear_fraction *= share
        return FrameStack(
            data=frame_stack_array(values, area, windows, sensor.bands),
            frames=records,
            provider=self.name,
            provider_version=self.version,
            extra={
                "root": str(self.root),
                "kind": "stac" if self.catalog else "directory",
                SCENE_INDEX_KEY: scene_index_record(index),
            },
        )
