"""The assets: the Dagster declarations of the stage table's assets.

Each asset is thin: it declares its key, partitions, dependencies, checks and code
version (from its row in :mod:`agrifm_pipeline.stages`), and its step calls the work
in :mod:`agrifm_pipeline.defs.steps`, in the step's process or, one tile-year per
task, on a cluster (:mod:`agrifm_pipeline.defs.tasks`). A run covers many partitions
(see ``tile_year_backfill``), so the model loads once per run and the chips of all
the run's tile-years share batches.

The asset functions are named as their assets (the names are the keys); each one's
``name=`` is its row's asset, so a function renamed here cannot rename an asset.
"""

from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from agrifm_pipeline import stages
from agrifm_pipeline.compute import Compute
from agrifm_pipeline.defs import steps, tasks
from agrifm_pipeline.defs.checks import check_specs
from agrifm_pipeline.defs.keys import CHECKPOINT, EMBEDDING, FRAMES, MOSAIC, NORMALIZED
from agrifm_pipeline.defs.partitions import (
    REGION_DIM,
    TILE_DIM,
    YEAR_DIM,
    region_year_partitions,
    tile_year_backfill,
    tile_year_partitions,
)
from agrifm_pipeline.defs.resources import AgriFMModel, S2Source, TileYearConfig, ZarrStorage
from agrifm_pipeline.runtime import retain_freed_memory

GROUP = "agrifm"
PREVIOUS_CHECKPOINT_TAG = "agrifm/previous_checkpoint_sha256"


@dg.observable_source_asset(
    name=stages.CHECKPOINT_ASSET,
    group_name=GROUP,
    description=(
        "The AgriFM weights; the data version is the file's sha256. Observed by a run that "
        "checkpoint_sensor requests when the sha256 changes."
    ),
)
def agrifm_checkpoint(context: dg.OpExecutionContext, model: AgriFMModel) -> dg.ObserveResult:
    return steps.observe_checkpoint(model, context.run.tags.get(PREVIOUS_CHECKPOINT_TAG, ""))


# A multi-asset of one so that its check outputs are optional (can_subset): the checks'
# evaluations are logged per partition, not returned as one result per step.
@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            FRAMES,
            code_version=stages.FRAMES.code_version,
            group_name=GROUP,
            kinds={"zarr"},
            description=(
                "Raw Sentinel-2 L2A frame stack (T, 10, H, W) uint16 per tile-year, with its "
                "per-frame record."
            ),
        )
    ],
    name=stages.FRAMES.asset,
    partitions_def=tile_year_partitions,
    backfill_policy=tile_year_backfill,
    pool="s2_acquisition",
    can_subset=True,
    check_specs=check_specs(FRAMES),
)
def s2_frame_stack(
    context: dg.AssetExecutionContext,
    tile_year: TileYearConfig,
    s2: S2Source,
    storage: ZarrStorage,
    compute: Compute,
) -> Iterator[dg.MaterializeResult]:
    retain_freed_memory()  # a step's process: before its threads allocate (see runtime)
    # Yielded, not returned: with check specs the step has several outputs.
    items = steps.tile_years(context, storage)
    if compute.uses_cluster:
        spec = tasks.StepSpec.of(
            context.run.run_id, tile_year, s2, storage, None, (), compute.acquisition_limit
        )
        checks = tasks.run_tasks(context, compute, tasks.acquire, "acquisition", items, spec)
        yield dg.MaterializeResult(asset_key=FRAMES, metadata={"partitions_in_run": len(items)})
        steps.record_checks(context, checks)  # after the results: they target the materializations
        return
    steps.acquire_in_step(context, tile_year, s2, storage, items)
    yield dg.MaterializeResult(asset_key=FRAMES, metadata={"partitions_in_run": len(items)})
    # After the results: each evaluation targets its partition's new materialization.
    steps.check_in_step(context, storage, tile_year, [FRAMES], [k for k, _, _ in items])


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            NORMALIZED,
            deps=[FRAMES],
            code_version=stages.TENSORS.code_version,
            group_name=GROUP,
            kinds={"zarr"},
            skippable=True,
            description=(
                "Model input (chips, T, 10, S, S) float32: clip 0..10000, normalise, resize. "
                "Stored as per-chip statistics and lineage, plus the tensors themselves with "
                "storage.keep_tensors."
            ),
        ),
        dg.AssetSpec(
            EMBEDDING,
            deps=[NORMALIZED, CHECKPOINT],
            code_version=stages.GRID.code_version,
            group_name=GROUP,
            kinds={"pytorch", "zarr"},
            skippable=True,
            description=(
                "Georeferenced AgriFM feature grid (band, y, x) per tile-year; chips sit side "
                "by side."
            ),
        ),
    ],
    name="normalise_and_embed",
    check_specs=[*check_specs(NORMALIZED), *check_specs(EMBEDDING)],
    partitions_def=tile_year_partitions,
    backfill_policy=tile_year_backfill,
    can_subset=True,
    pool="agrifm_encoder",
)
def normalise_and_embed(
    context: dg.AssetExecutionContext,
    tile_year: TileYearConfig,
    s2: S2Source,
    model: AgriFMModel,
    storage: ZarrStorage,
    compute: Compute,
) -> Iterator[dg.MaterializeResult]:
    """``normalized_tensors`` and ``agrifm_embedding_grid`` as one step.

    Selected together (a backfill, the schedule, a changed normalisation), each
    tile-year is normalised once and its tensor goes straight to the encoder:
    the step does not read the frames back and normalise them a second time,
    as a separate embedding step would (``storage.keep_tensors`` off), and the
    run has one step fewer to start. Selected alone, each asset does its own
    part: the normalisation writes its partitions, and the embedding reads the
    model input of the stored ones (after a new checkpoint, say).

    On a cluster (``compute``) each tile-year is a task on a worker that keeps the
    model loaded (GPU workers where the cluster has them); otherwise the work runs
    in this step. Either way each partition is checked once written, and the evaluations
    are recorded after the step's results, each naming the materialization it judged.
    """
    items = steps.tile_years(context, storage)
    selected = set(context.selected_asset_keys)
    assets = [a for a in (NORMALIZED, EMBEDDING) if a in selected]
    if compute.uses_cluster:
        spec = tasks.StepSpec.of(
            context.run.run_id,
            tile_year,
            s2,
            storage,
            model if EMBEDDING in selected else None,
            tuple(a.to_user_string() for a in assets),
        )
        embeds = EMBEDDING in selected
        checks = tasks.run_tasks(
            context, compute, tasks.normalise_and_embed, "embed", items, spec, gpu=embeds
        )
    else:
        steps.normalise_and_embed_items(context, tile_year, s2, model, storage, items, selected)
        checks = None
    for asset in assets:
        yield dg.MaterializeResult(asset_key=asset, metadata={"partitions_in_run": len(items)})
    # After the results: each evaluation targets its partition's new materialization.
    if checks is None:
        steps.check_in_step(context, storage, tile_year, assets, [k for k, _, _ in items])
    else:
        steps.record_checks(context, checks)


@dg.asset(
    name=stages.CHIPS.asset,
    partitions_def=tile_year_partitions,
    backfill_policy=tile_year_backfill,
    code_version=stages.CHIPS.code_version,
    group_name=GROUP,
    deps=[EMBEDDING],
    kinds={"geoparquet"},
    description="Pooled vectors per chip (spatial mean and max) with chip footprints, as GeoParquet.",
)
def chip_embeddings(
    context: dg.AssetExecutionContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.MaterializeResult:
    return steps.chip_tables(context, tile_year, storage)


@dg.asset(
    name=stages.PREVIEW.asset,
    partitions_def=tile_year_partitions,
    backfill_policy=tile_year_backfill,
    code_version=stages.PREVIEW.code_version,
    group_name=GROUP,
    deps=[EMBEDDING, FRAMES],
    kinds={"png"},
    description=(
        "Median true-colour input beside a 3-component PCA of the embedding grid. In the "
        "UI: a materialization's `preview` entry, *[Show Markdown]* (Dagster shows markdown "
        "inline only under 1000 characters; the PNG is tens of kB); `path` is the file."
    ),
)
def embedding_preview(
    context: dg.AssetExecutionContext, storage: ZarrStorage
) -> dg.MaterializeResult:
    return steps.previews(context, storage)


@dg.asset(
    name=stages.MOSAIC.asset,
    partitions_def=region_year_partitions,
    code_version=stages.MOSAIC.code_version,
    group_name=GROUP,
    deps=[
        dg.AssetDep(
            EMBEDDING,
            partition_mapping=dg.MultiPartitionMapping(
                {
                    YEAR_DIM: dg.DimensionPartitionMapping(YEAR_DIM, dg.IdentityPartitionMapping()),
                    TILE_DIM: dg.DimensionPartitionMapping(REGION_DIM, dg.AllPartitionMapping()),
                }
            ),
        )
    ],
    kinds={"zarr"},
    description="One georeferenced grid per registered region and year (one per UTM zone it spans).",
)
def region_mosaic(context: dg.AssetExecutionContext, storage: ZarrStorage) -> dg.MaterializeResult:
    return steps.region_mosaics(context, storage)


@dg.asset(
    name=stages.GRID_INT8.asset,
    partitions_def=tile_year_partitions,
    backfill_policy=tile_year_backfill,
    code_version=stages.GRID_INT8.code_version,
    group_name=GROUP,
    deps=[EMBEDDING],
    kinds={"zarr"},
    description=(
        "The embedding grid as int8 codes (band, y, x) with a float32 scale and offset per "
        "band, about a quarter of the float32 grid's bytes; -128 is no data. The scheme and "
        "its formula are in the attributes; agrifm_pipeline.tileyear.read_embeddings reads it."
    ),
)
def agrifm_embedding_int8(
    context: dg.AssetExecutionContext, storage: ZarrStorage
) -> dg.MaterializeResult:
    return steps.int8_grids(context, storage)


# The region products beside the mosaic: made from the same grids, by the same rule.
REGION_DEP = dg.AssetDep(
    EMBEDDING,
    partition_mapping=dg.MultiPartitionMapping(
        {
            YEAR_DIM: dg.DimensionPartitionMapping(YEAR_DIM, dg.IdentityPartitionMapping()),
            TILE_DIM: dg.DimensionPartitionMapping(REGION_DIM, dg.AllPartitionMapping()),
        }
    ),
)


@dg.asset(
    name=stages.MOSAIC_INT8.asset,
    partitions_def=region_year_partitions,
    code_version=stages.MOSAIC_INT8.code_version,
    group_name=GROUP,
    deps=[REGION_DEP],
    kinds={"zarr"},
    description=(
        "The region mosaic as int8 codes with a scale and offset per band (a group per UTM "
        "zone it spans); made from the tiles' grids, like region_mosaic."
    ),
)
def region_mosaic_int8(
    context: dg.AssetExecutionContext, storage: ZarrStorage
) -> dg.MaterializeResult:
    return steps.region_products(context, storage, stages.MOSAIC_INT8)


@dg.asset(
    name=stages.MOSAIC_COG.asset,
    partitions_def=region_year_partitions,
    code_version=stages.MOSAIC_COG.code_version,
    group_name=GROUP,
    deps=[REGION_DEP],
    kinds={"tiff"},
    description=(
        "The region mosaic as Cloud-Optimized GeoTIFFs, utm_<epsg>.tif per UTM zone: uint8 "
        "codes with each band's scale and offset (GDAL's -unscale gives the floats), 0 as "
        "no data, internal tiles and overviews; GDAL 3.6+, rasterio and QGIS open them."
    ),
)
def region_mosaic_cog(
    context: dg.AssetExecutionContext, storage: ZarrStorage
) -> dg.MaterializeResult:
    return steps.region_products(context, storage, stages.MOSAIC_COG)


tile_year_assets = [
    s2_frame_stack,
    normalise_and_embed,
    chip_embeddings,
    embedding_preview,
    agrifm_embedding_int8,
]
# Everything the mosaic sensor makes of a region's grids (stages.REGION_PRODUCTS).
region_product_assets = [region_mosaic, region_mosaic_int8, region_mosaic_cog]


@dg.asset(
    name=stages.AUDIT_ASSET,
    group_name=GROUP,
    deps=[*tile_year_assets],
    kinds={"table"},
    description="Every partition with its checkpoint, frames, normalisation, maker, and whether it is current.",
)
def lineage_audit(
    context: dg.AssetExecutionContext,
    tile_year: TileYearConfig,
    s2: S2Source,
    model: AgriFMModel,
    storage: ZarrStorage,
) -> dg.MaterializeResult:
    return steps.audit_table(context, tile_year, s2, model, storage)


# -- maps on request: a region-year's similarity to a point, its classes from labels ------------


class SimilarityConfig(dg.Config):
    """The query of a similarity map: a point or a polygon (exactly one)."""

    at: str = Field(default="", description="the query point: LON,LAT in degrees (WGS84)")
    polygon: str = Field(
        default="", description="or the query polygon: a GeoJSON file or WKT in WGS84"
    )
    product: str = Field(
        default=stages.MOSAIC.asset,
        description="the region product read: "
        + " | ".join(s.asset for s in stages.REGION_PRODUCTS),
    )
    metric: str = Field(
        default="standardised",
        description="standardised (channels centred and scaled over the product, then "
        "cosine) | cosine (the vectors as they are)",
    )


class ClassifyConfig(dg.Config):
    """The labels of a class map and the classifier."""

    labels: str = Field(
        default="", description="a GeoJSON (or any vector file) of labelled polygons"
    )
    label_property: str = Field(default="crop", description="the property naming the class")
    group_by: str = Field(
        default="",
        description="the property naming a polygon's field (default: each polygon is one)",
    )
    model: str = Field(default="logistic", description="logistic | knn")
    k: int = Field(default=5, description="knn: neighbours")
    folds: int = Field(default=5, description="cross-validation folds (whole fields held out)")
    product: str = Field(
        default=stages.MOSAIC.asset,
        description="the region product read: "
        + " | ".join(s.asset for s in stages.REGION_PRODUCTS),
    )


@dg.asset(
    name=stages.SIMILARITY.asset,
    partitions_def=region_year_partitions,
    code_version=stages.SIMILARITY.code_version,
    group_name=GROUP,
    deps=[MOSAIC],
    kinds={"tiff", "png"},
    description=(
        "Cosine similarity of every cell of a region-year's mosaic to a query point or "
        "polygon (config: at LON,LAT, or polygon), as a COG (similarity.tif) and a PNG; "
        "each materialisation is a new version, its lineage naming the query and the "
        "embedding version read."
    ),
)
def similarity_map(
    context: dg.AssetExecutionContext, config: SimilarityConfig, storage: ZarrStorage
) -> dg.MaterializeResult:
    return steps.similarity_maps(
        context,
        storage,
        at=config.at,
        polygon=config.polygon,
        product=config.product,
        metric=config.metric,
    )


@dg.asset(
    name=stages.CLASSES.asset,
    partitions_def=region_year_partitions,
    code_version=stages.CLASSES.code_version,
    group_name=GROUP,
    deps=[MOSAIC],
    kinds={"tiff", "png", "scikitlearn"},
    description=(
        "Few-shot class map of a region-year from labelled polygons (config: labels, "
        "label_property): a classifier on the embeddings under them, its accuracy per class "
        "cross-validated with whole fields held out, and every cell classified (classes.tif "
        "with a palette, confidence.tif, classes.png with the legend, report.json)."
    ),
)
def class_map(
    context: dg.AssetExecutionContext, config: ClassifyConfig, storage: ZarrStorage
) -> dg.MaterializeResult:
    return steps.class_maps(
        context,
        storage,
        labels=config.labels,
        label_property=config.label_property,
        group_by=config.group_by,
        model=config.model,
        k=config.k,
        folds=config.folds,
        product=config.product,
    )


map_assets = [similarity_map, class_map]

all_assets: list[dg.AssetsDefinition | dg.SourceAsset] = [
    agrifm_checkpoint,
    *tile_year_assets,
    *region_product_assets,
    *map_assets,
    lineage_audit,
]
