"""Regions: from a GeoJSON/GeoPackage (or a geometry) to the tiles that cover it.

A region may be in any CRS. It is split by UTM zone (6° longitude bands in
WGS84), each part is projected into its zone, and every tile of that zone's
fixed grid whose interior meets the part is returned. A region across two
zones gets tiles in both; the same place always gets the same tile ids.

The antimeridian: an edge between two consecutive vertices never spans more
than 180° of longitude, so a ring whose longitude jumps by more than that
(179.98 -> -179.98) crosses 180° and is cut there; a region around Fiji gets
tiles in zones 60 and 1 only. A MultiPolygon already cut at 180° (as RFC 7946
asks) gives the same tiles. Longitudes beyond ±180° are refused, as are
coordinates that cannot be degrees at all (projected coordinates in a file
read as longitude/latitude because it declares no CRS).

A region that would register more tiles than ``AGRIFM_PIPELINE_MAX_REGION_TILES``
(default 10,000) is refused with its tile count; raise the variable to accept it.
The limit is applied before tiles are listed, so a region of a continent is refused
at once rather than after minutes of counting (a region sensor's tick has 60 s):

* from its area: the tiles whose interiors meet a region cover it, so a region of
  area A needs at least A / side² of them. One whose area alone is over the limit
  is refused without counting a tile. This bound never refuses a region that fits.
* then by blocks: each zone's grid is searched from coarse blocks of tiles down to
  tiles, and only where the region's edge runs (a block inside the region counts
  all its tiles at once, a block outside it none). The work follows the region's
  tiles and the length of its edge, not its bounding box: two small fields at
  either end of a zone cost what two small fields cost. Counting stops at four
  times the limit (a region with a long, ragged edge), and the error says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import LineString, Polygon, box
from shapely.geometry.base import BaseGeometry

from agrifm_pipeline.errors import RegionError
from agrifm_pipeline.settings import MAX_REGION_TILES_ENV, check_tile_geometry, max_region_tiles
from agrifm_pipeline.tiles import (
    DEFAULT_CHIP_PX,
    DEFAULT_CHIPS_PER_SIDE,
    DEFAULT_SCALE_M,
    Tile,
    tile_size_m,
)

UTM_MIN_LAT = -80.0
UTM_MAX_LAT = 84.0


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone holding (lon, lat): 326zz north, 327zz south.

    Zones are the regular 6° bands; the Norway/Svalbard exceptions are not
    applied (a tile grid only needs a zone, not the official one).
    """
    if not (UTM_MIN_LAT <= lat <= UTM_MAX_LAT):
        raise RegionError(
            f"latitude {lat:.4f} is outside UTM's range [{UTM_MIN_LAT}, {UTM_MAX_LAT}]"
        )
    if not -180.0 <= lon <= 180.0:
        raise RegionError(f"longitude {lon} is outside [-180, 180]")
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return (32600 if lat >= 0 else 32700) + zone


def _label(source: Any) -> str:
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, BaseGeometry):
        return f"geometry {source.wkt[:80]}"
    return type(source).__name__


def read_region(source: Any) -> gpd.GeoDataFrame:
    """A region as a GeoDataFrame with a CRS; files, geometries (WGS84) or frames.

    Raises RegionError for unreadable files, files without CRS, empty or
    invalid geometries (repair them with ``shapely.make_valid`` first).
    """
    label = _label(source)
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise RegionError(f"region file {path} does not exist")
        try:
            gdf = gpd.read_file(path)
        except Exception as exc:  # pyogrio/fiona raise many types for unreadable files
            raise RegionError(f"region file {path} cannot be read as vector data: {exc}") from exc
        if gdf.crs is None:
            raise RegionError(f"region file {path} has no CRS; write it with one (e.g. EPSG:4326)")
    elif isinstance(source, gpd.GeoDataFrame):
        gdf = source
    elif isinstance(source, gpd.GeoSeries):
        gdf = gpd.GeoDataFrame(geometry=source)
    elif isinstance(source, BaseGeometry):
        gdf = gpd.GeoDataFrame(geometry=[source], crs="EPSG:4326")
    else:
        raise RegionError(f"region {label}: give a file path, a shapely geometry or a GeoDataFrame")
    if gdf.crs is None:
        raise RegionError(f"region {label} has no CRS; set one (e.g. gdf.set_crs('EPSG:4326'))")
    geoms = gdf.geometry
    if gdf.crs.is_geographic and len(geoms) and not bool(geoms.is_empty.all()):
        _check_degrees(source, label, gdf)
    if len(geoms) == 0 or bool(geoms.is_empty.all()) or bool(geoms.isna().all()):
        raise RegionError(f"region {label} has no geometry (empty)")
    invalid = ~geoms.is_valid & ~geoms.is_empty
    if bool(invalid.any()):
        reason = shapely.is_valid_reason(geoms[invalid].iloc[0])
        raise RegionError(
            f"region {label} has an invalid geometry ({reason}); repair it, e.g. with shapely.make_valid"
        )
    return gdf[~geoms.is_empty & geoms.notna()]


def _check_degrees(source: Any, label: str, gdf: gpd.GeoDataFrame) -> None:
    """Coordinates in a geographic CRS must be degrees within ±180 / ±90."""
    minx, miny, maxx, maxy = (float(v) for v in gdf.total_bounds)
    if max(abs(miny), abs(maxy)) > 90.0 or max(abs(minx), abs(maxx)) > 360.0:
        if isinstance(source, str | Path):
            how = (
                'in GeoJSON add "crs": {"type": "name", "properties": {"name": '
                '"urn:ogc:def:crs:EPSG::32631"}} with the EPSG code of your coordinates, or '
                "save the file with its CRS (e.g. gdf.set_crs('EPSG:32631', "
                "allow_override=True).to_file(...)); or reproject it to EPSG:4326"
            )
            where = f"region file {source}"
        else:
            how = (
                "give it with the CRS of its coordinates, e.g. gpd.GeoDataFrame(geometry=[geom], "
                "crs='EPSG:32631') or gdf.set_crs('EPSG:32631', allow_override=True)"
            )
            where = f"region {label}"
        raise RegionError(
            f"{where}: the coordinates look projected (x {minx:.1f}..{maxx:.1f}, "
            f"y {miny:.1f}..{maxy:.1f}), not longitude/latitude degrees, but they are read as "
            f"{gdf.crs.to_string()} (a GeoJSON file without a CRS is read as EPSG:4326); "
            f"declare the CRS they are in: {how}"
        )
    if minx < -180.0 or maxx > 180.0:
        beyond = maxx if maxx > 180.0 else minx
        raise RegionError(
            f"region {label} has longitude {beyond:.6f}, outside [-180, 180]; write "
            f"longitudes in [-180, 180] (e.g. {beyond:.3f} as {_wrap(beyond):.3f}). A region "
            "across the antimeridian may keep its vertices on both sides "
            "(179.9 ... -179.9) or be cut at 180° into a MultiPolygon"
        )


def _wrap(lon: float) -> float:
    return (lon + 180.0) % 360.0 - 180.0


def _unwrap_ring(coords: np.ndarray, label: str) -> np.ndarray:
    """Longitudes made continuous along the ring (a jump of more than 180° crosses 180°)."""
    out = np.array(coords, dtype=float)
    out[:, 0] = np.unwrap(out[:, 0], period=360.0)
    if len(out) > 1 and abs(out[-1, 0] - out[0, 0]) > 1e-6:
        raise RegionError(
            f"region {label} has a ring that goes all the way round the globe (around a pole); "
            f"UTM tiles only cover latitudes [{UTM_MIN_LAT}, {UTM_MAX_LAT}]"
        )
    return out


def _continuous(geom: BaseGeometry, label: str) -> BaseGeometry:
    """``geom`` (WGS84) with longitudes continuous across 180°, possibly beyond ±180."""
    if isinstance(geom, Polygon):
        shell = _unwrap_ring(np.asarray(geom.exterior.coords), label)
        holes = []
        for ring in geom.interiors:
            hole = _unwrap_ring(np.asarray(ring.coords), label)
            hole[:, 0] -= 360.0 * round((hole[:, 0].mean() - shell[:, 0].mean()) / 360.0)
            holes.append(hole)
        return Polygon(shell, holes)
    if isinstance(geom, LineString):
        coords = np.asarray(geom.coords, dtype=float)
        coords[:, 0] = np.unwrap(coords[:, 0], period=360.0)
        return LineString(coords)
    return geom


def _normalise_longitudes(geom: BaseGeometry, label: str) -> BaseGeometry:
    """``geom`` in [-180, 180] with every part that crosses 180° cut there."""
    pieces: list[BaseGeometry] = []
    for part in shapely.get_parts(geom):
        lon0, _, lon1, _ = part.bounds
        if lon1 - lon0 <= 180.0:
            pieces.append(part)
            continue
        cont = _continuous(part, label)
        cx0, _, cx1, _ = cont.bounds
        for k in range(math.floor((cx0 + 180.0) / 360.0), math.floor((cx1 + 180.0) / 360.0) + 1):
            window = box(-180.0 + 360.0 * k, -90.0, 180.0 + 360.0 * k, 90.0)
            piece = cont.intersection(window)
            if not piece.is_empty:
                pieces.append(shapely.affinity.translate(piece, xoff=-360.0 * k))
    return shapely.union_all(pieces)


def _zone_parts(region: BaseGeometry) -> list[tuple[int, BaseGeometry]]:
    """(UTM EPSG, the region's part in that zone and hemisphere, WGS84), for parts with extent."""
    zones: set[int] = set()
    for part in shapely.get_parts(region):
        minx, _, maxx, _ = part.bounds
        first = min(int((minx + 180.0) // 6.0) + 1, 60)
        last = min(int((maxx + 180.0) // 6.0) + 1, 60)
        zones.update(range(first, last + 1))
    out = []
    for zone in sorted(zones):
        band = box(-180.0 + 6.0 * (zone - 1), -90.0, -180.0 + 6.0 * zone, 90.0)
        in_band = region.intersection(band)
        for base, (lat0, lat1) in ((32600, (0.0, 90.0)), (32700, (-90.0, 0.0))):
            part = in_band.intersection(box(-180.0, lat0, 180.0, lat1))
            if part.is_empty or (part.area == 0 and part.length == 0):
                continue
            out.append((base + zone, part))
    return out


def tiles_for_region(
    source: Any,
    *,
    chip_px: int = DEFAULT_CHIP_PX,
    chips_per_side: int = DEFAULT_CHIPS_PER_SIDE,
    scale_m: float = DEFAULT_SCALE_M,
    max_tiles: int | None = None,
) -> list[Tile]:
    """Every grid tile whose interior meets the region, sorted and without duplicates.

    Raises RegionError when there would be more than ``max_tiles`` of them
    (default: ``AGRIFM_PIPELINE_MAX_REGION_TILES``, else 10,000): from the
    region's area before any tile is counted, or while counting (see the module).
    """
    check_tile_geometry(chip_px, chips_per_side)  # a typo'd geometry is no region's fault
    gdf = read_region(source)
    label = _label(source)
    size = tile_size_m(chip_px, chips_per_side, scale_m)
    limit = max_region_tiles() if max_tiles is None else max_tiles
    wgs84 = gdf.to_crs("EPSG:4326").geometry
    _, miny, _, maxy = (float(v) for v in wgs84.total_bounds)
    if miny < UTM_MIN_LAT or maxy > UTM_MAX_LAT:
        raise RegionError(
            f"region {label} reaches latitude {miny if miny < UTM_MIN_LAT else maxy:.3f}, "
            f"outside UTM's range [{UTM_MIN_LAT}, {UTM_MAX_LAT}]"
        )
    # Cut at 180° geometry by geometry: a crossing one is not valid in WGS84 as it stands.
    region = shapely.union_all([_normalise_longitudes(g, label) for g in wgs84.values])
    parts = [
        (epsg, gpd.GeoSeries([part], crs="EPSG:4326").to_crs(f"EPSG:{epsg}").iloc[0])
        for epsg, part in _zone_parts(region)
    ]
    zones = len({epsg for epsg, _ in parts})
    fix = (
        "check that it is the region you meant (its CRS, its extent), or raise "
        f"{MAX_REGION_TILES_ENV}"
    )
    # 1. From the area alone, before a tile is counted: the tiles cover the region.
    area_m2 = sum(float(p.area) for _, p in parts)
    at_least = math.floor(area_m2 / float(size) ** 2)
    if at_least > limit:
        raise RegionError(
            f"region {label} would register at least {at_least:,} tiles of {size} m in "
            f"{zones} UTM zone(s) (its area, {area_m2 / 1e6:,.0f} km², over {size} m "
            f"squares), more than the limit of {limit:,}; refused from its area, before "
            f"counting tiles: {fix} above {at_least} to accept it"
        )
    # 2. Block by block, counting at most four times the limit.
    cap = 4 * limit
    budget = _Budget(cap)
    try:
        found = [(epsg, _cover_blocks(part, size, budget)) for epsg, part in parts]
    except _TooMany:
        raise RegionError(
            f"region {label} would register more than {cap:,} tiles of {size} m in {zones} "
            f"UTM zone(s), more than the limit of {limit:,} (counting stopped there; its "
            f"area alone needs {at_least:,}, the rest is its long edge); {fix} well above "
            f"{cap} to accept it"
        ) from None
    if budget.count == 0:
        raise RegionError(f"region {label} covers no tile (is it a point or a line?)")
    if budget.count > limit:
        raise RegionError(
            f"region {label} would register {budget.count:,} tiles of {size} m in "
            f"{zones} UTM zone(s), more than the limit of {limit:,}; {fix} "
            f"to at least {budget.count} to accept it"
        )
    tiles = {
        Tile(epsg, size, int(c), int(r))
        for epsg, blocks in found
        for level, bc, br in blocks
        for c, r in _block_cells(level, bc, br)
    }
    return sorted(tiles)


# Candidate cells (or blocks) tested per batch: bounds the memory a very large region takes.
_BATCH_CELLS = 1 << 18
# Blocks of the coarsest level across a zone part's bounds: the search starts from these.
_TOP_BLOCKS = 1 << 10


class _TooMany(Exception):
    """Raised by :func:`_cover_blocks` when the tiles found pass the budget."""


class _Budget:
    """Tiles found so far across a region's zone parts, and the most it may count."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n
        if self.count > self.cap:
            raise _TooMany(self.count)


# (level, block columns, block rows): blocks of 2**level x 2**level tiles, all in the region.
_Blocks = list[tuple[int, np.ndarray, np.ndarray]]


def _block_cells(level: int, bc: np.ndarray, br: np.ndarray) -> Any:
    """The (col, row) of every tile of the blocks ``bc``, ``br`` at ``level``."""
    n = 1 << level
    offs = np.arange(n)
    cols = (bc[:, None, None] * n + offs[None, None, :]).repeat(n, axis=1).ravel()
    rows = (br[:, None, None] * n + offs[None, :, None]).repeat(n, axis=2).ravel()
    return zip(cols.tolist(), rows.tolist(), strict=True)


def _cover_blocks(geom: BaseGeometry, size: int, budget: _Budget) -> _Blocks:
    """The tiles of ``size`` m whose interiors meet ``geom`` (projected), as blocks.

    Searched from coarse blocks down: a block whose interior does not meet the
    region holds no such tile and is dropped; one the region covers holds only
    such tiles and is kept whole; the others are split in four, down to single
    tiles, which are tested as tiles. Every block is aligned to the tile grid,
    so a tile is never tested against coordinates other than its own edges.
    Counts into ``budget`` as it goes (raising :class:`_TooMany` past its cap).
    """
    x0, y0, x1, y1 = geom.bounds
    c0, c1 = max(0, math.floor(x0 / size)), math.floor(x1 / size)
    r0, r1 = max(0, math.floor(y0 / size)), math.floor(y1 / size)
    if c1 < c0 or r1 < r0:
        return []
    level = 0
    while ((c1 >> level) - (c0 >> level) + 1) * ((r1 >> level) - (r0 >> level) + 1) > _TOP_BLOCKS:
        level += 1
    bc, br = (
        a.ravel()
        for a in np.meshgrid(
            np.arange(c0 >> level, (c1 >> level) + 1), np.arange(r0 >> level, (r1 >> level) + 1)
        )
    )
    shapely.prepare(geom)
    out: _Blocks = []
    while len(bc):
        n = 1 << level
        split_c: list[np.ndarray] = []
        split_r: list[np.ndarray] = []
        for start in range(0, len(bc), _BATCH_CELLS):
            c, r = bc[start : start + _BATCH_CELLS], br[start : start + _BATCH_CELLS]
            side = float(n * size)
            cells = shapely.box(c * side, r * side, (c + 1) * side, (r + 1) * side)
            # Interior intersection: a tile that only touches the region's edge is not needed.
            hit = shapely.intersects(geom, cells) & ~shapely.touches(geom, cells)
            if level == 0:
                whole = hit
            else:
                # A block is kept whole only when every one of its tiles is in range.
                inside = (c * n >= c0) & ((c + 1) * n - 1 <= c1)
                inside &= (r * n >= r0) & ((r + 1) * n - 1 <= r1)
                whole = hit & inside
                whole[whole] = shapely.covers(geom, cells[whole])
                split_c.append(c[hit & ~whole])
                split_r.append(r[hit & ~whole])
            if whole.any():
                out.append((level, c[whole], r[whole]))
                budget.add(int(whole.sum()) * n * n)
        if level == 0:
            break
        # The four children of each split block, those that reach the region's range.
        level -= 1
        n = 1 << level
        pc, pr = np.concatenate(split_c), np.concatenate(split_r)
        dc = np.array([0, 1, 0, 1])
        dr = np.array([0, 0, 1, 1])
        bc = (pc[:, None] * 2 + dc[None, :]).ravel()
        br = (pr[:, None] * 2 + dr[None, :]).ravel()
        keep = (bc * n <= c1) & ((bc + 1) * n - 1 >= c0) & (br * n <= r1) & ((br + 1) * n - 1 >= r0)
        bc, br = bc[keep], br[keep]
    return out


def region_tiles_record(source: Any, tiles: list[Tile]) -> dict[str, Any]:
    """A small JSON-friendly summary of a region and its tiles.

    ``bounds_wgs84`` is (west, south, east, north); for a region across 180°
    west is greater than east, as RFC 7946 writes such a box.
    """
    label = _label(source)
    wgs84 = read_region(source).to_crs("EPSG:4326").geometry
    region = shapely.union_all([_normalise_longitudes(g, label) for g in wgs84.values])
    west, south, east, north = (float(v) for v in region.bounds)
    if west <= -180.0 and east >= 180.0:  # across 180° unless one piece spans every longitude
        lefts = [p.bounds[0] for p in shapely.get_parts(region) if p.bounds[0] > -180.0]
        rights = [p.bounds[2] for p in shapely.get_parts(region) if p.bounds[2] < 180.0]
        if lefts and rights:
            west, east = min(lefts), max(rights)
    bounds = [west, south, east, north]
    area_km2 = (
        sum(
            gpd.GeoSeries([part], crs="EPSG:4326").to_crs(f"EPSG:{epsg}").area.iloc[0]
            for epsg, part in _zone_parts(region)
        )
        / 1e6
    )
    return {
        "n_tiles": len(tiles),
        "zones": sorted({t.epsg for t in tiles}),
        "bounds_wgs84": bounds,
        "area_km2": round(area_km2, 3),
        "tile_ids": [t.id for t in tiles],
    }
