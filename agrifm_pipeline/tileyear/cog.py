"""Cloud-Optimized GeoTIFFs of the int8 product: one file per grid (a tile's, or a
mosaic's UTM zone), read by GDAL 3.6 or newer, rasterio and QGIS as they are.

    cog_bytes   int8 product dataset (channel scheme) -> the COG's bytes

(:func:`~agrifm_pipeline.tileyear.quantise.read_cog` reads one back as float32.)

Layout: one band per embedding channel (``A0000`` ... ``A1023``) holding the int8
product's codes shifted to uint8, ``u = q + 128`` (GDAL before 3.7 has no signed byte
type: it hands the raw bytes of an int8 GeoTIFF to its readers, and ``-unscale`` then
gives wrong values for every negative code), so **0 is the no-data value** and each
band's offset is shifted to match: ``embedding = offset_band + scale_band * u``, the same
floats as the Zarr product's. GDAL's ``-unscale``, rasterio's ``scales``/``offsets`` and
QGIS's identify apply them. Pixel-interleaved, so that one block holds whole vectors;
internal tiles of :data:`BLOCK` cells, ZSTD; overviews
(averages, the no-data value left out: the map is linear, so they average the vectors)
while the grid is larger than a block. The dataset's metadata (tags) say the scheme, its
formula, the model and checkpoint, and the grid version it was made from.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.tileyear.quantise import FORMULAS, STEPS_PER_STD

# Internal tile side in cells: a block of whole vectors is 4 MiB of codes at D = 1024
# (128, GDAL 3.6's least for this driver, would be 16 MiB to read for one cell).
BLOCK = 64
COG_OPTIONS: dict[str, str] = {
    "BLOCKSIZE": str(BLOCK),
    "COMPRESS": "ZSTD",
    "LEVEL": "9",
    # No predictor: neighbouring cells' codes differ too much for differences to help
    # (bench/bench_products.py measured the horizontal predictor 4 % larger).
    "OVERVIEWS": "AUTO",
    "OVERVIEW_RESAMPLING": "AVERAGE",
    "BIGTIFF": "IF_SAFER",
}
BAND_NAME = "A{:04d}"
COG_NODATA = 0  # u = q + 128: the int8 product's NODATA (-128) is 0 here
SHIFT = 128
DEQUANTISATION = (
    "embedding = offset_band + scale_band * u, u the uint8 value, offset and scale each "
    f"band's (GDAL: -unscale); u = q + {SHIFT} of the int8 product's " + FORMULAS["channel"]
)  # band descriptions, as AlphaEarth names its 64 (A00..A63)


def cog_quantisation() -> dict[str, Any]:
    """What a COG's codes are, in the words of the int8 product's attributes."""
    return {
        "quantisation": "channel",
        "dequantisation": DEQUANTISATION,
        "nodata": COG_NODATA,
        "nodata_meaning": f"u = {COG_NODATA}: no embedding (the cell's chip was not encoded)",
        "unit_normalised": 0,
        "steps_per_std": STEPS_PER_STD,
        "source_dtype": "float32",
        "dtype": "uint8",
    }


def _tag(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def cog_bytes(ds: xr.Dataset, tags: Mapping[str, Any] | None = None) -> bytes:
    """The COG of an int8 product dataset (:func:`~agrifm_pipeline.tileyear.quantise.quantised_dataset`
    with the channel scheme): codes, band scales and offsets, CRS and transform, and
    ``tags`` (plus the scheme's own) in the dataset's metadata."""
    import rasterio
    import rioxarray  # noqa: F401

    emb = ds["embedding"]
    if emb.dtype != np.int8 or ds.attrs.get("quantisation") != "channel":
        raise InputContractError(
            "a COG holds the channel scheme's int8 codes (linear per band: GeoTIFF scale "
            "and offset); quantise the grid with quantised_dataset(..., 'channel') first"
        )
    d, h, w = emb.shape
    crs = emb.rio.crs or ds.rio.crs
    if crs is None:
        raise InputContractError("the product has no CRS to write into the GeoTIFF")
    transform = emb.rio.transform(recalc=True)
    scale = np.asarray(ds["scale"].values, dtype=np.float64)
    # u = q + 128, so offset + scale * q = (offset - 128 scale) + scale * u
    offset = np.asarray(ds["offset"].values, dtype=np.float64) - SHIFT * scale
    meta = {
        "AGRIFM_QUANTISATION": "channel",
        "AGRIFM_DEQUANTISATION": DEQUANTISATION,
        "AGRIFM_NODATA": f"{COG_NODATA}: no embedding (the cell's chip was not encoded)",
        "AGRIFM_DIMENSIONS": str(d),
        "AGRIFM_BANDS": f"{BAND_NAME.format(0)}..{BAND_NAME.format(d - 1)}: the encoder's "
        "feature channels, in its order",
        **{f"AGRIFM_{k.upper()}": _tag(v) for k, v in (tags or {}).items()},
    }
    profile = {
        "driver": "COG",
        "width": w,
        "height": h,
        "count": d,
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "nodata": COG_NODATA,
        **COG_OPTIONS,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embedding.tif"
        with rasterio.open(path, "w", **profile) as dst:
            codes = np.asarray(emb.values).astype(np.int16) + SHIFT  # NODATA -> 0
            dst.write(codes.astype(np.uint8))
            dst.scales = tuple(float(s) for s in scale)
            dst.offsets = tuple(float(o) for o in offset)
            dst.descriptions = tuple(BAND_NAME.format(i) for i in range(d))
            dst.update_tags(**meta)
        return path.read_bytes()
