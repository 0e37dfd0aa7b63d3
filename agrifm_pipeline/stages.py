"""The stage table: every stored asset of the pipeline, once.

Each row says what an asset is: its Dagster asset key (also its store's name), the
kind of store that holds it, what partitions it, the asset it reads, its code version
(part of its fingerprint and its Dagster code version) and what its fingerprint covers.
The assets, their checks, the cluster tasks, the audit, the resources, the stale
sensor and the STAC catalog all read this table; nothing else writes an asset's name.

Three stages are *fingerprinted* (:data:`FINGERPRINTED`): each one's fingerprint
chains its settings with its upstream's, so a change re-makes that stage and every
stage below it. The *derived* tile-year assets (:data:`DERIVED`: the chip table, the
preview, the int8 grid) have no settings of their own: they are re-made whenever the
grid they were made from is. The region products (:data:`REGION_PRODUCTS`: the mosaic
and its int8 and COG forms) are made from the grids of a region's tiles, by the mosaic
sensor. The maps (:data:`MAPS`: similarity to a point, classes from labels) are made on
request from a region product, the query or the labels being the run's config.

This module is the bottom of the package: it imports nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Stage:
    """One stored asset of the pipeline."""

    asset: str  # the Dagster asset key and the name of its store
    stage: str  # the stage it belongs to: acquisition, normalisation, embedding, or its own
    store: Literal["zarr", "files"]  # versioned Zarr groups, or versioned whole files
    partitions: Literal["tile-year", "region-year"]
    upstream: str | None  # the asset it reads (None: the source archive)
    code_version: str  # in its fingerprint and its Dagster code version
    fingerprint: str  # what its fingerprint covers
    title: str  # one line, for catalogs and tables
    file: str | None = None  # the object a file partition holds
    variable: str | None = None  # the main array of a Zarr partition (what GDAL opens)

    @property
    def fingerprinted(self) -> bool:
        return self in FINGERPRINTED


FRAMES = Stage(
    asset="s2_frame_stack",
    stage="acquisition",
    store="zarr",
    partitions="tile-year",
    upstream=None,
    # 2: the frames' nodata attribute declared (the values unchanged)
    code_version="2",
    fingerprint="the provider's identity, bands, frame rule (count and windows), mask "
    "classes and back-fill, and the tile grid",
    title="Raw Sentinel-2 L2A frame stacks (T, 10, H, W) uint16 per tile-year.",
    variable="frames",
)
TENSORS = Stage(
    asset="normalized_tensors",
    stage="normalisation",
    store="zarr",
    partitions="tile-year",
    upstream=FRAMES.asset,
    # 2: valid_frames (frames with data per pixel) stored beside the statistics
    code_version="2",
    fingerprint="the normalisation mode and statistics, the model input size, and the "
    "acquisition fingerprint",
    title="Model input statistics (and optionally tensors) per tile-year.",
    variable="chip_stats",
)
GRID = Stage(
    asset="agrifm_embedding_grid",
    stage="embedding",
    store="zarr",
    partitions="tile-year",
    upstream=TENSORS.asset,
    # 2: chips below min_chip_coverage not encoded (NaN), valid_fraction per cell
    code_version="2",
    fingerprint="the checkpoint's sha256, the encoder and its precision, the output, the "
    "chip coverage rule, and the normalisation fingerprint",
    title="Georeferenced AgriFM embedding grids (band, y, x) per tile-year.",
    variable="embedding",
)
CHIPS = Stage(
    asset="chip_embeddings",
    stage="chips",
    store="files",
    partitions="tile-year",
    upstream=GRID.asset,
    # 2: valid_fraction, encoded and status per chip; NaN vectors for chips not encoded
    code_version="2",
    fingerprint="the grid version it was made from",
    title="Pooled AgriFM vectors per chip with footprints (GeoParquet).",
    file="chips.parquet",
)
PREVIEW = Stage(
    asset="embedding_preview",
    stage="preview",
    store="files",
    partitions="tile-year",
    upstream=GRID.asset,
    # 2: randomised PCA (same components to 1e-13 correlation); 3: that SVD taken of the
    # grid as stored (the same components again, not the same bits), PNG at zlib's level;
    # 4: fill hatched grey in both panels, a caption with the coverage; 5: true colour
    # stretched over one range for its three channels (its hue kept)
    code_version="5",
    fingerprint="the grid and frame-stack versions it was made from",
    title="Input median beside an embedding PCA (PNG) per tile-year.",
    file="preview.png",
)
MOSAIC = Stage(
    asset="region_mosaic",
    stage="mosaic",
    store="zarr",
    partitions="region-year",
    upstream=GRID.asset,
    code_version="1",
    fingerprint="the grid versions of the region's tiles",
    title="One AgriFM embedding mosaic per registered region and year.",
    variable="embedding",
)
# The int8 products (tileyear/quantise.py): made from the float32 grid, which stays the
# reference that lineage and checks refer to; re-made whenever the grids they were read from
# are (a tile's like the chip table, a region's like the mosaic).
GRID_INT8 = Stage(
    asset="agrifm_embedding_int8",
    stage="int8",
    store="zarr",
    partitions="tile-year",
    upstream=GRID.asset,
    code_version="1",
    fingerprint="the grid version it was made from",
    title="AgriFM embedding grids as int8 codes with a scale and offset per band "
    "(band, y, x) per tile-year.",
    variable="embedding",
)
MOSAIC_INT8 = Stage(
    asset="region_mosaic_int8",
    stage="mosaic_int8",
    store="zarr",
    partitions="region-year",
    upstream=GRID.asset,
    code_version="1",
    fingerprint="the grid versions of the region's tiles",
    title="The region mosaic as int8 codes with a scale and offset per band, per region and year.",
    variable="embedding",
)
MOSAIC_COG = Stage(
    asset="region_mosaic_cog",
    stage="mosaic_cog",
    store="files",
    partitions="region-year",
    upstream=GRID.asset,
    code_version="1",
    fingerprint="the grid versions of the region's tiles",
    title="The region mosaic as Cloud-Optimized GeoTIFFs (uint8 codes, band scale and "
    "offset), one per UTM zone, per region and year.",
    file="utm_{epsg}.tif",  # one per zone the region spans
)
# What the mosaic sensor makes of a region's grids, each judged by the grid versions it
# was made from; a deployment picks which (ZarrStorage.mosaic_products).
REGION_PRODUCTS: tuple[Stage, ...] = (MOSAIC, MOSAIC_INT8, MOSAIC_COG)

SIMILARITY = Stage(
    asset="similarity_map",
    stage="similarity",
    store="files",
    partitions="region-year",
    upstream=MOSAIC.asset,
    code_version="1",
    fingerprint="the embedding version it was made from and the query (a point or polygon)",
    title="Cosine similarity to a query point or polygon (COG and PNG) per region-year.",
    file="similarity.tif",
)
CLASSES = Stage(
    asset="class_map",
    stage="classification",
    store="files",
    partitions="region-year",
    upstream=MOSAIC.asset,
    code_version="1",
    fingerprint="the embedding version it was made from, the labels file (sha256) and the "
    "classifier",
    title="Classes from labelled polygons, cross-validated by field (COG, PNG legend, "
    "report) per region-year.",
    file="classes.tif",
)
# Maps made on request from a product (a point or labels as the run's config).
MAPS: tuple[Stage, ...] = (SIMILARITY, CLASSES)

# Upstream first: the order of verification, garbage collection and the catalog.
TABLE: tuple[Stage, ...] = (
    FRAMES, TENSORS, GRID, CHIPS, PREVIEW, GRID_INT8, *REGION_PRODUCTS, *MAPS
)  # fmt: skip
FINGERPRINTED: tuple[Stage, ...] = (FRAMES, TENSORS, GRID)
DERIVED: tuple[Stage, ...] = (CHIPS, PREVIEW, GRID_INT8)
TILE_YEAR: tuple[Stage, ...] = (*FINGERPRINTED, *DERIVED)

# Not stored by the pipeline, but named in the same place: the observed checkpoint (its
# data version is the weights' sha256) and the audit table.
CHECKPOINT_ASSET = "agrifm_checkpoint"
AUDIT_ASSET = "lineage_audit"

BY_ASSET: dict[str, Stage] = {s.asset: s for s in TABLE}
BY_STAGE: dict[str, Stage] = {s.stage: s for s in TABLE}
STAGE_NAMES: tuple[str, ...] = tuple(s.stage for s in FINGERPRINTED)
# Bump a row's code version when its code changes what it writes: the stage and every
# stage below it then become stale. They are also the assets' Dagster code versions.
CODE_VERSIONS: dict[str, str] = {s.stage: s.code_version for s in FINGERPRINTED}


def stage(name_or_asset: str) -> Stage:
    """The row of a stage or asset name; a clear error for any other name."""
    found = BY_ASSET.get(name_or_asset) or BY_STAGE.get(name_or_asset)
    if found is None:
        raise KeyError(
            f"{name_or_asset!r} is neither a stage nor a stored asset; the stored assets are "
            + ", ".join(s.asset for s in TABLE)
        )
    return found


def downstream_of(stage_name: str) -> tuple[Stage, ...]:
    """The tile-year assets to re-make when a fingerprinted stage is stale: it and
    every tile-year asset below it."""
    first = STAGE_NAMES.index(stage(stage_name).stage)
    return TILE_YEAR[first:]
