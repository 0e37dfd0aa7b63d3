"""Similarity search: how alike every cell's vector is to a query point's or polygon's.

parse_query   ``--at LON,LAT`` or ``--polygon`` (a GeoJSON file or WKT, in WGS84) -> Query
query_cells   a query on a grid -> the cells it names (the point's cell, the polygon's cells)
similarity    every grid's cosine similarity to the query's mean unit vector (channels
              standardised over the product first, by default)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.mapping.embeddings import Embeddings, Grid, cell_blocks


@dataclass(frozen=True)
class Query:
    """What to look for: a point or a polygon, in WGS84 (lon, lat)."""

    kind: str  # "point" | "polygon"
    geometry: Any  # shapely, EPSG:4326
    text: str  # as given (the point, the file's path or the WKT)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "given": self.text, "wkt": self.geometry.wkt}


def parse_query(at: str | None = None, polygon: str | None = None) -> Query:
    """``at`` "LON,LAT" (degrees), or ``polygon``: a GeoJSON file (the union of its
    features, reprojected from its CRS) or WKT in WGS84; exactly one of them."""
    import shapely

    at, polygon = (at or "").strip(), (polygon or "").strip()
    if bool(at) == bool(polygon):
        raise InputContractError(
            "give the query as exactly one of --at LON,LAT or --polygon <GeoJSON file or WKT>"
        )
    if at:
        try:
            lon, lat = (float(v) for v in at.replace(" ", "").split(","))
        except ValueError:
            raise InputContractError(
                f"--at {at!r}: expected LON,LAT in degrees, e.g. 4.35,50.85"
            ) from None
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise InputContractError(f"--at {at!r}: LON,LAT out of range (lon first)")
        return Query("point", shapely.Point(lon, lat), at)
    path = Path(polygon)
    if path.suffix.lower() in (".geojson", ".json") or path.exists():
        geom = _file_geometry(path)
    else:
        try:
            geom = shapely.from_wkt(polygon)
        except Exception as exc:
            raise InputContractError(
                f"--polygon {polygon[:80]!r} is neither a GeoJSON file nor WKT: {exc}"
            ) from None
    if geom.is_empty or geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise InputContractError(f"--polygon: expected a polygon, got {geom.geom_type}")
    return Query("polygon", geom, polygon)


def _file_geometry(path: Path) -> Any:
    import geopandas as gpd

    if not path.is_file():
        raise InputContractError(f"--polygon file {path} does not exist")
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:
        raise InputContractError(f"--polygon file {path} cannot be read: {exc}") from None
    if gdf.empty:
        raise InputContractError(f"--polygon file {path} holds no feature")
    if gdf.crs is not None:
        gdf = gdf.to_crs("EPSG:4326")
    return gdf.union_all()


def query_cells(grid: Grid, query: Query) -> np.ndarray:
    """(H, W) bool: the cells of ``grid`` the query names — the cell holding the point,
    or the cells whose centres the polygon holds (else every cell it touches)."""
    import shapely
    from pyproj import Transformer
    from rasterio.features import rasterize

    h, w = grid.data.shape[-2:]
    to_grid = Transformer.from_crs("EPSG:4326", grid.crs, always_xy=True).transform
    geom = shapely.transform(query.geometry, to_grid, interleaved=False)
    out = np.zeros((h, w), dtype=bool)
    if query.kind == "point":
        col, row = ~grid.transform @ (geom.x, geom.y)
        r, c = int(np.floor(row)), int(np.floor(col))
        if 0 <= r < h and 0 <= c < w:
            out[r, c] = True
        return out
    for touched in (False, True):
        out = rasterize([geom], out_shape=(h, w), transform=grid.transform, all_touched=touched)
        out = out.astype(bool)
        if out.any():
            break
    return out


def _unit(x: np.ndarray, axis: int = 0) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, x / norm, np.nan)


METRICS = ("standardised", "cosine")


@dataclass
class SimilarityMap:
    """Each grid's (H, W) cosine similarity to the query, with the query's cells."""

    query: Query
    metric: str
    vector: np.ndarray  # the query's mean unit vector (D,), in the metric's space
    grids: list[tuple[Grid, np.ndarray, np.ndarray]]  # (grid, similarity, query cells)
    n_query_cells: int

    def stats(self) -> dict[str, Any]:
        sims = np.concatenate([s[np.isfinite(s)] for _, s, _ in self.grids])
        return {
            "metric": self.metric,
            "n_query_cells": self.n_query_cells,
            "n_cells": int(sims.size),
            "min": float(sims.min()) if sims.size else None,
            "p02": float(np.percentile(sims, 2)) if sims.size else None,
            "median": float(np.median(sims)) if sims.size else None,
            "max": float(sims.max()) if sims.size else None,
        }


def _standardiser(grids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's mean and standard deviation over every cell with a vector."""
    d = grids[0].shape[0]
    total, sq, n = np.zeros(d), np.zeros(d), 0
    for g in grids:
        for block in cell_blocks(g):
            finite = np.isfinite(block.sum(axis=0))
            ok = block if finite.all() else block[:, finite]
            total += ok.sum(axis=1, dtype=np.float64)
            sq += np.square(ok).sum(axis=1, dtype=np.float64)
            n += ok.shape[1]
    if n == 0:
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def _cosine(
    grid: np.ndarray, q: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None
) -> np.ndarray:
    """(H, W) cosine of every cell (standardised by ``mean``/``std`` if given) with the unit
    vector ``q``; block by block, so no copy of the whole grid is made."""
    out = []
    for block in cell_blocks(grid):
        z = block if mean is None or std is None else (block - mean[:, None]) / std[:, None]
        norm = np.sqrt(np.einsum("dn,dn->n", z, z))
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(norm > 0, (q @ z) / norm, np.nan))
    return np.concatenate(out).reshape(grid.shape[1:]).astype(np.float32)


def similarity(embeddings: Embeddings, query: Query, metric: str = "standardised") -> SimilarityMap:
    """Every cell's cosine similarity to the mean unit vector of the query's cells (over
    every zone the query reaches); NaN where a cell has no vector.

    ``standardised`` (the default) first centres and scales each channel over the
    product's cells: the cosine then compares how cells differ from the product's
    typical cell, not the large part every AgriFM vector shares (the final LayerNorm's
    pattern), which otherwise keeps every similarity near 1. ``cosine``: the vectors as
    they are.
    """
    if metric not in METRICS:
        raise InputContractError(f"similarity metric {metric!r}: use one of {', '.join(METRICS)}")
    values = [g.values() for g in embeddings.grids]
    mean, std = _standardiser(values) if metric == "standardised" else (None, None)
    cells = [query_cells(g, query) for g in embeddings.grids]
    if not any(m.any() for m in cells):
        raise InputContractError(
            f"the query {query.text!r} falls outside {embeddings.asset} {embeddings.name} "
            f"{embeddings.year}; {_extent_hint(embeddings)}"
        )
    picked = []
    for v, mask in zip(values, cells, strict=True):
        if mask.any():
            x = v[:, mask]
            x = x[:, np.isfinite(x).all(axis=0)]
            picked.append(x if mean is None or std is None else (x - mean[:, None]) / std[:, None])
    found = np.concatenate(picked, axis=1)
    if found.shape[1] == 0:
        raise InputContractError(
            f"the query {query.text!r} falls on cells of {embeddings.asset} {embeddings.name} "
            f"{embeddings.year} without vectors (chips not encoded); pick another place"
        )
    q = _unit(np.nanmean(_unit(found), axis=1)).astype(np.float32)
    out = [
        (g, _cosine(v, q, mean, std), mask)
        for g, v, mask in zip(embeddings.grids, values, cells, strict=True)
    ]
    return SimilarityMap(query, metric, q, out, int(found.shape[1]))


def _extent_hint(embeddings: Embeddings) -> str:
    """The product's extent in WGS84, for an error message."""
    from pyproj import Transformer

    parts = []
    for g in embeddings.grids:
        h, w = g.data.shape[-2:]
        x0, y1 = g.transform @ (0, 0)
        x1, y0 = g.transform @ (w, h)
        to_ll = Transformer.from_crs(g.crs, "EPSG:4326", always_xy=True).transform
        (lo0, la0), (lo1, la1) = to_ll(x0, y0), to_ll(x1, y1)
        parts.append(f"lon {lo0:.4f}..{lo1:.4f}, lat {la0:.4f}..{la1:.4f}")
    return "it covers " + "; ".join(parts)


def query_json(query: Query) -> bytes:
    """The query as a GeoJSON feature (stored beside the map)."""
    import shapely.geometry

    feature = {
        "type": "Feature",
        "geometry": shapely.geometry.mapping(query.geometry),
        "properties": {"kind": query.kind, "given": query.text},
    }
    return json.dumps(feature).encode()
