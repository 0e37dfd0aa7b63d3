"""int8 embeddings: a float32 grid quantised, any product read back as float vectors.

    quantise          (D, H, W) float32 -> int8 codes and what dequantises them
    dequantise        int8 codes and their scheme's arrays -> float32 (NaN at no-data)
    quantised_dataset a stored grid or mosaic -> the int8 product as stored (Zarr)
    read_embeddings   float32 (band, y, x) from any product: a float32 grid or mosaic,
                      an int8 Zarr, a COG (a dataset, a path or a URL)
    read_cog          a GeoTIFF -> float32 (band, y, x) by its band scales and offsets

The scheme (chosen by ``bench/bench_products.py``, see ``bench/results/bench_products.json``):

``channel`` (the product's): per channel ``c`` over the partition's cells with data,
``offset[c]`` is the mean and ``scale[c] = max(std[c] / STEPS_PER_STD, max|x - offset[c]| / 127)``;
``q = round((x - offset[c]) / scale[c])`` in -127..127, and **-128 is no data** (cells of
chips that were not encoded). Dequantised: ``x = offset[band] + scale[band] * q``. The step
is an eighth of the channel's spread over the partition, so what tells cells apart is kept
(AgriFM's vectors share a large constant part, the final LayerNorm's pattern, which a
per-pixel or a fixed map spends its levels on), and the codes use few of the 255 levels,
which is what makes them compress. It is linear per band: a GeoTIFF's band scale and
offset, which GDAL, rasterio and QGIS apply themselves, and averaging codes (overviews)
averages the vectors.

Measured beside it, and readable here too: ``pixel`` (TESSERA: ``x = scale[y, x] * q``,
one float32 scale per cell) and ``alphaearth`` (AlphaEarth Foundations: unit vectors,
``x = sign(q) * (q / 127.5) ** 2``). Any scheme may first unit-normalise the vectors
(``unit=True``; the norm is then not kept).

Every product says its scheme, formula and no-data value in its own attributes
(:data:`QUANT_ATTRS`), so it can be read without this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from agrifm_pipeline.errors import InputContractError

NODATA = -128  # the reserved code: no embedding in this cell
QMAX = 127
SCHEMES = ("channel", "pixel", "alphaearth")
DEFAULT_SCHEME = "channel"
# The channel scheme's step: this many steps per standard deviation of the channel (an
# error of 1/(8 sqrt 12) = 3.6 % of the spread between cells); chosen by bench_products.
STEPS_PER_STD = 8
FORMULAS = {
    "channel": "embedding[band, y, x] = offset[band] + scale[band] * q[band, y, x]",
    "pixel": "embedding[band, y, x] = scale[y, x] * q[band, y, x]",
    "alphaearth": "embedding[band, y, x] = sign(q) * (q / 127.5) ** 2 (unit vectors)",
}
NODATA_TEXT = f"q = {NODATA}: no embedding (the cell's chip was not encoded); NaN once dequantised"
# The attributes that name the scheme (on the product's dataset and on its embedding).
QUANT_ATTRS = (
    "quantisation",
    "dequantisation",
    "nodata",
    "nodata_meaning",
    "unit_normalised",
    "steps_per_std",
    "source_dtype",
)


@dataclass
class Quantised:
    """int8 codes (D, H, W) and what dequantises them."""

    q: np.ndarray  # (D, H, W) int8, NODATA where a cell has no embedding
    scheme: str
    scale: np.ndarray | None = None  # (D,) channel, (H, W) pixel, None alphaearth
    offset: np.ndarray | None = None  # (D,) channel
    unit: bool = False  # vectors unit-normalised before quantising
    steps_per_std: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def dequantise(self) -> np.ndarray:
        return dequantise(self.q, self.scheme, self.scale, self.offset)

    def describe(self) -> dict[str, Any]:
        """The attributes that make the codes readable without this module."""
        return {
            "quantisation": self.scheme,
            "dequantisation": FORMULAS[self.scheme] + f"; {NODATA_TEXT}",
            "nodata": NODATA,
            "nodata_meaning": NODATA_TEXT,
            "unit_normalised": int(self.unit),
            "steps_per_std": self.steps_per_std if self.scheme == "channel" else 0,
            "source_dtype": "float32",
        }


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise InputContractError(f"quantisation scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    return scheme


def _codes(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), -QMAX, QMAX).astype(np.int8)


def quantise(
    grid: np.ndarray,
    scheme: str = DEFAULT_SCHEME,
    *,
    unit: bool = False,
    steps_per_std: int = STEPS_PER_STD,
) -> Quantised:
    """(D, H, W) float -> int8 codes by ``scheme``; cells with any non-finite value
    (chips not encoded) get :data:`NODATA` in every band."""
    _check_scheme(scheme)
    x = np.asarray(grid, dtype=np.float32)
    if x.ndim != 3:
        raise InputContractError(f"a grid is (band, y, x); got shape {x.shape}")
    d, h, w = x.shape
    flat = x.reshape(d, h * w)
    valid = np.isfinite(flat).all(axis=0)
    v = flat[:, valid].astype(np.float64)
    if unit and v.size:
        norm = np.linalg.norm(v, axis=0, keepdims=True)
        v = v / np.where(norm > 0, norm, 1.0)
    q = np.full((d, h * w), NODATA, dtype=np.int8)
    out = Quantised(q.reshape(d, h, w), scheme, unit=unit)
    if scheme == "channel":
        out.steps_per_std = int(steps_per_std)
        offset = (v.mean(axis=1) if v.size else np.zeros(d)).astype(np.float32)
        dev = v - offset.astype(np.float64)[:, None]
        if v.size:
            peak = np.abs(dev).max(axis=1) / QMAX
            spread = dev.std(axis=1) / steps_per_std
            step = np.maximum(peak, spread)
        else:
            step = np.ones(d)
        scale = np.where(step > 0, step, 1.0).astype(np.float32)
        q[:, valid] = _codes(dev / scale.astype(np.float64)[:, None])
        out.scale, out.offset = scale, offset
    elif scheme == "pixel":
        scale = np.full(h * w, np.nan, dtype=np.float32)
        if v.size:
            peak = np.abs(v).max(axis=0) / QMAX
            scale[valid] = np.where(peak > 0, peak, 1.0)
            q[:, valid] = _codes(v / scale[valid].astype(np.float64)[None, :])
        out.scale = scale.reshape(h, w)
    else:  # alphaearth: unit vectors, square-root companding
        norm = np.linalg.norm(v, axis=0, keepdims=True)
        u = v / np.where(norm > 0, norm, 1.0)
        q[:, valid] = _codes(np.sign(u) * np.sqrt(np.abs(u)) * 127.5)
        out.unit = True
    out.q = q.reshape(d, h, w)
    return out


def dequantise(
    q: np.ndarray,
    scheme: str,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> np.ndarray:
    """int8 codes (D, H, W) -> float32, NaN where the code is :data:`NODATA`."""
    _check_scheme(scheme)
    codes = np.asarray(q)
    x = codes.astype(np.float32)
    if scheme == "channel":
        if scale is None or offset is None:
            raise InputContractError("the channel scheme needs scale and offset per band")
        s = np.asarray(scale, dtype=np.float32).reshape(-1, 1, 1)
        o = np.asarray(offset, dtype=np.float32).reshape(-1, 1, 1)
        x = x * s + o
    elif scheme == "pixel":
        if scale is None:
            raise InputContractError("the pixel scheme needs a scale per cell")
        x = x * np.asarray(scale, dtype=np.float32)[None]
    else:
        x = np.sign(x) * np.square(x / np.float32(127.5))
    return np.where(codes == NODATA, np.float32(np.nan), x).astype(np.float32)


# -- the stored product ----------------------------------------------------------------------------


def quantised_dataset(
    source: xr.Dataset | xr.DataArray,
    scheme: str = DEFAULT_SCHEME,
    *,
    unit: bool = False,
    steps_per_std: int = STEPS_PER_STD,
) -> xr.Dataset:
    """A float32 grid or mosaic (its dataset, or its ``embedding``) -> the int8 product:
    ``embedding`` (band, y, x) int8 beside the scheme's ``scale`` (and ``offset``), with
    the CRS, the source's other cell variables (``valid_fraction``) and attributes, and
    the scheme, formula and no-data value in the attributes of both."""
    ds = source.to_dataset(name="embedding") if isinstance(source, xr.DataArray) else source
    if "embedding" not in ds:
        raise InputContractError(
            f"no embedding variable to quantise; has {sorted(map(str, ds.data_vars))}"
        )
    grid = ds["embedding"]
    if grid.dtype == np.int8:
        raise InputContractError("the embedding is already int8")
    made = quantise(np.asarray(grid.values), scheme, unit=unit, steps_per_std=steps_per_std)
    described = made.describe()
    emb = xr.DataArray(
        made.q,
        dims=grid.dims,
        coords=grid.coords,
        name="embedding",
        attrs={
            **{k: v for k, v in grid.attrs.items() if k not in ("_FillValue", "nodata")},
            **described,
            "long_name": "AgriFM S2 encoder features, int8 codes",
        },
    )
    if "grid_mapping" in grid.encoding:
        emb.encoding["grid_mapping"] = grid.encoding["grid_mapping"]
    out = xr.Dataset({"embedding": emb}, attrs={**ds.attrs, **described})
    band_dim, y_dim, x_dim = grid.dims
    if made.scheme == "channel":
        assert made.scale is not None and made.offset is not None
        out["scale"] = xr.DataArray(
            made.scale, dims=(band_dim,), coords={band_dim: grid[band_dim]},
            attrs={"long_name": "dequantisation scale per band"},
        )  # fmt: skip
        out["offset"] = xr.DataArray(
            made.offset, dims=(band_dim,), coords={band_dim: grid[band_dim]},
            attrs={"long_name": "dequantisation offset per band (the band's mean)"},
        )  # fmt: skip
    elif made.scheme == "pixel":
        assert made.scale is not None
        out["scale"] = xr.DataArray(
            made.scale, dims=(y_dim, x_dim), coords={y_dim: grid[y_dim], x_dim: grid[x_dim]},
            attrs={"long_name": "dequantisation scale per cell (NaN: no data)"},
        )  # fmt: skip
    for name, var in ds.data_vars.items():
        if name != "embedding" and var.dims == (y_dim, x_dim):
            out[name] = var
    if "spatial_ref" in ds.coords:
        out = out.assign_coords(spatial_ref=ds["spatial_ref"])
    out.attrs.pop("agrifm_lineage", None)
    return out


def is_quantised(ds: xr.Dataset | xr.DataArray) -> bool:
    """Whether a product's embedding is int8 codes."""
    emb = ds["embedding"] if isinstance(ds, xr.Dataset) else ds
    return bool(emb.dtype == np.int8)


def dequantised(ds: xr.Dataset) -> xr.DataArray:
    """The float32 embedding (band, y, x) of a product dataset, int8 or float32."""
    emb = ds["embedding"]
    if not is_quantised(ds):
        return emb.astype(np.float32, copy=False)
    scheme = str(emb.attrs.get("quantisation", ds.attrs.get("quantisation", "")))
    scale = ds["scale"].values if "scale" in ds else None
    offset = ds["offset"].values if "offset" in ds else None
    values = dequantise(emb.values, scheme, scale, offset)
    keep = {k: v for k, v in emb.attrs.items() if k not in ("nodata", "long_name")}
    out = xr.DataArray(
        values, dims=emb.dims, coords=emb.coords, name="embedding",
        attrs={**keep, "long_name": "AgriFM S2 encoder features (dequantised)"},
    )  # fmt: skip
    if "grid_mapping" in emb.encoding:
        out.encoding["grid_mapping"] = emb.encoding["grid_mapping"]
    return out


def read_embeddings(
    source: xr.Dataset | xr.DataArray | str | os.PathLike[str],
    *,
    group: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Float32 embeddings (band, y, x) with their CRS, NaN where there are none,
    whatever the product: a float32 grid or mosaic, an int8 Zarr product (dequantised by
    the scheme its attributes name), or an int8 GeoTIFF (its band scales and offsets).

    ``source``: an opened dataset (e.g. ``ZarrStore.open_version``), its ``embedding``,
    or a path or URL: a ``.tif`` is read with rasterio, anything else opened as Zarr
    (``group``: a subgroup, such as a mosaic's ``utm_<epsg>``).
    """
    if isinstance(source, xr.DataArray):
        if source.dtype == np.int8:
            raise InputContractError(
                "int8 codes alone cannot be dequantised; pass the dataset with its scale"
            )
        return source.astype(np.float32, copy=False)
    if isinstance(source, xr.Dataset):
        return dequantised(source)
    path = os.fspath(source)
    if path.lower().endswith((".tif", ".tiff")):
        return read_cog(path)
    ds = xr.open_zarr(
        path,
        group=group,
        decode_coords="all",
        chunks=None,
        consolidated=None,
        storage_options=dict(storage_options) if storage_options else None,
    )
    return dequantised(ds)


def read_cog(path: str | os.PathLike[str]) -> xr.DataArray:
    """A COG -> float32 (band, y, x) with its CRS: values times each band's scale plus
    its offset, NaN at the no-data value (plain float GeoTIFFs are read as they are)."""
    import rasterio
    import rioxarray  # noqa: F401

    with rasterio.open(os.fspath(path)) as src:
        raw = src.read()
        nodata = src.nodata
        scales = np.asarray(src.scales, dtype=np.float32).reshape(-1, 1, 1)
        offsets = np.asarray(src.offsets, dtype=np.float32).reshape(-1, 1, 1)
        transform, crs, tags = src.transform, src.crs, src.tags()
        h, w = src.height, src.width
    values = raw.astype(np.float32) * scales + offsets
    if nodata is not None:
        values = np.where(raw == nodata, np.float32(np.nan), values)
    xs = transform.c + transform.a * (np.arange(w) + 0.5)
    ys = transform.f + transform.e * (np.arange(h) + 0.5)
    da = xr.DataArray(
        values.astype(np.float32),
        dims=("band", "y", "x"),
        coords={"band": np.arange(raw.shape[0]), "y": ys, "x": xs},
        name="embedding",
        attrs={k.removeprefix("AGRIFM_").lower(): v for k, v in tags.items()},
    )
    return da.rio.write_crs(crs).rio.write_transform(transform)
