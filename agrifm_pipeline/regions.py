"""Regions: from a GeoJSON/GeoPackage (or a geometry) to the tiles that cover it.

A region may be in any CRS. It is split by UTM zone (6° longitude bands in
WGS84), each part is projected into its zone, and every tile of that zone's
fixed grid whose interior meets the part is returned. A region across two
zones gets tiles in both; the same place always gets the same tile ids.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from agrifm_pipeline.errors import RegionError
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
    if len(geoms) == 0 or bool(geoms.is_empty.all()) or bool(geoms.isna().all()):
        raise RegionError(f"region {label} has no geometry (empty)")
    invalid = ~geoms.is_valid & ~geoms.is_empty
    if bool(invalid.any()):
        reason = shapely.is_valid_reason(geoms[invalid].iloc[0])
        raise RegionError(
            f"region {label} has an invalid geometry ({reason}); repair it, e.g. with shapely.make_valid"
        )
    return gdf[~geoms.is_empty & geoms.notna()]


def tiles_for_region(
    source: Any,
    *,
    chip_px: int = DEFAULT_CHIP_PX,
    chips_per_side: int = DEFAULT_CHIPS_PER_SIDE,
    scale_m: float = DEFAULT_SCALE_M,
) -> list[Tile]:
    """Every grid tile whose interior meets the region, sorted and without duplicates."""
    gdf = read_region(source)
    label = _label(source)
    size = tile_size_m(chip_px, chips_per_side, scale_m)
    region = shapely.union_all(gdf.to_crs("EPSG:4326").geometry.values)
    minx, miny, maxx, maxy = region.bounds
    if miny < UTM_MIN_LAT or maxy > UTM_MAX_LAT:
        raise RegionError(
            f"region {label} reaches latitude {miny if miny < UTM_MIN_LAT else maxy:.3f}, "
            f"outside UTM's range [{UTM_MIN_LAT}, {UTM_MAX_LAT}]"
        )
    tiles: set[Tile] = set()
    first_zone = int((minx + 180.0) // 6.0) + 1
    last_zone = min(int((maxx + 180.0) // 6.0) + 1, 60)
    for zone in range(first_zone, last_zone + 1):
        band = box(-180.0 + 6.0 * (zone - 1), -90.0, -180.0 + 6.0 * zone, 90.0)
        for hemisphere, (lat0, lat1) in (("N", (0.0, 90.0)), ("S", (-90.0, 0.0))):
            part = region.intersection(band).intersection(box(-180.0, lat0, 180.0, lat1))
            if part.is_empty or (part.area == 0 and part.length == 0):
                continue
            epsg = (32600 if hemisphere == "N" else 32700) + zone
            projected = gpd.GeoSeries([part], crs="EPSG:4326").to_crs(f"EPSG:{epsg}").iloc[0]
            tiles.update(_cover(projected, epsg, size))
    if not tiles:
        raise RegionError(f"region {label} covers no tile (is it a point or a line?)")
    return sorted(tiles)


def _cover(geom: BaseGeometry, epsg: int, size: int) -> list[Tile]:
    x0, y0, x1, y1 = geom.bounds
    cols = np.arange(max(0, math.floor(x0 / size)), math.floor(x1 / size) + 1)
    rows = np.arange(max(0, math.floor(y0 / size)), math.floor(y1 / size) + 1)
    cc, rr = (a.ravel() for a in np.meshgrid(cols, rows))
    cells = shapely.box(cc * size, rr * size, (cc + 1) * size, (rr + 1) * size)
    shapely.prepare(geom)
    # Interior intersection: a tile that only touches the region's edge is not needed.
    hit = shapely.intersects(geom, cells) & ~shapely.touches(geom, cells)
    return [Tile(epsg, size, int(c), int(r)) for c, r in zip(cc[hit], rr[hit], strict=True)]


def region_tiles_record(source: Any, tiles: list[Tile]) -> dict[str, Any]:
    """A small JSON-friendly summary of a region and its tiles."""
    gdf = read_region(source).to_crs("EPSG:4326")
    bounds = [float(v) for v in gdf.total_bounds]
    area_km2 = float(gdf.to_crs(gdf.estimate_utm_crs()).area.sum() / 1e6)
    return {
        "n_tiles": len(tiles),
        "zones": sorted({t.epsg for t in tiles}),
        "bounds_wgs84": bounds,
        "area_km2": round(area_km2, 3),
        "tile_ids": [t.id for t in tiles],
    }
