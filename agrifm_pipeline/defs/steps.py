"""What each asset's step does, for the tile-years (or region-years) of its run.

The assets (:mod:`agrifm_pipeline.defs.assets`) declare; the work is here. For every
partition a step reads its inputs from the stores, calls the library
(:mod:`agrifm_pipeline.tileyear`), commits one partition version, and records that
partition's lineage as metadata. The same functions run in the step itself or, one
tile-year each, as a task on a cluster worker (:mod:`agrifm_pipeline.defs.tasks`):
``context`` is then the task's :class:`~agrifm_pipeline.compute.TaskContext`.

Every asset is named through the stage table (:mod:`agrifm_pipeline.stages`).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import io
import json
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import numpy as np
import torch
import xarray as xr

from agrifm_pipeline import __version__, stages
from agrifm_pipeline.audit import markdown_table
from agrifm_pipeline.checkpoint import resolve_checkpoint
from agrifm_pipeline.defs.audit import audit_rows
from agrifm_pipeline.defs.checks import evaluate_partition, targeting
from agrifm_pipeline.defs.keys import EMBEDDING, FRAMES, NORMALIZED, key_of
from agrifm_pipeline.defs.partitions import (
    REGION_DIM,
    TILES_TAG,
    TileUnits,
    split_key,
    tile_year_key,
)
from agrifm_pipeline.defs.resources import (
    AgriFMModel,
    S2Source,
    TileYearConfig,
    ZarrStorage,
    run_fingerprints,
)
from agrifm_pipeline.defs.staleness import current_fingerprints, source_scenes, stage_stores
from agrifm_pipeline.errors import CheckpointError, InputContractError
from agrifm_pipeline.inference import prefetch
from agrifm_pipeline.mapping import (
    MapProduct,
    load_embeddings,
    make_class_map,
    make_similarity,
    parse_query,
    read_labels,
)
from agrifm_pipeline.runtime import retain_freed_memory
from agrifm_pipeline.settings import load_settings
from agrifm_pipeline.storage import Version, ZarrStore
from agrifm_pipeline.tiles import Tile, is_block_id
from agrifm_pipeline.tileyear import (
    QUANT_ATTRS,
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
    quantised_dataset,
    valid_frames,
    with_coverage,
)
from agrifm_pipeline.tileyear.cog import cog_bytes, cog_quantisation

# partition key, tile, year: one tile-year of a step's run
TileYear = tuple[str, Tile, int]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class _Blocks:
    """A run over block partitions: each tile-year's partition, and what each block's
    tiles have published so far (per asset)."""

    owner: dict[str, str]  # tile-year key -> the block-year key it is done under
    made: dict[tuple[Any, str], dict[str, dict[str, Any]]] = field(default_factory=dict)


_BLOCKS: weakref.WeakKeyDictionary[Any, _Blocks] = weakref.WeakKeyDictionary()


def tile_years(context: dg.AssetExecutionContext, storage: ZarrStorage) -> list[TileYear]:
    """The tile-years of the step's run, in partition order: a block partition stands for
    its registered tiles (those the run's ``agrifm/tiles`` tag names, when it has one).
    Each item's key is its tile-year key; :func:`publish` and :func:`record_checks` put
    what is said of it on the partition it belongs to."""
    only = context.run.tags.get(TILES_TAG)
    wanted = set(only.split(",")) if only else None
    units: TileUnits | None = None
    owner: dict[str, str] = {}
    out: list[TileYear] = []
    for key in context.partition_keys:
        unit, year = split_key(key)
        if not is_block_id(unit):
            out.append((str(key), Tile.from_id(unit), year))
            continue
        if units is None:
            units = TileUnits(storage.registry().owners())
        tiles = [t for t in units.tiles(unit) if wanted is None or t in wanted]
        if not tiles:
            context.log.warning(f"{key}: no registered tile of block {unit} to do")
        for t in tiles:
            item = str(tile_year_key(t, year))
            owner[item] = str(key)
            out.append((item, Tile.from_id(t), year))
    if owner:
        _BLOCKS[context] = _Blocks(owner)
    return out


def publish(
    context: Any, metadata: dict[str, Any], key: str, asset_key: dg.AssetKey | None = None
) -> None:
    """A tile-year's metadata onto its partition: the tile-year's own, or its block's,
    where each tile is a row (``tiles``: its plain fields; ``versions``: tile -> version,
    what the sensors and the audit read) and the fields every tile shares are the
    block's own."""
    blocks = _BLOCKS.get(context)
    owner = blocks.owner.get(key) if blocks is not None else None
    if blocks is None or owner is None:
        context.add_asset_metadata(metadata, partition_key=key, asset_key=asset_key)
        return
    tile, _ = split_key(key)
    made = blocks.made.setdefault((asset_key, owner), {})
    made[tile] = {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))}
    context.add_asset_metadata(block_metadata(made), partition_key=owner, asset_key=asset_key)


def block_metadata(made: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A block partition's metadata from its tiles' (tile -> plain fields)."""
    rows = list(made.values())
    shared = {
        k: v
        for k, v in rows[0].items()
        if k not in PER_TILE and all(r.get(k) == v for r in rows[1:])
    }
    per_tile = {t: {k: v for k, v in r.items() if k not in shared} for t, r in sorted(made.items())}
    return {
        **shared,
        "tiles_made": len(made),
        "versions": dg.MetadataValue.json({t: r.get("version") for t, r in per_tile.items()}),
        "tiles": dg.MetadataValue.json(per_tile),
    }


# Fields of one tile-year's metadata that are its own even when every tile agrees.
PER_TILE = frozenset({"version", "gdal_path", "manifest_sha256"})


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
        "code_version": stages.CODE_VERSIONS[stage],
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
    """A fingerprinted stage's lineage below the first: the upstream version's record, this
    stage's fields, its fingerprint added to the chain, and the exact upstream version it
    read (the stage table says which stage that is)."""
    row = stages.BY_STAGE[stage]
    assert row.upstream is not None, f"{row.asset} reads no stored asset"
    upstream_stage = stages.BY_ASSET[row.upstream].stage
    lineage = {**upstream, **_base_lineage(context, stage, tile, year, cfg, key_of(row))}
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


def summary(lineage: dict[str, Any], version: Version) -> dict[str, Any]:
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
    store: ZarrStore, tile: Tile, year: int, version: str | None = None
) -> tuple[xr.Dataset, Version]:
    """An upstream partition (its current version, or the one named), read whole and
    checked against its manifest; with the version it is."""
    v = store.current(year, tile.id) if version is None else store.version(year, tile.id, version)
    if v is None:
        raise InputContractError(
            f"{store.asset} has no partition {tile.id}|{year} under {store.root}; materialise "
            f"{store.asset} for it first (or include it in the same backfill)"
        )
    return store.open_version(v, verify=True), v


# -- the checks, judged in the step ----------------------------------------------------------------


def record_checks(
    context: dg.AssetExecutionContext, evaluations: Iterable[dg.AssetCheckEvaluation]
) -> None:
    """Each evaluation recorded against its own partition (the selected checks only) and
    the materialization it judged: called after the step yielded its results, so that
    the check's per-partition status in the UI counts it (see ``checks.targeting``)."""
    selected = context.selected_asset_check_keys
    chosen = [e for e in evaluations if e.asset_check_key in selected]
    blocks = _BLOCKS.get(context)
    if blocks is not None:
        chosen = per_block(chosen, blocks.owner)
    for evaluation in targeting(context.instance, context.run.run_id, chosen):
        context.log_event(evaluation)


def per_block(
    evaluations: list[dg.AssetCheckEvaluation], owner: dict[str, str]
) -> list[dg.AssetCheckEvaluation]:
    """Evaluations of tile-years done under block partitions as one per block and check:
    passed when every tile passed, the failing tiles named (each tile's own evaluation
    is in the audit's reach: re-judged from the store by ``agrifm-pipeline verify``)."""
    out: list[dg.AssetCheckEvaluation] = []
    groups: dict[tuple[dg.AssetCheckKey, str], list[dg.AssetCheckEvaluation]] = {}
    for e in evaluations:
        block = owner.get(str(e.partition))
        if block is None:
            out.append(e)
        else:
            groups.setdefault((e.asset_check_key, block), []).append(e)
    for (_, block), group in groups.items():
        failed = [e for e in group if not e.passed]
        names = [split_key(str(e.partition))[0] for e in failed]
        first = failed[0] if failed else group[0]
        meta: dict[str, Any] = {
            "tiles_judged": len(group),
            "tiles_failed": len(failed),
            "failed_tiles": dg.MetadataValue.json(names),
        }
        if failed:
            meta["first_failure"] = dg.MetadataValue.json(
                {
                    "tile": names[0],
                    **{k: str(getattr(v, "value", v)) for k, v in first.metadata.items()},
                }
            )
        out.append(
            dg.AssetCheckEvaluation(
                asset_key=first.asset_key,
                check_name=first.check_name,
                passed=not failed,
                metadata=meta,
                severity=first.severity,
                description=(first.description or "")
                + (f" Failed on {len(failed)} of {len(group)} tiles." if failed else ""),
                partition=block,
            )
        )
    return out


def check_in_step(
    context: dg.AssetExecutionContext,
    storage: ZarrStorage,
    tile_year: TileYearConfig,
    assets: Iterable[dg.AssetKey],
    keys: list[str],
) -> None:
    """Every check of ``assets`` judged on each partition ``keys`` the step wrote."""
    for asset in assets:
        store = storage.store(asset.path[-1])
        judged = [e for key in keys for e in evaluate_partition(asset, store, key, tile_year)]
        record_checks(context, judged)  # together: a block's tiles make one evaluation


# -- the checkpoint --------------------------------------------------------------------------------


def observe_checkpoint(model: AgriFMModel, previous_sha256: str) -> dg.ObserveResult:
    """The checkpoint's observation: its sha256 as the data version (what is cached, or a
    pinned URL's pin: no download just to observe)."""
    settings = load_settings()
    try:
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
            "previous_sha256": previous_sha256,
        },
    )


# -- acquisition -----------------------------------------------------------------------------------


def acquire_one(
    context: Any,
    cfg: TileYearSettings,
    provider: Any,
    storage: ZarrStorage,
    fps: Any,
    item: TileYear,
) -> tuple[str, dict[str, Any], Version]:
    """One ``s2_frame_stack`` partition fetched and committed (in the step or in a task)."""
    key, tile, year = item
    stack = acquire(provider, tile, year, cfg)
    lineage = _base_lineage(context, stages.FRAMES.stage, tile, year, cfg, FRAMES)
    lineage["acquisition"] = stack.record()
    lineage["fingerprints"] = {stages.FRAMES.stage: fps.acquisition.as_record()}
    lineage["output"] = {"shape": list(stack.data.shape), "dtype": str(stack.data.dtype)}
    dataset = frame_stack_dataset(stack, cfg.fill_value)
    version = storage.store(stages.FRAMES.asset).write(year, tile.id, dataset, lineage)
    storage.catalog().record(version, lineage)
    return key, lineage, version


def acquire_in_step(
    context: dg.AssetExecutionContext,
    tile_year: TileYearConfig,
    s2: S2Source,
    storage: ZarrStorage,
    items: list[TileYear],
) -> None:
    """The run's frame stacks fetched in this process, a few tile-years at once."""
    cfg = tile_year.resolve()
    provider = s2.provider()
    fps = run_fingerprints(cfg, s2, "", None)
    one = functools.partial(acquire_one, context, cfg, provider, storage, fps)
    workers = max(1, min(s2.workers(), len(items)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key, lineage, version in pool.map(one, items):
            publish(context, summary(lineage, version), key, FRAMES)
            context.log.info(f"{key}: frames written to {version.url}")


# -- normalisation and embedding -------------------------------------------------------------------

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
    item: TileYear,
) -> Made:
    """One ``normalized_tensors`` partition: frames read, normalised, written; returns its
    lineage, the model input it stands for and where the frames hold data."""
    key, tile, year = item
    up, up_version = _upstream(src, tile, year)
    upstream = src.lineage(year, tile.id, up_version.id)
    values = up["frames"].values
    if values.shape[0] != cfg.n_frames:
        raise InputContractError(
            f"{stages.FRAMES.asset} {tile.id}|{year} has {values.shape[0]} frames but n_frames "
            f"is {cfg.n_frames}; re-materialise {stages.FRAMES.asset} with the current settings"
        )
    tensor, record = normalise_tile(values, cfg)
    lineage = _derived_lineage(
        context, stages.TENSORS.stage, tile, year, cfg, upstream, fingerprint, up_version
    )
    keep = storage.keep_tensors
    lineage["normalisation"] = {**record, "tensors_kept": keep}
    lineage["output"] = {"shape": list(tensor.shape), "dtype": "float32"}
    valid = valid_frames(values, cfg.fill_value)
    ds = normalized_dataset(tensor, cfg, keep_tensors=keep, valid=valid)
    version = storage.store(stages.TENSORS.asset).write(year, tile.id, ds, lineage)
    storage.catalog().record(version, lineage)
    publish(context, summary(lineage, version), key, NORMALIZED)
    return (key, tile, year, lineage, version), tensor, valid


def _stored_input(store: ZarrStore, frames: ZarrStore, item: TileYear) -> Made:
    """The model input of a ``normalized_tensors`` partition made by an earlier run."""
    key, tile, year = item
    ds, version = _upstream(store, tile, year)
    lineage = store.lineage(year, tile.id, version.id)
    recorded = lineage.get("inputs", {}).get(stages.FRAMES.asset, {}).get("version")
    x = model_input(
        ds,
        lambda: _upstream(frames, tile, year, recorded)[0],
        lineage,
        f"{tile.id}|{year}",
    )
    if "valid_frames" not in ds:
        raise InputContractError(
            f"{stages.TENSORS.asset} {tile.id}|{year} records no valid_frames (written by an "
            f"older release); re-materialise {stages.TENSORS.asset} for it"
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
    lineage = _derived_lineage(
        context, stages.GRID.stage, tile, year, cfg, upstream, fingerprint, source
    )
    lineage["embedding"] = record
    lineage["inputs"][stages.CHECKPOINT_ASSET] = {"sha256": resolved["sha256"]}
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
    version = storage.store(stages.GRID.asset).write(year, tile.id, ds, lineage)
    storage.catalog().record(version, lineage)
    meta = summary(lineage, version)
    meta["valid_fraction"] = ds.attrs["valid_fraction"]
    meta["chips_encoded"] = f"{ds.attrs['n_chips_encoded']} of {ds.attrs['n_chips']}"
    publish(context, meta, key, EMBEDDING)


def normalise_and_embed_items(
    context: Any,
    tile_year: TileYearConfig,
    s2: S2Source,
    model: AgriFMModel | None,
    storage: ZarrStorage,
    items: list[TileYear],
    selected: set[dg.AssetKey],
) -> None:
    """The tile-years' normalisation and/or embedding, written and recorded through
    ``context`` (the step's, or a task's :class:`~agrifm_pipeline.compute.TaskContext`).
    The model is this process's cached engine, loaded once per checkpoint sha256."""
    retain_freed_memory()  # a step's or a worker's process (see runtime)
    cfg = tile_year.resolve()
    frames = storage.store(stages.FRAMES.asset)
    tensors = storage.store(stages.TENSORS.asset)
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


# -- the files derived from a grid: chip tables and previews ---------------------------------------


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
    """The chip table as GeoParquet bytes, its lineage in the schema's metadata."""
    import pyarrow.parquet as pq  # lazy on purpose: only a chip-table step needs it

    buf = io.BytesIO()
    gdf.to_parquet(buf, index=False)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    meta = dict(table.schema.metadata or {})
    meta[b"agrifm_lineage"] = json.dumps(lineage, default=str).encode()
    out = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), out)
    return out.getvalue()


def chip_tables(
    context: dg.AssetExecutionContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.MaterializeResult:
    """Each tile-year's chip table (GeoParquet) from its current grid."""
    cfg = tile_year.resolve()
    src = storage.store(stages.GRID.asset)
    name = str(stages.CHIPS.file)
    items = tile_years(context, storage)
    for key, tile, year in items:
        ds, grid_version = _upstream(src, tile, year)
        lineage = _file_lineage(
            context, stages.CHIPS.asset, src.lineage(year, tile.id, grid_version.id), grid_version
        )
        gdf = chip_table(ds["embedding"], tile, year, cfg, coverage=ds.attrs)
        gdf["checkpoint_sha256"] = ds.attrs.get("checkpoint_sha256", "")
        version = storage.files(stages.CHIPS.asset).put(
            year, tile.id, name, _parquet_bytes(gdf, lineage), lineage
        )
        storage.catalog().record(version, lineage)
        meta = summary(lineage, version)
        meta["path"] = dg.MetadataValue.path(f"{version.url}/{name}")
        meta["n_chips"] = len(gdf)
        meta["chips_encoded"] = int(gdf["encoded"].sum())
        publish(context, meta, key)
    return dg.MaterializeResult(metadata={"partitions_in_run": len(items)})


def previews(context: dg.AssetExecutionContext, storage: ZarrStorage) -> dg.MaterializeResult:
    """Each tile-year's preview (PNG) from its current grid and frame stack."""
    grids, stacks = storage.store(stages.GRID.asset), storage.store(stages.FRAMES.asset)
    name = str(stages.PREVIEW.file)
    items = tile_years(context, storage)
    for key, tile, year in items:
        grid, grid_version = _upstream(grids, tile, year)
        rgb = ["B4", "B3", "B2"]
        stack, stack_version = _upstream(stacks, tile, year)
        png = preview_png(
            band_frames(stack["frames"], rgb),
            grid["embedding"].values,
            rgb,
            coverage=grid.attrs,
            nodata=stack["frames"].attrs.get("nodata", 0),
        )
        grid_lineage = grids.lineage(year, tile.id, grid_version.id)
        lineage = _file_lineage(
            context, stages.PREVIEW.asset, grid_lineage, grid_version, stack_version
        )
        version = storage.files(stages.PREVIEW.asset).put(year, tile.id, name, png, lineage)
        storage.catalog().record(version, lineage)
        b64 = base64.b64encode(png).decode()
        publish(
            context,
            {
                "path": dg.MetadataValue.path(f"{version.url}/{name}"),
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
            key,
        )
    return dg.MaterializeResult(metadata={"partitions_in_run": len(items)})


# -- the region mosaics ----------------------------------------------------------------------------


def region_mosaics(context: dg.AssetExecutionContext, storage: ZarrStorage) -> dg.MaterializeResult:
    """Each region-year's mosaic of its tiles' current grids (a group per UTM zone)."""
    return region_products(context, storage, stages.MOSAIC)


def _region_grids(
    storage: ZarrStorage, key: str
) -> tuple[str, int, list[Tile], dict[int, xr.Dataset], dict[str, Any]]:
    """A region-year's current tile grids merged per UTM zone (epsg -> mosaic dataset),
    and the lineage every region product of them records (the grid versions read)."""
    src = storage.store(stages.GRID.asset)
    region, year = split_key(key, REGION_DIM)
    tiles = [Tile.from_id(t) for t in storage.registry().tiles_of(region)]
    currents = {t.id: src.current(year, t.id) for t in tiles}
    missing = [t for t, v in currents.items() if v is None]
    if missing:
        raise InputContractError(
            f"region {region} {year}: no embedding grid yet for {len(missing)} of its "
            f"{len(tiles)} tiles ({', '.join(missing[:5])}{'…' if len(missing) > 5 else ''}); "
            f"backfill {stages.GRID.asset} for those tile-years first"
        )
    by_zone: dict[int, list[Tile]] = {}
    for t in tiles:
        by_zone.setdefault(t.epsg, []).append(t)
    zones: dict[int, xr.Dataset] = {}
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
        merged.attrs["checkpoint_sha256"] = ",".join(sorted(shas))
        zones[epsg] = merged
    first = next(iter(tile_lineage.values()), {})
    lineage = {
        "region": region,
        "year": year,
        "tile": region,
        "tiles": [t.id for t in tiles],
        "zones": sorted(by_zone),
        "checkpoint_sha256": sorted(shas),
        "cell_size_m": float(abs(next(iter(zones.values())).rio.transform().a)),
        "package_version": __version__,
        "created_at": _now(),
        # what every tile's grid shares (the frames, normalisation and model), from the first
        "settings": first.get("settings", {}),
        "embedding": first.get("embedding", {}) if len(shas) == 1 else {},
        "fingerprints_of_tiles": {
            t: lin.get("fingerprints", {}) for t, lin in tile_lineage.items()
        },
        "inputs": {stages.GRID.asset: {"versions": read}},
    }
    return region, year, tiles, zones, lineage


def region_products(
    context: dg.AssetExecutionContext, storage: ZarrStorage, row: stages.Stage
) -> dg.MaterializeResult:
    """Each region-year's ``row`` product (one of :data:`stages.REGION_PRODUCTS`) from its
    tiles' current grids: the float32 mosaic, the int8 mosaic (a group per UTM zone
    either way), or a COG per UTM zone."""
    keys = context.partition_keys
    for key in keys:
        region, year, tiles, zones, lineage = _region_grids(storage, key)
        lineage = {"asset": row.asset, **lineage, "run_id": context.run.run_id}
        one = len(zones) == 1
        if row.store == "files":
            files = {
                str(row.file).format(epsg=epsg): cog_bytes(
                    quantised_dataset(ds), {"asset": row.asset, "region": region, "year": year}
                )
                for epsg, ds in zones.items()
            }
            lineage["files"] = sorted(files)
            lineage["quantisation"] = cog_quantisation()
            lineage["dimensions"] = _dims(zones)
            version = storage.files(row.asset).put_objects(year, region, files, lineage)
            where = {"files": ", ".join(sorted(files))}
        else:
            made = {
                epsg: ds if row is stages.MOSAIC else quantised_dataset(ds)
                for epsg, ds in zones.items()
            }
            groups = {("" if one else f"utm_{epsg}"): ds for epsg, ds in made.items()}
            if row is not stages.MOSAIC:
                lineage["quantisation"] = _quantisation_record(next(iter(made.values())))
            lineage["dimensions"] = _dims(zones)
            version = storage.store(row.asset).write_groups(year, region, groups, lineage)
            where = {
                "gdal_path": f'ZARR:"{version.gdal_path}":/embedding'
                if one
                else f'ZARR:"{version.gdal_path}/utm_<epsg>":/embedding'
            }
        storage.catalog().record(version, lineage)
        context.add_asset_metadata(
            {
                "path": dg.MetadataValue.path(version.url),
                "version": version.id,
                "n_tiles": len(tiles),
                "zones": str(sorted(zones)),
                "checkpoint_sha256": ",".join(lineage["checkpoint_sha256"]),
                **where,
            },
            partition_key=key,
        )
    return dg.MaterializeResult(metadata={"partitions_in_run": len(keys)})


def _quantisation_record(ds: xr.Dataset) -> dict[str, Any]:
    """What an int8 product's lineage says of its codes (the scheme's own attributes)."""
    return {**{k: ds.attrs[k] for k in QUANT_ATTRS if k in ds.attrs}, "dtype": "int8"}


def _dims(zones: dict[int, xr.Dataset]) -> int:
    """The embedding dimension of a region's zone grids."""
    return int(next(iter(zones.values()))["embedding"].shape[0])


# -- the int8 tile grids ---------------------------------------------------------------------------


def int8_grids(context: dg.AssetExecutionContext, storage: ZarrStorage) -> dg.MaterializeResult:
    """Each tile-year's int8 grid (:func:`quantised_dataset`) from its current float32 grid."""
    src = storage.store(stages.GRID.asset)
    items = tile_years(context, storage)
    for key, tile, year in items:
        ds, grid_version = _upstream(src, tile, year)
        lineage = _file_lineage(
            context,
            stages.GRID_INT8.asset,
            src.lineage(year, tile.id, grid_version.id),
            grid_version,
        )
        q = quantised_dataset(ds)
        lineage["quantisation"] = _quantisation_record(q)
        lineage["output"] = {
            **lineage.get("output", {}),
            "shape": list(q["embedding"].shape),
            "dtype": "int8",
        }
        version = storage.store(stages.GRID_INT8.asset).write(year, tile.id, q, lineage)
        storage.catalog().record(version, lineage)
        meta = summary(lineage, version)
        meta["quantisation"] = str(q.attrs["quantisation"])
        publish(context, meta, key)
    return dg.MaterializeResult(metadata={"partitions_in_run": len(items)})


# -- the audit -------------------------------------------------------------------------------------


def audit_table(
    context: dg.AssetExecutionContext,
    tile_year: TileYearConfig,
    s2: S2Source,
    model: AgriFMModel,
    storage: ZarrStorage,
) -> dg.MaterializeResult:
    """Every stored partition judged against the current settings, as one table."""
    current, unknown, sha = current_fingerprints(tile_year, s2, model)
    scenes = source_scenes(s2, tile_year)
    rows = audit_rows(
        context.instance,
        stage_stores(storage),
        current,
        unknown=unknown,
        scenes=scenes.lister,
        not_judged=sha.removeprefix("unknown: ") if unknown else "",
    )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    disagreements = [r for r in rows if r.disagreement]
    return dg.MaterializeResult(
        metadata={
            "current_checkpoint_sha256": sha,
            "partitions": len(rows),
            **{f"n_{k.replace('-', '_')}": v for k, v in sorted(counts.items())},
            "n_disagreements": len(disagreements),
            "source_scenes": scenes.note().removeprefix("; ") or "compared with the source",
            "audit": dg.MetadataValue.md(markdown_table(rows)),
        }
    )


# -- maps on request: similarity and classes -------------------------------------------------------


def map_source(storage: ZarrStorage, product: str) -> Any:
    """The store of the region product a map reads (``product``: one of the region
    products' assets); a clear error naming them for any other."""
    names = [s.asset for s in stages.REGION_PRODUCTS]
    if product not in names:
        raise InputContractError(
            f"product {product!r} is not a region product; use one of {', '.join(names)}"
        )
    return storage.stage_store(product)


def _map_metadata(made: MapProduct, main: str, caption: str) -> dict[str, Any]:
    """What the UI shows of a map: its files, the embedding version, the PNG inline."""
    b64 = base64.b64encode(made.png).decode()
    emb = made.lineage["embedding"]
    return {
        "path": dg.MetadataValue.path(made.files[main]),
        "version": made.version.id,
        "files": dg.MetadataValue.json(made.files),
        "embedding_asset": emb["asset"],
        "embedding_version": emb["version"],
        "checkpoint_sha256": ",".join(emb["checkpoint_sha256"]),
        "map": dg.MetadataValue.md(f"{caption}\n\n![map](data:image/png;base64,{b64})"),
        "lineage": dg.MetadataValue.json(json.loads(json.dumps(made.lineage, default=str))),
    }


def similarity_maps(
    context: dg.AssetExecutionContext,
    storage: ZarrStorage,
    *,
    at: str,
    polygon: str,
    product: str,
    metric: str,
) -> dg.MaterializeResult:
    """Each region-year's similarity to the configured point or polygon."""
    query = parse_query(at, polygon)
    src, out = map_source(storage, product), storage.files(stages.SIMILARITY.asset)
    keys = context.partition_keys
    for key in keys:
        region, year = split_key(key, REGION_DIM)
        emb = load_embeddings(src, year, region)
        made = make_similarity(
            emb, query, out, metric=metric, catalog=storage.catalog(), run_id=context.run.run_id
        )
        meta = _map_metadata(
            made,
            str(stages.SIMILARITY.file),
            f"**{region} {year}** — {metric} cosine similarity to the {query.kind} "
            f"{query.text} (outlined red), from {emb.asset} {emb.version.id}",
        )
        meta.update({f"similarity_{k}": v for k, v in made.report.items() if v is not None})
        context.add_asset_metadata(meta, partition_key=key)
        context.log.info(f"{key}: similarity written to {made.version.url}")
    return dg.MaterializeResult(metadata={"partitions_in_run": len(keys)})


def class_maps(
    context: dg.AssetExecutionContext,
    storage: ZarrStorage,
    *,
    labels: str,
    label_property: str,
    group_by: str,
    model: str,
    k: int,
    folds: int,
    product: str,
) -> dg.MaterializeResult:
    """Each region-year's class map from the configured labels, cross-validated by field."""
    if not labels:
        raise InputContractError(
            "class_map needs config: labels (a GeoJSON of labelled polygons) and "
            "label_property (the property naming each polygon's class)"
        )
    read = read_labels(labels, label_property, group_by or None)
    src, out = map_source(storage, product), storage.files(stages.CLASSES.asset)
    keys = context.partition_keys
    for key in keys:
        region, year = split_key(key, REGION_DIM)
        emb = load_embeddings(src, year, region)
        made = make_class_map(
            emb, read, out, model=model, k=k, folds=folds, catalog=storage.catalog(),
            run_id=context.run.run_id,
        )  # fmt: skip
        rep = made.report
        rows = "\n".join(
            f"| {name} | {v['fields']} | {v['cells']} | "
            + (f"{v['accuracy']:.0%}" if v["accuracy"] is not None else "-")
            + " |"
            for name, v in rep["per_class"].items()
        )
        meta = _map_metadata(
            made,
            str(stages.CLASSES.file),
            f"**{region} {year}** — {model}; accuracy {rep['accuracy']:.1%} (balanced "
            f"{rep['balanced_accuracy']:.1%}, chance {rep['chance_balanced_accuracy']:.1%}), "
            f"{rep['folds']}-fold cross-validation holding out whole fields",
        )
        meta.update(
            {
                "accuracy": rep["accuracy"],
                "balanced_accuracy": rep["balanced_accuracy"],
                "chance_balanced_accuracy": rep["chance_balanced_accuracy"],
                "per_class": dg.MetadataValue.md(
                    "| class | fields | cells | accuracy |\n|---|---|---|---|\n" + rows
                ),
            }
        )
        context.add_asset_metadata(meta, partition_key=key)
        context.log.info(f"{key}: classes written to {made.version.url}")
    return dg.MaterializeResult(metadata={"partitions_in_run": len(keys)})
