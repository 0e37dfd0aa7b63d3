"""The tile-year work of a step, as tasks for the compute engine.

Each task handles one tile-year on a dask worker: it reads its inputs from the
store, writes its partitions' versions itself (with the step bodies of
:mod:`agrifm_pipeline.defs.steps`), judges them with the asset checks, and returns
a small record (the partitions' metadata, the checks' evaluations, which worker
did it). The step in Dagster records what comes back (:func:`run_tasks`).

A task the scheduler runs again (its worker died) first looks for the versions
its run already committed and returns them instead of writing new ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dagster as dg

from agrifm_pipeline.compute import (
    Compute,
    TaskContext,
    acquisition_slot,
    committed_by_run,
    worker_identity,
)
from agrifm_pipeline.defs.checks import evaluate_partition
from agrifm_pipeline.defs.keys import EMBEDDING, FRAMES, NORMALIZED
from agrifm_pipeline.defs.resources import (
    AgriFMModel,
    S2Source,
    TileYearConfig,
    ZarrStorage,
    run_fingerprints,
)
from agrifm_pipeline.defs.steps import (
    TileYear,
    acquire_one,
    normalise_and_embed_items,
    publish,
    summary,
)
from agrifm_pipeline.settings import load_settings
from agrifm_pipeline.tiles import Tile


def _fields(resource: Any) -> dict[str, Any] | None:
    """A resource's configured values: what crosses to a worker (the resource object a
    step holds is bound to the run and does not pickle)."""
    if resource is None:
        return None
    return {name: getattr(resource, name) for name in type(resource).model_fields}


@dataclass(frozen=True)
class StepSpec:
    """What every task of one step needs (sent to the workers with each task, small)."""

    run_id: str
    tile_year_fields: dict[str, Any]
    s2_fields: dict[str, Any]
    storage_fields: dict[str, Any]
    model_fields: dict[str, Any] | None = None
    selected: tuple[str, ...] = ()
    acquisition_limit: int = 32

    @classmethod
    def of(
        cls,
        run_id: str,
        tile_year: TileYearConfig,
        s2: S2Source,
        storage: ZarrStorage,
        model: AgriFMModel | None = None,
        selected: tuple[str, ...] = (),
        acquisition_limit: int = 32,
    ) -> StepSpec:
        model_fields = _fields(model)
        if model_fields is not None and not model_fields.get("checkpoint"):
            # The workers use the checkpoint the step would (its RS_EMBED_AGRIFM_CKPT),
            # not whatever their own environment names; the lineage records its sha256.
            model_fields["checkpoint"] = load_settings().checkpoint
        return cls(
            run_id,
            _fields(tile_year) or {},
            _fields(s2) or {},
            _fields(storage) or {},
            model_fields,
            selected,
            acquisition_limit,
        )

    @property
    def tile_year(self) -> TileYearConfig:
        return TileYearConfig(**self.tile_year_fields)

    @property
    def s2(self) -> S2Source:
        return S2Source(**self.s2_fields)

    @property
    def storage(self) -> ZarrStorage:
        return ZarrStorage(**self.storage_fields)

    @property
    def model(self) -> AgriFMModel | None:
        return None if self.model_fields is None else AgriFMModel(**self.model_fields)


@dataclass
class TaskRecord:
    """What a task returns: per-partition metadata and check evaluations, and its worker."""

    key: str
    metadata: list[tuple[dg.AssetKey, str, dict[str, Any]]]
    checks: list[dg.AssetCheckEvaluation]
    worker: dict[str, Any]
    reused: bool = False  # the run had committed it already (the task ran again)


def task_key(stage: str, run_id: str, partition: str) -> str:
    return f"agrifm-{stage}-{run_id}-{partition}"


def run_tasks(
    context: dg.AssetExecutionContext,
    compute: Compute,
    fn: Any,
    stage: str,
    items: list[TileYear],
    spec: StepSpec,
    *,
    gpu: bool = False,
) -> list[dg.AssetCheckEvaluation]:
    """The step's tile-years as tasks on the cluster; what each returns is recorded here,
    but for the check evaluations, returned to be recorded after the step's results."""
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
            publish(context, meta, key, asset)
        checks += rec.checks
        w = rec.worker
        again = " (committed before its worker died; reused)" if rec.reused else ""
        context.log.info(f"{rec.key}: {stage} on {w['worker']} (pid {w['pid']}){again}")
    return checks


def _reused(
    spec: StepSpec, key: str, tile: str, year: int, assets: list[dg.AssetKey]
) -> TaskRecord | None:
    """The record of a tile-year whose every asset this run already committed."""
    ctx = TaskContext(spec.run_id, assets[0])
    checks: list[dg.AssetCheckEvaluation] = []
    for asset in assets:
        store = spec.storage.store(asset.path[-1])
        version = committed_by_run(store, year, tile, spec.run_id)
        if version is None:
            return None
        ctx.add_asset_metadata(summary(store.lineage(year, tile, version.id), version), key, asset)
        checks += evaluate_partition(asset, store, key, spec.tile_year)
    return TaskRecord(key, ctx.metadata, checks, worker_identity(), reused=True)


def acquire(item: tuple[str, str, int], spec: StepSpec) -> TaskRecord:
    """One ``s2_frame_stack`` partition: fetched, written, checked."""
    key, tile_id, year = item
    done = _reused(spec, key, tile_id, year, [FRAMES])
    if done is not None:
        return done
    cfg = spec.tile_year.resolve()
    ctx = TaskContext(spec.run_id, FRAMES)
    fps = run_fingerprints(cfg, spec.s2, "", None)
    with acquisition_slot(spec.acquisition_limit):
        _, lineage, version = acquire_one(
            ctx, cfg, spec.s2.provider(), spec.storage, fps, (key, Tile.from_id(tile_id), year)
        )
    ctx.add_asset_metadata(summary(lineage, version), key, FRAMES)
    checks = evaluate_partition(FRAMES, spec.storage.store(FRAMES.path[-1]), key, spec.tile_year)
    return TaskRecord(key, ctx.metadata, checks, worker_identity())


def normalise_and_embed(item: tuple[str, str, int], spec: StepSpec) -> TaskRecord:
    """One tile-year's ``normalized_tensors`` and/or ``agrifm_embedding_grid``: the model
    is the worker process's own (loaded once per checkpoint sha256 and kept)."""
    key, tile_id, year = item
    assets = [a for a in (NORMALIZED, EMBEDDING) if a.to_user_string() in spec.selected]
    done = _reused(spec, key, tile_id, year, assets)
    if done is not None:
        return done
    ctx = TaskContext(spec.run_id, assets[0])
    assert spec.model is not None or EMBEDDING not in assets
    normalise_and_embed_items(
        ctx,
        spec.tile_year,
        spec.s2,
        spec.model,
        spec.storage,
        [(key, Tile.from_id(tile_id), year)],
        set(assets),
    )
    checks: list[dg.AssetCheckEvaluation] = []
    for asset in assets:
        checks += evaluate_partition(asset, spec.storage.store(asset.path[-1]), key, spec.tile_year)
    return TaskRecord(key, ctx.metadata, checks, worker_identity())
