"""The embeddings a map is made from: any stored product, read as float vectors.

:func:`load_embeddings` resolves a product's current (or named) version in its store,
checks it against its manifest, and returns its grids, one per UTM zone (a region
mosaic spanning zones has a group per zone), as (band, y, x) float32 arrays with their
CRS and transform, beside the version read and its lineage, which a map's own lineage
then names. The product may be a float32 grid or mosaic, an int8 Zarr product or int8
COGs (a file partition of ``.tif`` objects): the float vectors come from
:func:`agrifm_pipeline.tileyear.quantise.read_embeddings`, which dequantises by the
scheme the product names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from agrifm_pipeline import stages
from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.storage import CorruptionError, PartitionStore, Version, ZarrStore


@dataclass(frozen=True)
class Grid:
    """One grid of vectors in one CRS: ``data`` (band, y, x) float32, NaN where none."""

    name: str  # "" for a product in one zone, else its group (``utm_<epsg>``)
    data: xr.DataArray

    @property
    def crs(self) -> Any:
        return self.data.rio.crs

    @property
    def transform(self) -> Any:
        return self.data.rio.transform()

    def values(self) -> np.ndarray:
        return np.asarray(self.data.values, dtype=np.float32)


@dataclass(frozen=True)
class Embeddings:
    """A product's grids, the version they were read from and its lineage."""

    asset: str
    year: int
    name: str  # the region (mosaics) or tile (grids)
    grids: tuple[Grid, ...]
    version: Version
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.grids[0].data.shape[0])

    def tiles(self) -> list[str]:
        """The tiles the product covers (a mosaic's, or the grid's own)."""
        return list(self.lineage.get("tiles") or [self.name])

    def checkpoints(self) -> list[str]:
        """The checkpoint sha256(s) the vectors were made with."""
        shas = self.lineage.get("checkpoint_sha256")
        if shas is None:
            sha = self.lineage.get("embedding", {}).get("checkpoint", {}).get("sha256")
            shas = [sha] if sha else []
        return sorted(str(s) for s in (shas if isinstance(shas, list) else [shas]))

    def inputs(self) -> dict[str, Any]:
        """What a map's lineage records as its inputs: this version, and (for a mosaic)
        the grid versions it was made from, so that ``gc`` keeps both."""
        out: dict[str, Any] = {
            self.asset: {**self.version.record(), "year": self.year, "tile": self.name}
        }
        grids = self.lineage.get("inputs", {}).get(stages.GRID.asset, {})
        if self.asset != stages.GRID.asset and grids.get("versions"):
            out[stages.GRID.asset] = {"versions": dict(grids["versions"])}
        return out


CELLS_PER_BLOCK = 16_384  # cells handled at once (64 MiB of float32 at D = 1024)


def cell_blocks(values: np.ndarray) -> list[np.ndarray]:
    """(D, H, W) -> (D, n) views of at most :data:`CELLS_PER_BLOCK` cells each, in row
    order: each channel's cells stay contiguous, so nothing is copied or transposed whole."""
    flat = values.reshape(values.shape[0], -1)
    return [flat[:, i : i + CELLS_PER_BLOCK] for i in range(0, flat.shape[1], CELLS_PER_BLOCK)]


def load_embeddings(
    store: PartitionStore, year: int, name: str, version: str | None = None
) -> Embeddings:
    """The grids of ``store``'s partition ``name`` (a region's mosaic or a tile's grid,
    float32 or int8, Zarr or COG) for ``year``, checked against their manifest; a clear
    error when there is none."""
    import rioxarray  # noqa: F401  (the .rio accessor)

    v = store.current(year, name) if version is None else store.version(year, name, version)
    if v is None:
        raise InputContractError(
            f"{store.asset} has no partition {name}|{year} under {store.root}; materialise "
            f"{store.asset} for it first"
        )
    lineage = store.lineage(year, name, v.id)
    grids = _zarr_grids(store, v, lineage) if isinstance(store, ZarrStore) else _cog_grids(store, v)
    return Embeddings(store.asset, int(year), name, tuple(grids), v, lineage)


def _zarr_grids(store: ZarrStore, v: Version, lineage: dict[str, Any]) -> list[Grid]:
    zones = lineage.get("zones") or []
    if len(zones) <= 1:
        return [Grid("", _vectors(store.open_version(v, verify=True), v))]
    problems = store.verify(v)
    if problems:
        raise CorruptionError(
            f"{store.asset} {v.year}/{v.tile} version {v.id}: " + "; ".join(map(str, problems))
        )
    grids = []
    for epsg in zones:
        group = f"utm_{epsg}"
        sub = Version(
            v.asset, v.year, v.tile, v.id, f"{v.path}/{group}", f"{v.url}/{group}",
            v.manifest_sha256,
        )  # fmt: skip
        grids.append(Grid(group, _vectors(store.open_version(sub), v)))
    return grids


def _cog_grids(store: PartitionStore, v: Version) -> list[Grid]:
    """The ``.tif`` objects of a file partition (one per zone), verified, read as floats."""
    import tempfile
    from pathlib import Path

    from agrifm_pipeline.tileyear.quantise import read_embeddings

    objects = store.read_objects(v, verify=True)
    tifs = sorted(n for n in objects if n.lower().endswith((".tif", ".tiff")))
    if not tifs:
        raise InputContractError(
            f"{v.asset} {v.year}/{v.tile} version {v.id} holds no GeoTIFF of embeddings "
            f"(it has {', '.join(sorted(objects))})"
        )
    grids = []
    with tempfile.TemporaryDirectory(prefix="agrifm-cog-") as tmp:
        for name in tifs:
            path = Path(tmp) / name
            path.write_bytes(objects[name])
            da = read_embeddings(path)
            stem = name.rsplit(".", 1)[0]
            zone = stem[stem.index("utm_") :] if "utm_" in stem else ""
            grids.append(Grid(zone if len(tifs) > 1 else "", _checked(da.load(), v)))
    return grids


def _vectors(ds: xr.Dataset, v: Version) -> xr.DataArray:
    """Float32 (band, y, x) of a product dataset (dequantised when it is int8)."""
    from agrifm_pipeline.tileyear.quantise import read_embeddings

    if "embedding" not in ds:
        raise InputContractError(
            f"{v.asset} {v.year}/{v.tile} version {v.id} has no variable 'embedding'"
        )
    return _checked(read_embeddings(ds), v)


def _checked(da: xr.DataArray, v: Version) -> xr.DataArray:
    if da.ndim != 3 or da.rio.crs is None:
        raise InputContractError(
            f"{v.asset} {v.year}/{v.tile} version {v.id}: embedding is {da.dims} without a "
            "CRS; expected (band, y, x) on a georeferenced grid"
        )
    return da.astype(np.float32)
