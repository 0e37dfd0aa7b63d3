"""Single regions of interest: from a ``PointBuffer``/``BBox`` to a pixel grid in its UTM zone.

The grid is snapped outward to the zone's ``scale_m`` pixel lattice (anchored
at the zone origin, like the tiles), so an ROI's pixels are the same pixels a
tile over the same place would have.
"""

from __future__ import annotations

import math

from odc.geo.geobox import GeoBox
from pyproj import Transformer

from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.specs import BBox, PointBuffer


def _snap_out(
    bounds: tuple[float, float, float, float], step: float
) -> tuple[float, float, float, float]:
    minx, miny, maxx, maxy = bounds
    return (
        math.floor(minx / step) * step,
        math.floor(miny / step) * step,
        math.ceil(maxx / step) * step,
        math.ceil(maxy / step) * step,
    )


def roi_geobox(spatial: PointBuffer | BBox, scale_m: float = 10.0) -> GeoBox:
    """The ROI's grid in its local UTM zone at ``scale_m`` true ground metres."""
    from agrifm_pipeline.regions import utm_epsg

    if isinstance(spatial, PointBuffer):
        epsg = utm_epsg(spatial.lon, spatial.lat)
        to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
        x, y = to_utm.transform(spatial.lon, spatial.lat)
        b = spatial.buffer_m
        bounds = (x - b, y - b, x + b, y + b)
    elif isinstance(spatial, BBox):
        to_wgs = Transformer.from_crs(spatial.crs, "EPSG:4326", always_xy=True)
        lon, lat = to_wgs.transform(
            (spatial.minx + spatial.maxx) / 2, (spatial.miny + spatial.maxy) / 2
        )
        epsg = utm_epsg(lon, lat)
        to_utm = Transformer.from_crs(spatial.crs, f"EPSG:{epsg}", always_xy=True)
        bounds = to_utm.transform_bounds(
            spatial.minx, spatial.miny, spatial.maxx, spatial.maxy, densify_pts=21
        )
    else:
        raise InputContractError(
            f"spatial={spatial!r}; use PointBuffer(lon, lat, buffer_m) or BBox(minx, miny, maxx, maxy)"
        )
    snapped = _snap_out(bounds, scale_m)
    gbox = GeoBox.from_bbox(snapped, f"EPSG:{epsg}", resolution=scale_m)
    ny, nx = gbox.shape
    if ny * nx > 8192 * 8192:
        raise InputContractError(
            f"ROI {spatial} is {nx} x {ny} px at {scale_m} m; use the tile pipeline for areas this large"
        )
    return gbox
