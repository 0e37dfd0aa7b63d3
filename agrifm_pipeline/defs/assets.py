"""The tile-year assets and the region mosaic.

Each asset is thin: for every partition of its run it reads its inputs from
the stores, calls the library (:mod:`agrifm_pipeline.tileyear`), commits one
partition group, and records that partition's lineage as metadata. A run
covers many partitions (see ``tile_year_backfill``), so the model loads once
per run and the chips of all the run's tile-years share batches.
"""

import base64
import datetime as dt
import functools
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dagster as dg
import numpy as np
import torch
import xarray as xr

from agrifm_pipeline import __version__
from agrifm_pipeline.compute import Compute
from agrifm_pipeline.defs.checks import check_specs, evaluate_partition, targeting
from agrifm_pipeline.defs.partitions import (
    REGION_DIM,
    TILE_DIM,
    YEAR_DIM,
    region_year_partitions,
    split_key,
    tile_year_backfill,
    tile_year_partitions,
)
from agrifm_pipeline.defs.resources import (
    AgriFMModel,
    S2Source,
    TileYearConfig,
    ZarrStorage,
    run_fingerprints,
)
from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.inference import prefetch
from agrifm_pipeline.lineage import CODE_VERSIONS
from agrifm_pipeline.runtime import retain_freed_memory
from agrifm_pipeline.storage import Version, ZarrStore
from agrifm_pipeline.tiles import Tile
from agrifm_pipeline.tileyear import (
    TileYearSettings,
    acquire,
    band_frames,
    chip_coverage,
    chip_table,
    coverage_caption,
    covered_chips,
    embedding_grid,
    features_with_gaps,
    frame_stack_dataset,
    model_input,
    mosaic,
    normalise_tile,
    normalized_dataset,
    preview_png,
    valid_frames,
    with_coverage,
)

GROUP = "agrifm"
FRAMES = dg.AssetKey("s2_frame_stack")
NORMALIZED = dg.AssetKey("normalized_tensors")
EMBEDDING = dg.AssetKey("agrifm_embedding_grid")
# A derived stage -> the asset it makes, and the stage whose partition it reads.
DERIVED_STAGES = {
    "normalisation": (NORMALIZED, "acquisition"),
    "embedding": (EMBEDDING, "normalisation"),
}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _tile_years(context: dg.AssetExecutionContext) -> list[tuple[str, Tile, int]]:
    return [
        (key, Tile.from_id(t), y) for key in context.partition_keys for t, y in [split_key(key)]
    ]


def _base_lineage(
    context: dg.AssetExecutionContext,
    stage: str,
    tile: Tile,
    year: int,
    cfg: TileYearSettings,
    asset: dg.AssetKey | None = None,
) -> dict[str, Any]:
    return {
        "asset": (asset or context.asset_key).to_user_string(),
        "stage": stage,
        "tile": tile.id,
        "year": year,
        "crs": tile.crs,
        "tile_bounds": list(tile.bounds),
        "year_window": [f"{year}-01-01", f"{year + 1}-01-01"],
        "settings": cfg.as_record(),
        "package_version": __version__,
        "code_version": CODE_VERSIONS[stage],
        "run_id": context.run.run_id,
        "created_at": _now(),
    }


def _derived_lineage(
    context: dg.AssetExecutionContext,
    stage: str,
    tile: Tile,
    year: int,
    cfg: TileYearSettings,
    upstream: dict[str, Any],
    fingerprint: Any,
    source: Version,
) -> dict[str, Any]:
    """A stage's lineage: the upstream version's record, this stage's fields, its
    fingerprint added to the chain, and the exact upstream version it read."""
    asset, upstream_stage = DERIVED_STAGES[stage]
    lineage = {**upstream, **_base_lineage(context, stage, tile, year, cfg, asset)}
    lineage["fingerprints"] = {**upstream.get("fingerprints", {}), stage: fingerprint.as_record()}
    lineage["inputs"] = {
        source.asset: {
            **source.record(),
            "run_id": upstream.get("run_id"),
            "fingerprint": upstream.get("fingerprints", {})
            .get(upstream_stage, {})
            .get("fingerprint"),
        }
    }
    return lineage


def _summary(lineage: dict[str, Any], version: Version) -> dict[str, Any]:
    """The metadata users scan in the UI; the whole record is under ``lineage``."""
    settings = lineage["settings"]
    acq = lineage.get("acquisition", {})
    emb = lineage.get("embedding", {})
    fps = lineage.get("fingerprints", {})
    out: dict[str, Any] = {
        "path": dg.MetadataValue.path(version.url),
        "version": version.id,
        "gdal_path": version.gdal_path,
        "manifest_sha256": version.manifest_sha256,
        "n_frames": settings["n_frames"],
        "norm_mode": settings["norm_mode"],
        "image_size": settings["image_size"],
        "provider": acq.get("provider", ""),
        "synthetic": bool(acq.get("synthetic", False)),
        f"fingerprint_{lineage['stage']}": fps.get(lineage["stage"], {}).get("fingerprint", ""),
        "output_shape": str(lineage.get("output", {}).get("shape")),
        "lineage": dg.MetadataValue.json(json.loads(json.dumps(lineage, default=str))),
    }
    if acq:
        out["n_backfilled_frames"] = acq.get("n_backfilled_frames", 0)
        fr = acq.get("frames", [])
        out["mean_clear_fraction"] = (
            float(np.mean([f["clear_fraction"] for f in fr])) if fr else 0.0
        )
    if emb:
        ck = emb.get("checkpoint", {})
        out["checkpoint_sha256"] = ck.get("sha256", "")
        out["untrained"] = bool(ck.get("untrained", False))
        out["device"] = emb.get("device", "")
        out["precision"] = emb.get("precision", "")
    return out


def _upstream(
    store: ZarrStore, tile: Tile, year: int, what: str, version: str | None = None
) -> tuple[xr.Dataset, Version]:
    """An upstream partition (its current version, or the one named), read whole and
    checked against its manifest; with the version it is."""
    v = store.current(year, tile.id) if version is None else store.version(year, tile.id, version)
    if v is None:
        raise InputContractError(
            f"{what} has no partition {tile.id}|{year} under {store.root}; materialise "
            f"{store.asset} for it first (or include it in the same backfill)"
        )
    return store.open_version(v, verify=True), v


# -- assets ----------------------------------------------------------------------------------
PREVIOUS_CHECKPOINT_TAG = "agrifm/previous_checkpoint_sha256"


@dg.observable_source_asset(
    group_name=GROUP,
    description=(
        "The AgriFM weights; the data version is the file's sha256. Observed by a run that "
        "checkpoint_sensor requests when the sha256 changes."
    ),
)
def agrifm_checkpoint(context: dg.OpExecutionContext, model: AgriFMModel) -> dg.ObserveResult:
    from agrifm_pipeline.checkpoint import resolve_checkpoint
    from agrifm_pipeline.errors import CheckpointError
    from agrifm_pipeline.settings import load_settings

    settings = load_settings()
    try:  # what is cached, or a pinned URL's pin: no download just to observe
        resolved = resolve_checkpoint(
            model.checkpoint or None, settings.replace(auto_download=False)
        )
    except CheckpointError:
        resolved = model.resolved()
    return dg.ObserveResult(
        data_version=dg.DataVersion(resolved.sha256),
        metadata={
            "sha256": resolved.sha256,
            "size_bytes": resolved.size_bytes,
            "source": resolved.source,
            "path": str(resolved.path) if resolved.path else resolved.spec,
            "untrained": resolved.untrained,
            "previous_sha256": context.run.tags.get(PREVIOUS_CHECKPOINT_TAG, ""),
        },
    )


def acquire_one(
    context: Any,
    cfg: TileYearSettings,
    provider: Any,
    storage: ZarrStorage,
    fps: Any,
    item: tuple[str, Tile, int],
) -> tuple[str, dict[str, Any], Version]:
    """One ``s2_frame_stack`` partition fetched and committed (in the step or in a task)."""
    key, tile, year = item
    stack = acquire(provider, tile, year, cfg)
    lineage = _base_lineage(context, "acquisition", tile, year, cfg, FRAMES)
    lineage["acquisition"] = stack.record()
    lineage["fingerprints"] = {"acquisition": fps.acquisition.as_record()}
    lineage["output"] = {"shape": list(stack.data.shape), "dtype": str(stack.data.dtype)}
    dataset = frame_stack_dataset(stack, cfg.fill_value)
    version = storage.store("s2_frame_stack").write(year, tile.id, dataset, lineage)
    storage.catalog().record(version, lineage)
    return key, lineage, version


def _record_checks(
    context: dg.AssetExecutionContext, evaluations: Iterable[dg.AssetCheckEvaluation]
) -> None:
    """Each evaluation recorded against its own partition (the selected checks only) and
    the materialization it judged: called after the step yielded its results, so that
    the check's per-partition status in the UI counts it (see ``checks.targeting``)."""
    selected = context.selected_asset_check_keys
    chosen = [e for e in evaluations if e.asset_check_key in selected]
    for evaluation in targeting(context.instance, context.run.run_id, chosen):
        context.log_event(evaluation)


def _check_in_step(
    context: dg.AssetExecutionContext,
    storage: ZarrStorage,
    tile_year: TileYearConfig,
    assets: Iterable[dg.AssetKey],
    keys: list[str],
) -> None:
    for asset in assets:
        store = storage.store(asset.path[-1])
        for key in keys:
            _record_checks(context, evaluate_partition(asset, store, key, tile_year))


def _run_tasks(
    context: dg.AssetExecutionContext,
    compute: Compute,
    fn: Any,
    stage: str,
    items: list[tuple[str, Tile, int]],
    spec: Any,
    *,
    gpu: bool = False,
) -> list[dg.AssetCheckEvaluation]:
    """The step's tile-years as tasks on the cluster; what each returns is recorded here,
    but for the check evaluations, returned to be recorded after the step's results."""
    from agrifm_pipeline.defs.tasks import task_key

    run_id = context.run.run_id
    context.log.info(f"{len(items)} tile-year task(s) on {compute.describe()}")
    records = compute.map(
        fn,
        [(key, tile.id, year) for key, tile, year in items],
        keys=[task_key(stage, run_id, key) for key, _, _ in items],
        gpu=gpu,
        spec=spec,
    )
    checks: list[dg.AssetCheckEvaluation] = []
    for rec in records:
        for asset, key, meta in rec.metadata:
            context.add_asset_metadata(meta, partition_key=key, asset_key=asset)
        checks += rec.checks
        w = rec.worker
        again = " (committed before its worker died; reused)" if rec.reused else ""
        context.log.info(f"{rec.key}: {stage} on {w['worker']} (pid {w['pid']}){again}")
    return checks


# A multi-asset of one so that its check outputs are optional (can_subset): the checks'
# evaluations are logged per partition, not returned as one result per step.
@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            FRAMES,
            code_version=CODE_VERSIONS["acquisition"],
            group_name=GROUP,
            kinds={"zarr"},
            description=(
                "Raw Sentinel-2 L2A frame stack (T, 10, H, W) uint16 per tile-year, with its "
                "per-frame record."
            ),
        )
    ],
    name="s2_frame_stack",
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
    items = _tile_years(context)
    if compute.uses_cluster:
        from agrifm_pipeline.defs import tasks

        spec = tasks.StepSpec.of(
            context.run.run_id, tile_year, s2, storage, None, (), compute.acquisition_limit
        )
        checks = _run_tasks(context, compute, tasks.acquire, "acquisition", items, spec)
        yield dg.MaterializeResult(asset_key=FRAMES, metadata={"partitions_in_run": len(items)})
        _record_checks(context, checks)  # after the results: they target the materializations
        return
    cfg = tile_year.resolve()
    provider = s2.provider()
    fps = run_fingerprints(cfg, s2, "", None)
    one = functools.partial(acquire_one, context, cfg, provider, storage, fps)
    workers = max(1, min(s2.workers(), len(items)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key, lineage, version in pool.map(one, items):
            context.add_asset_metadata(
                _summary(lineage, version), partition_key=key, asset_key=FRAMES
            )
            context.log.info(f"{key}: frames written to {version.url}")
    yield dg.MaterializeResult(asset_key=FRAMES, metadata={"partitions_in_run": len(items)})
    # After the results: each evaluation targets its partition's new materialization.
    _check_in_step(context, storage, tile_year, [FRAMES], [k for k, _, _ in items])


# partition key, tile, year, normalisation lineage, and the normalisation version it is
Item = tuple[str, Tile, int, dict[str, Any], Version]
# the model input of one, with its (H, W) valid-frame counts
Made = tuple[Item, torch.Tensor, np.ndarray]


def _normalise(
    context: dg.AssetExecutionContext,
    cfg: TileYearSettings,
    src: ZarrStore,
    storage: ZarrStorage,
    fingerprint: Any,
    item: tuple[str, Tile, int],
) -> Made:
    """One ``normalized_tensors`` partition: frames read, normalised, written; returns its
    lineage, the model input it stands for and where the frames hold data."""
    key, tile, year = item
    up, up_version = _upstream(src, tile, year, "s2_frame_stack")
    upstream = src.lineage(year, tile.id, up_version.id)
    values = up["frames"].values
    if values.shape[0] != cfg.n_frames:
        raise InputContractError(
            f"s2_frame_stack {tile.id}|{year} has {values.shape[0]} frames but n_frames is "
            f"{cfg.n_frames}; re-materialise s2_frame_stack with the current settings"
        )
    tensor, record = normalise_tile(values, cfg)
    lineage = _derived_lineage(
        context, "normalisation", tile, year, cfg, upstream, fingerprint, up_version
    )
    keep = storage.keep_tensors
    lineage["normalisation"] = {**record, "tensors_kept": keep}
    lineage["output"] = {"shape": list(tensor.shape), "dtype": "float32"}
    valid = valid_frames(values, cfg.fill_value)
    ds = normalized_dataset(tensor, cfg, keep_tensors=keep, valid=valid)
    version = storage.store("normalized_tensors").write(year, tile.id, ds, lineage)
    storage.catalog().record(version, lineage)
    context.add_asset_metadata(_summary(lineage, version), partition_key=key, asset_key=NORMALIZED)
    return (key, tile, year, lineage, version), tensor, valid


def _stored_input(store: ZarrStore, frames: ZarrStore, item: tuple[str, Tile, int]) -> Made:
    """The model input of a ``normalized_tensors`` partition made by an earlier run."""
    key, tile, year = item
    ds, version = _upstream(store, tile, year, "normalized_tensors")
    lineage = store.lineage(year, tile.id, version.id)
    recorded = lineage.get("inputs", {}).get("s2_frame_stack", {}).get("version")
    x = model_input(
        ds,
        lambda: _upstream(frames, tile, year, "s2_frame_stack", recorded)[0],
        lineage,
        f"{tile.id}|{year}",
    )
    if "valid_frames" not in ds:
        raise InputContractError(
            f"normalized_tensors {tile.id}|{year} records no valid_frames (written by an older "
            "release); re-materialise normalized_tensors for it"
        )
    return (key, tile, year, lineage, version), x, ds["valid_frames"].values


def _write_embedding(
    context: dg.AssetExecutionContext,
    cfg: TileYearSettings,
    done: tuple[Item, np.ndarray, np.ndarray],
    feats: torch.Tensor,
    fingerprint: Any,
    record: dict[str, Any],
    resolved: dict[str, Any],
    storage: ZarrStorage,
    feature_shape: tuple[int, int, int],
) -> None:
    """One grid written: the encoded chips' features in place, NaN for the chips below
    ``min_chip_coverage``, beside each cell's valid fraction."""
    (key, tile, year, upstream, source), valid, keep = done
    feats = features_with_gaps(feats, keep, feature_shape)
    grid = embedding_grid(feats, tile, cfg)
    lineage = _derived_lineage(context, "embedding", tile, year, cfg, upstream, fingerprint, source)
    lineage["embedding"] = record
    lineage["inputs"]["agrifm_checkpoint"] = {"sha256": resolved["sha256"]}
    lineage["output"] = {
        "shape": list(grid.shape),
        "grid_hw": list(feats.shape[-2:]),
        "dtype": "float32",
    }
    ds = with_coverage(grid, valid, cfg.n_frames, keep, cfg)
    coverage = ("valid_fraction", "n_chips", "n_chips_encoded", "min_chip_coverage")
    lineage["embedding"] = {**record, "coverage": {k: ds.attrs[k] for k in coverage}}
    ds.attrs.update(
        checkpoint_sha256=str(resolved["sha256"]),
        untrained=int(bool(resolved.get("untrained"))),
        n_frames=cfg.n_frames,
        norm_mode=cfg.norm_mode,
        image_size=cfg.image_size,
    )
    version = storage.store("agrifm_embedding_grid").write(year, tile.id, ds, lineage)
    storage.catalog().record(version, lineage)
    meta = _summary(lineage, version)
    meta["valid_fraction"] = ds.attrs["valid_fraction"]
    meta["chips_encoded"] = f"{ds.attrs['n_chips_encoded']} of {ds.attrs['n_chips']}"
    context.add_asset_metadata(meta, partition_key=key, asset_key=EMBEDDING)


def normalise_and_embed_items(
    context: Any,
    tile_year: TileYearConfig,
    s2: S2Source,
    model: AgriFMModel | None,
    storage: ZarrStorage,
    items: list[tuple[str, Tile, int]],
    selected: set[dg.AssetKey],
) -> None:
    """The tile-years' normalisation and/or embedding, written and recorded through
    ``context`` (the step's, or a task's :class:`~agrifm_pipeline.compute.TaskContext`).
    The model is this process's cached engine, loaded once per checkpoint sha256."""
    retain_freed_memory()  # a step's or a worker's process (see runtime)
    cfg = tile_year.resolve()
    frames = storage.store("s2_frame_stack")
    tensors = storage.store("normalized_tensors")
    fps = run_fingerprints(cfg, s2, "", None)
    normalise = functools.partial(_normalise, context, cfg, frames, storage, fps.normalisation)
    if EMBEDDING not in selected:
        for tile_year_item in items:
            normalise(tile_year_item)
        return
    assert model is not None
    engine = model.engine()  # cached per process: a worker keeps it for every task and run
    resolved: dict[str, Any] = engine.checkpoint
    emb_fps = run_fingerprints(cfg, s2, str(resolved["sha256"]), model)
    record = {**engine.record(), "model_config": resolved.get("model_config")}
    both = NORMALIZED in selected
    if isinstance(context, dg.AssetExecutionContext):
        context.log.info(
            f"encoder {engine.encoder} on {engine.device} ({engine.precision}), checkpoint "
            f"{str(resolved['sha256'])[:12]}… untrained={engine.untrained}; {len(items)} "
            "tile-years"
            + (
                "; normalised in the same step"
                if both
                else "; model input from the stored partitions"
            )
        )
    make = normalise if both else functools.partial(_stored_input, tensors, frames)
    shape = engine.feature_shape(cfg.n_frames, cfg.image_size)

    def covered(made: Made) -> tuple[tuple[Item, np.ndarray, np.ndarray], torch.Tensor]:
        # Only the chips with enough data go to the encoder (none at all: no encoder time).
        item, x, valid = made
        keep = covered_chips(chip_coverage(valid, cfg.n_frames, cfg.chip_px), cfg)
        return (item, valid, keep), x[torch.from_numpy(keep)] if not keep.all() else x

    # The next tile-year is normalised (or read) while the current one is embedded.
    stream = prefetch(covered(make(i)) for i in items)
    for done, feats in engine.embed_stream(stream):
        _write_embedding(
            context, cfg, done, feats, emb_fps.embedding, record, resolved, storage, shape
        )


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            NORMALIZED,
            deps=[s2_frame_stack],
            code_version=CODE_VERSIONS["normalisation"],
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
            deps=[NORMALIZED, agrifm_checkpoint],
            code_version=CODE_VERSIONS["embedding"],
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
    items = _tile_years(context)
    selected = set(context.selected_asset_keys)
    assets = [a for a in (NORMALIZED, EMBEDDING) if a in selected]
    if compute.uses_cluster:
        from agrifm_pipeline.defs import tasks

        spec = tasks.StepSpec.of(
            context.run.run_id,
            tile_year,
            s2,
            storage,
            model if EMBEDDING in selected else None,
            tuple(a.to_user_string() for a in assets),
        )
        embeds = EMBEDDING in selected
        checks = _run_tasks(
            context, compute, tasks.normalise_and_embed, "embed", items, spec, gpu=embeds
        )
    else:
        normalise_and_embed_items(context, tile_year, s2, model, storage, items, selected)
        checks = None
    for asset in assets:
        yield dg.MaterializeResult(asset_key=asset, metadata={"partitions_in_run": len(items)})
    # After the results: each evaluation targets its partition's new materialization.
    if checks is None:
        _check_in_step(context, storage, tile_year, assets, [k for k, _, _ in items])
    else:
        _record_checks(context, checks)


@dg.asset(
    partitions_def=tile_year_partitions,
    backfill_policy=tile_year_backfill,
    # 2: valid_fraction, encoded and status per chip; NaN vectors for chips not encoded
    code_version="2",
    group_name=GROUP,
    deps=[EMBEDDING],
    kinds={"geoparquet"},
    description="Pooled vectors per chip (spatial mean and max) with chip footprints, as GeoParquet.",
)
def chip_embeddings(
    context: dg.AssetExecutionContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.MaterializeResult:
    cfg = tile_year.resolve()
    src = storage.store("agrifm_embedding_grid")
    items = _tile_years(context)
    for key, tile, year in items:
        ds, grid_version = _upstream(src, tile, year, "agrifm_embedding_grid")
        lineage = _file_lineage(
            context, "chip_embeddings", src.lineage(year, tile.id, grid_version.id), grid_version
        )
        gdf = chip_table(ds["embedding"], tile, year, cfg, coverage=ds.attrs)
        gdf["checkpoint_sha256"] = ds.attrs.get("checkpoint_sha256", "")
        version = storage.files("chip_embeddings").put(
            year, tile.id, CHIPS_FILE, _parquet_bytes(gdf, lineage), lineage
        )
        storage.catalog().record(version, lineage)
        meta = _summary(lineage, version)
        meta["path"] = dg.MetadataValue.path(f"{version.url}/{CHIPS_FILE}")
        meta["n_chips"] = len(gdf)
        meta["chips_encoded"] = int(gdf["encoded"].sum())
        context.add_asset_metadata(meta, partition_key=key)
    return dg.MaterializeResult(metadata={"partitions_in_run": len(items)})


CHIPS_FILE = "chips.parquet"
PREVIEW_FILE = "preview.png"


def _file_lineage(
    context: dg.AssetExecutionContext, asset: str, grid: dict[str, Any], *read: Version
) -> dict[str, Any]:
    """A derived file's lineage: the grid's record, this asset's run, the versions read."""
    return {
        **grid,
        "asset": asset,
        "run_id": context.run.run_id,
        "created_at": _now(),
        "inputs": {v.asset: v.record() for v in read},
    }


def _parquet_bytes(gdf: Any, lineage: dict[str, Any]) -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    gdf.to_parquet(buf, index=False)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    meta = dict(table.schema.metadata or {})
    meta[b"agrifm_lineage"] = json.dumps(lineage, default=str).encode()
    out = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), out)
    return out.getvalue()


@dg.asset(
    partitions_def=tile_year_partitions,
    backfill_policy=tile_year_backfill,
    # 2: randomised PCA (same components to 1e-13 correlation); 3: that SVD taken of the
    # grid as stored (the same components again, not the same bits), PNG at zlib's level;
    # 4: fill hatched grey in both panels, a caption with the coverage
    code_version="4",
    group_name=GROUP,
    deps=[EMBEDDING, s2_frame_stack],
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
    grids, stacks = storage.store("agrifm_embedding_grid"), storage.store("s2_frame_stack")
    items = _tile_years(context)
    for key, tile, year in items:
        grid, grid_version = _upstream(grids, tile, year, "agrifm_embedding_grid")
        rgb = ["B4", "B3", "B2"]
        stack, stack_version = _upstream(stacks, tile, year, "s2_frame_stack")
        png = preview_png(
            band_frames(stack["frames"], rgb),
            grid["embedding"].values,
            rgb,
            coverage=grid.attrs,
            nodata=stack["frames"].attrs.get("nodata", 0),
        )
        grid_lineage = grids.lineage(year, tile.id, grid_version.id)
        lineage = _file_lineage(
            context, "embedding_preview", grid_lineage, grid_version, stack_version
        )
        version = storage.files("embedding_preview").put(year, tile.id, PREVIEW_FILE, png, lineage)
        storage.catalog().record(version, lineage)
        b64 = base64.b64encode(png).decode()
        context.add_asset_metadata(
            {
                "path": dg.MetadataValue.path(f"{version.url}/{PREVIEW_FILE}"),
                "version": version.id,
                "preview": dg.MetadataValue.md(
                    f"**{tile.id} {year}** — input median (left), embedding PCA (right); "
                    f"hatched grey: no data. {coverage_caption(grid.attrs)}\n\n"
                    f"![preview](data:image/png;base64,{b64})"
                ),
                "checkpoint_sha256": grid_lineage.get("embedding", {})
                .get("checkpoint", {})
                .get("sha256", ""),
                "fingerprint_embedding": grid_lineage.get("fingerprints", {})
                .get("embedding", {})
                .get("fingerprint", ""),
            },
            partition_key=key,
        )
    return dg.MaterializeResult(metadata={"partitions_in_run": len(items)})


@dg.asset(
    partitions_def=region_year_partitions,
    code_version="1",
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
    src, store = storage.store("agrifm_embedding_grid"), storage.store("region_mosaic")
    registry = storage.registry()
    keys = context.partition_keys
    for key in keys:
        region, year = split_key(key, REGION_DIM)
        tiles = [Tile.from_id(t) for t in registry.tiles_of(region)]
        currents = {t.id: src.current(year, t.id) for t in tiles}
        missing = [t for t, v in currents.items() if v is None]
        if missing:
            raise InputContractError(
                f"region {region} {year}: no embedding grid yet for {len(missing)} of its "
                f"{len(tiles)} tiles ({', '.join(missing[:5])}{'…' if len(missing) > 5 else ''}); "
                "backfill agrifm_embedding_grid for those tile-years first"
            )
        by_zone: dict[int, list[Tile]] = {}
        for t in tiles:
            by_zone.setdefault(t.epsg, []).append(t)
        groups: dict[str, xr.Dataset] = {}
        shas: set[str] = set()
        tile_lineage: dict[str, dict[str, Any]] = {}
        read: dict[str, str] = {}
        for epsg, zone_tiles in sorted(by_zone.items()):
            opened = []
            for t in zone_tiles:
                v = currents[t.id]
                assert v is not None
                opened.append(src.open_version(v, verify=True))
                read[t.id] = v.id
                tile_lineage[t.id] = src.lineage(year, t.id, v.id)
            shas.update(str(o.attrs.get("checkpoint_sha256", "")) for o in opened)
            merged = mosaic([o["embedding"] for o in opened]).to_dataset()
            name = "" if len(by_zone) == 1 else f"utm_{epsg}"
            groups[name] = merged
        lineage = {
            "asset": "region_mosaic",
            "region": region,
            "year": year,
            "tile": region,
            "tiles": [t.id for t in tiles],
            "zones": sorted(by_zone),
            "checkpoint_sha256": sorted(shas),
            "package_version": __version__,
            "run_id": context.run.run_id,
            "created_at": _now(),
            "fingerprints_of_tiles": {
                t: lin.get("fingerprints", {}) for t, lin in tile_lineage.items()
            },
            "inputs": {"agrifm_embedding_grid": {"versions": read}},
        }
        version = store.write_groups(year, region, groups, lineage)
        storage.catalog().record(version, lineage)
        context.add_asset_metadata(
            {
                "path": dg.MetadataValue.path(version.url),
                "version": version.id,
                "n_tiles": len(tiles),
                "zones": str(sorted(by_zone)),
                "checkpoint_sha256": ",".join(sorted(shas)),
                "gdal_path": f'ZARR:"{version.gdal_path}":/embedding'
                if len(by_zone) == 1
                else f'ZARR:"{version.gdal_path}/utm_<epsg>":/embedding',
            },
            partition_key=key,
        )
    return dg.MaterializeResult(metadata={"partitions_in_run": len(keys)})


tile_year_assets = [
    s2_frame_stack,
    normalise_and_embed,
    chip_embeddings,
    embedding_preview,
]
all_assets = [agrifm_checkpoint, *tile_year_assets, region_mosaic]
