"""Products made from a stored grid: the chip table, the preview PNG, the mosaic.

chip_table         tile grid -> pooled mean/max per chip with geometry and valid fraction
band_frames        named bands of a stored frame stack, read as one band range
pca3               (D, h, w) grid -> its first three principal components per cell
coverage_caption   one line on the tile's coverage, under the preview
preview_png        median RGB of the input beside a 3-component PCA of the grid
mosaic             tile grids of one CRS -> one grid
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.tiles import Tile
from agrifm_pipeline.tileyear.embed import encoded_mask
from agrifm_pipeline.tileyear.settings import TileYearSettings


def chip_table(
    grid: xr.DataArray,
    tile: Tile,
    year: int,
    cfg: TileYearSettings,
    coverage: Mapping[str, Any] | None = None,
) -> Any:
    """Pooled vectors per chip (spatial mean and max) with the chip's footprint.

    Geometry is in WGS84 (one CRS for every zone, as GeoParquet wants one per
    column); the chip's UTM bounds and EPSG code are columns beside it.
    ``coverage`` (the grid dataset's attributes, :func:`coverage_attrs`) adds each
    chip's ``valid_fraction``, whether it was ``encoded``, and a ``status`` that
    says why not; a chip that was not encoded has NaN vectors.
    """
    import geopandas as gpd
    import shapely

    per = cfg.chips_per_side
    values = np.asarray(grid.values)
    d, gh, gw = values.shape
    h, w = gh // per, gw // per
    blocks = values.reshape(d, per, h, per, w).transpose(1, 3, 0, 2, 4).reshape(per * per, d, h * w)
    x0, _, _, y1 = tile.bounds
    side = cfg.chip_px * cfg.scale_m
    rows = np.arange(per * per) // per
    cols = np.arange(per * per) % per
    minx, maxy = x0 + cols * side, y1 - rows * side
    boxes = shapely.box(minx, maxy - side, minx + side, maxy)
    gdf = gpd.GeoDataFrame(
        {
            "tile": tile.id,
            "year": int(year),
            "chip": np.arange(per * per),
            "chip_row": rows,
            "chip_col": cols,
            "epsg": tile.epsg,
            "utm_minx": minx,
            "utm_miny": maxy - side,
            "utm_maxx": minx + side,
            "utm_maxy": maxy,
            "mean": list(blocks.mean(axis=2).astype(np.float32)),
            "max": list(blocks.max(axis=2).astype(np.float32)),
        },
        geometry=gpd.GeoSeries(boxes, crs=tile.crs).to_crs("EPSG:4326"),
    )
    attrs = dict(coverage or {})
    encoded = encoded_mask(attrs, per * per)
    cov = attrs.get("chip_valid_fraction")
    frac = np.asarray(cov, dtype=np.float64) if cov is not None else np.full(per * per, np.nan)
    floor = float(attrs.get("min_chip_coverage", 0.0))
    gdf["valid_fraction"] = frac
    gdf["encoded"] = encoded
    gdf["status"] = [
        "encoded"
        if e
        else f"not encoded: {f:.1%} of its pixel-frames hold data < min_chip_coverage {floor:.0%}"
        for e, f in zip(encoded, frac, strict=True)
    ]
    return gdf


def _stretch(
    rgb: np.ndarray, valid: np.ndarray | None = None, *, joint: bool = False
) -> np.ndarray:
    """2-98 % stretch (over ``valid`` pixels) to uint8; the rest dark grey. Per channel,
    or with ``joint`` one range for every channel (true colour keeps its hue: a stretch
    per channel greys out colours whose channels rise and fall together)."""
    valid = np.ones(rgb.shape[:2], dtype=bool) if valid is None else valid
    out = np.full(rgb.shape, 40, dtype=np.uint8)
    if not valid.any():
        return out
    both = np.percentile(rgb[valid].astype(np.float64), [2, 98]) if joint else None
    for i in range(rgb.shape[-1]):
        ch = rgb[..., i].astype(np.float64)
        lo, hi = both if both is not None else np.percentile(ch[valid], [2, 98])
        scaled = np.full(ch.shape, 128.0) if hi <= lo else (ch - lo) / (hi - lo) * 255
        out[..., i] = np.where(valid, np.clip(scaled, 0, 255), 40).astype(np.uint8)
    return out


def pca3(grid: np.ndarray) -> np.ndarray:
    """(D, h, w) -> (h, w, 3): the first three principal components, per-pixel.

    Randomised (``torch.svd_lowrank`` of the centred data: 8 directions, 4 power
    iterations, a fixed seed in a forked RNG, so repeatable and the caller's RNG
    untouched): it matches the exact eigendecomposition's components to a
    correlation of 1 - 1e-13 at a fraction of its cost. The SVD is taken of the
    (D, pixels) matrix as the grid stores it, not of its transpose: the power
    iterations' skinny matmuls are faster that way round with MKL (the preview stage
    of bench/bench_pipeline.py), and its right singular vectors are the pixels'
    components.
    """
    d, h, w = grid.shape
    flat = np.asarray(grid).reshape(d, h * w)
    finite = np.isfinite(flat).all(axis=0)
    if not finite.all():  # cells of chips that were not encoded: NaN in the components
        out = np.full((h * w, 3), np.nan)
        if finite.any():
            out[finite] = pca3(flat[:, finite].reshape(d, 1, -1)).reshape(-1, 3)
        return out.reshape(h, w, 3)
    if h * w < 2:
        return np.zeros((h, w, 3))
    x = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    x = x - x.mean(dim=1, keepdim=True)  # (D, pixels), centred over the pixels
    q = min(8, *x.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, s, v = torch.svd_lowrank(x, q=q, niter=4)  # (q,), (pixels, q)
    comps = (v[:, :3] * s[:3]).numpy().astype(np.float64)
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    return comps.reshape(h, w, 3)


def band_frames(frames: xr.DataArray, bands: Sequence[str]) -> np.ndarray:
    """(T, len(bands), H, W) of the named bands from a (time, band, y, x) frame stack.

    Reads the contiguous band range that holds them and picks them in memory: a
    list index over a Zarr-backed array reads band by band.
    """
    names = [str(b) for b in frames["band"].values]
    missing = [b for b in bands if b not in names]
    if missing:
        raise InputContractError(f"frame stack has no band(s) {missing}; it has {names}")
    idx = [names.index(b) for b in bands]
    lo = min(idx)
    block = np.asarray(frames.isel(band=slice(lo, max(idx) + 1)).values)
    return block[:, [i - lo for i in idx]]


# Up to this many frames the median is taken by a sorting network (below); more by a sort,
# whose cost grows more slowly than the network's T (T - 1) / 2 compare-exchanges.
_NETWORK_FRAMES_MAX = 64


def _median_frame(frames: np.ndarray) -> np.ndarray:
    """(T, ...) -> (...) float32: ``np.median`` over the frame axis, same values.

    Integer frames (what the stores hold) are sorted plane against plane by an
    odd-even transposition network: T rounds of elementwise min/max over whole
    planes, T (T - 1) / 2 compare-exchanges, then the mean of the middle two:
    cheaper than ``torch.sort`` over the frame axis or ``np.median`` for a
    preview's few frames (the preview stage of bench/bench_pipeline.py). Float
    input (NaN would travel through min/max differently) and series of more than
    64 frames take the sort.
    """
    t = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
    n = t.shape[0]
    if frames.dtype.kind in "ui" and n <= _NETWORK_FRAMES_MAX:
        planes = list(t.unbind(0))
        for r in range(n):
            for i in range(r % 2, n - 1, 2):
                a, b = planes[i], planes[i + 1]
                planes[i], planes[i + 1] = torch.minimum(a, b), torch.maximum(a, b)
    else:
        planes = list(t.sort(dim=0).values.unbind(0))
    return ((planes[(n - 1) // 2] + planes[n // 2]) / 2).numpy()


FILL_RGB = (205, 205, 205)  # the preview's fill: neutral grey, hatched
HATCH_RGB = (170, 170, 170)


def _with_fill(rgb: np.ndarray, valid: np.ndarray, size: int, smooth: bool) -> Any:
    """An RGB panel of ``size`` px: the image where ``valid``, hatched grey elsewhere."""
    from PIL import Image

    how = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    img = np.asarray(Image.fromarray(rgb).resize((size, size), how), dtype=np.uint8).copy()
    mask = Image.fromarray(valid.astype(np.uint8) * 255).resize(
        (size, size), Image.Resampling.NEAREST
    )
    m = np.asarray(mask) > 0
    yy, xx = np.mgrid[0:size, 0:size]
    hatch = np.where(((yy + xx) % 10 < 2)[..., None], HATCH_RGB, FILL_RGB).astype(np.uint8)
    img[~m] = hatch[~m]
    return Image.fromarray(img)


def coverage_caption(coverage: Mapping[str, Any] | None) -> str:
    """One line on what share of the tile holds data and how many chips were encoded."""
    attrs = dict(coverage or {})
    if "chip_valid_fraction" not in attrs:
        return "coverage not recorded (grid written before coverage was kept)"
    n, k = int(attrs.get("n_chips", 0)), int(attrs.get("n_chips_encoded", 0))
    return (
        f"data in {float(attrs.get('valid_fraction', 0.0)):.1%} of the tile's pixel-frames; "
        f"{k} of {n} chip(s) encoded (min_chip_coverage {float(attrs.get('min_chip_coverage', 0)):.0%})"
    )


def preview_png(
    frames: np.ndarray,
    grid: np.ndarray,
    bands: Sequence[str],
    size: int = 320,
    *,
    coverage: Mapping[str, Any] | None = None,
    nodata: float = 0,
) -> bytes:
    """PNG: the input's median frame in true colour beside a PCA of the embedding grid,
    over a caption that states the coverage. Fill (pixels with no data in any frame,
    cells of chips that were not encoded) is hatched grey in both panels."""
    from PIL import Image, ImageDraw

    idx = [list(bands).index(b) for b in ("B4", "B3", "B2")]
    step = max(1, frames.shape[-1] // size)  # the median only at the pixels the PNG shows
    sample = frames[:, idx, ::step, ::step]
    median = _median_frame(sample)  # (3, h, w)
    has_data = np.asarray((sample != nodata).any(axis=(0, 1)))
    rgb = _stretch(np.moveaxis(median, 0, -1), valid=has_data, joint=True)
    comps = pca3(grid)
    cells = np.isfinite(comps).all(axis=-1)
    pca = _stretch(np.nan_to_num(comps), valid=cells)
    caption = 34
    canvas = Image.new("RGB", (2 * size + 8, size + caption), (255, 255, 255))
    canvas.paste(_with_fill(rgb, has_data, size, True), (0, 0))
    canvas.paste(_with_fill(pca, cells, size, False), (size + 8, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (4, size + 4),
        "left: input median (true colour)   right: embedding PCA   hatched grey: no data",
        fill=(0, 0, 0),
    )
    draw.text((4, size + 19), coverage_caption(coverage), fill=(0, 0, 0))
    buf = io.BytesIO()
    # zlib's default level: a few percent larger than optimize=True, at a fraction of
    # its time.
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def mosaic(grids: Sequence[xr.DataArray]) -> xr.DataArray:
    """Tile grids that share a CRS and cell size -> one grid over their union (NaN elsewhere)."""
    from rioxarray.merge import merge_arrays

    if not grids:
        raise InputContractError("no tile grids to mosaic")
    crs = {str(g.rio.crs) for g in grids}
    if len(crs) != 1:
        raise InputContractError(
            f"tile grids in several CRSs {sorted(crs)}; mosaic one zone at a time"
        )
    nodata = [g.rio.write_nodata(np.nan) for g in grids]
    merged = merge_arrays(list(nodata), nodata=np.nan)
    merged.name = "embedding"
    return merged
