"""The stage table: every stored asset of the pipeline, once.

Each row says what an asset is: its Dagster asset key (also its store's name), the
kind of store that holds it, what partitions it, the asset it reads, its code version
(part of its fingerprint and its Dagster code version) and what its fingerprint covers.
The assets, their checks, the cluster tasks, the audit, the resources, the stale
sensor and the STAC catalog all read this table; nothing else writes an asset's name.

Three stages are *fingerprinted* (:data:`FINGERPRINTED`): each one's fingerprint
chains its settings with its upstream's, so a change re-makes that stage and every
stage below it. The *derived* tile-year files (:data:`DERIVED`) have no settings of
their own: they are re-made whenever the grid they were made from is. The region
mosaic is made from the grids of a region's tiles, by the mosaic sensor.

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
    # 4: fill hatched grey in both panels, a caption with the coverage
    code_version="4",
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

# Upstream first: the order of verification, garbage collection and the catalog.
TABLE: tuple[Stage, ...] = (FRAMES, TENSORS, GRID, CHIPS, PREVIEW, MOSAIC)
FINGERPRINTED: tuple[Stage, ...] = (FRAMES, TENSORS, GRID)
DERIVED: tuple[Stage, ...] = (CHIPS, PREVIEW)
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
