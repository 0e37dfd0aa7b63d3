"""Judging what is stale, and why: the helpers of the stale sensor and the audit.

The current fingerprints (and whether the checkpoint can be judged at all), the
source's scenes to compare with the recorded ones, every stored asset's store (as
the stage table lists them), and those stores read through their indexes for one
sensor tick. The comparison itself is :mod:`agrifm_pipeline.audit`; the sensors
that act on it are :mod:`agrifm_pipeline.defs.sensors`, the ``lineage_audit`` asset
is with the other assets.
"""

from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from agrifm_pipeline import stages
from agrifm_pipeline.audit import SceneLister, current_checkpoint_sha
from agrifm_pipeline.checkpoint import resolve_checkpoint
from agrifm_pipeline.defs.partitions import recorded_versions, split_key
from agrifm_pipeline.defs.resources import (
    AgriFMModel,
    S2Source,
    TileYearConfig,
    ZarrStorage,
    run_fingerprints,
)
from agrifm_pipeline.errors import AgriFMError, CheckpointError
from agrifm_pipeline.lineage import Fingerprints, is_record
from agrifm_pipeline.model.checks import checkpoint_problem
from agrifm_pipeline.providers.base import BatchSceneIndexed, SceneIndexed
from agrifm_pipeline.scene_listing import CURSOR_KEY, BatchedListing, recorded_in
from agrifm_pipeline.settings import gee_list_per_tick, load_settings
from agrifm_pipeline.storage import IndexedReader
from agrifm_pipeline.tiles import Tile
from agrifm_pipeline.tileyear import scene_index


def stale_causes(state: Any, current: Fingerprints | None) -> frozenset[str]:
    """Why a tile-year's first stale stage is stale, as :data:`RERUN_CAUSES` (empty when only
    derived files are behind their grid, which is always re-made)."""
    stage = state.first_stale()
    if stage is None:
        return frozenset()
    st = state.stages[stage]
    if st.corrupt or not st.present or "missing" in " ".join(st.reasons):
        return frozenset({"repair"})
    causes: set[str] = set()
    if any(r.startswith("scene ") or r.endswith("scene change(s)") for r in st.reasons):
        causes.add("source")
    recorded = st.lineage.get("fingerprints", {}).get(stage, {}).get("inputs", {})
    now = current.for_stage(stage).inputs if current is not None else {}
    if is_record(st.lineage) or (
        current is not None and st.recorded == current.for_stage(stage).value
    ):
        # Its settings are those of now (a record is only kept whole where they differ).
        recorded = now
    for key in sorted((set(recorded) | set(now)) - {"upstream"}):
        if recorded.get(key, "<absent>") == now.get(key, "<absent>"):
            continue
        if key == "code_version":
            causes.add("code")
        elif stage == "acquisition":
            causes.add("source" if key == "provider" else "acquisition")
        elif stage == "embedding":
            causes.add("checkpoint" if key == "checkpoint_sha256" else "embedding")
        else:
            causes.add(stage)
    return frozenset(causes or {"repair"})


def checkpoint_state(model: AgriFMModel) -> tuple[str | None, str, str | None]:
    """(sha256, source, problem) of the checkpoint the model resource would load, found
    without downloading: sha256 None when it cannot be resolved (source then says
    why), problem set when it resolves but the encoder could not use it."""
    sha, source = current_checkpoint_sha(model.checkpoint)
    if sha is None:
        return None, source, None
    settings = load_settings()
    try:
        resolved = resolve_checkpoint(
            model.checkpoint or None, settings.replace(auto_download=False)
        )
    except CheckpointError as exc:  # changed in between: judged on the next tick
        return None, str(exc), None
    return sha, source, checkpoint_problem(resolved, settings)


def current_fingerprints(
    tile_year: TileYearConfig,
    s2: S2Source,
    model: AgriFMModel,
    checkpoint: tuple[str | None, str, str | None] | None = None,
) -> tuple[Fingerprints, tuple[str, ...], str]:
    """Fingerprints of the current settings; the embedding is unknown (not judged) when
    the checkpoint cannot be resolved without a download, or cannot be used.
    ``checkpoint``: :func:`checkpoint_state`'s answer, when the caller has it."""
    sha, source, problem = checkpoint or checkpoint_state(model)
    if problem is not None:
        sha, source = None, f"checkpoint {str(sha)[:12]}… is not usable: {problem}"
    fps = run_fingerprints(tile_year.resolve(), s2, sha or "", model)
    return fps, (() if sha else ("embedding",)), (sha or f"unknown: {source}")


@dataclass
class Scenes:
    """The source's scenes, listed per tile-year for one tick (or one audit)."""

    lister: SceneLister | None
    why_not: str = ""  # why the scenes are not compared at all
    failures: list[str] = field(default_factory=list)  # tile-years that could not be listed
    listing: BatchedListing | None = None  # a source listed ahead, in batches (Earth Engine)

    def prefetch(self, keys: Any, stores: dict[str, Any] | None = None) -> None:
        """List the tile-years ``keys`` ahead, many per request, where the source is listed
        in batches (for a sensor tick: its share, round the tile-years; ``stores`` give
        the scenes each recorded). Other sources are listed when asked."""
        if self.listing is not None:
            frames = stores.get(stages.FRAMES.asset) if stores is not None else None
            self.listing.prefetch(keys, recorded_in(frames) if frames is not None else None)

    def cursor(self) -> dict[str, Any]:
        """What the sensor's cursor keeps for the next tick's listing ({} if nothing)."""
        if self.listing is None or self.listing.per_tick is None:
            return {}
        return {CURSOR_KEY: self.listing.state()}

    def note(self) -> str:
        """What the skip message says about scenes that were not compared ("" if none)."""
        if self.why_not:
            return f"; source scenes not compared: {self.why_not}"
        text = self.listing.note() if self.listing is not None else ""
        if self.failures:
            text += (
                f"; source scenes not listed for {len(self.failures)} tile-year(s): "
                f"{self.failures[0]}"
            )
        return text


def source_scenes(
    s2: S2Source, tile_year: TileYearConfig, *, tick: dict[str, Any] | None = None
) -> Scenes:
    """A lister of each tile-year's current scenes from the source's headers (no pixels read,
    nothing acquired), compared with the scenes each partition recorded; or why not.

    Earth Engine is listed ahead in batches (:meth:`Scenes.prefetch`): everything for the
    audit; for a sensor tick (``tick``: the previous tick's cursor) its share only,
    ``AGRIFM_PIPELINE_GEE_LIST_PER_TICK`` tile-years round the materialised ones
    (:mod:`agrifm_pipeline.scene_listing`)."""
    try:
        cfg = tile_year.resolve()
        provider = s2.provider()
        per_tick = gee_list_per_tick() if tick is not None else None
    except AgriFMError as exc:
        return Scenes(None, f"the source cannot be opened: {exc}")
    if isinstance(provider, BatchSceneIndexed):
        out = Scenes(None)
        out.listing = BatchedListing(
            provider,
            cfg,
            per_tick=per_tick,
            state=(tick or {}).get(CURSOR_KEY),
            failures=out.failures,
        )
        out.lister = out.listing
        return out
    if not isinstance(provider, SceneIndexed):
        return Scenes(None, f"provider {provider.name} cannot list its scenes")
    out = Scenes(None)

    def lister(tile: str, year: int) -> dict[str, str] | None:
        try:
            return scene_index(provider, Tile.from_id(tile), year, cfg)
        except (AgriFMError, OSError) as exc:  # e.g. a file replaced while it was listed
            out.failures.append(f"{tile} {year}: {exc}")
            return None

    out.lister = lister
    return out


def stage_stores(storage: ZarrStorage) -> dict[str, Any]:
    """Every stored asset's store, by asset name, in the stage table's order: the three
    fingerprinted stages, the chip tables and previews (versioned files), and the region
    mosaics."""
    return {s.asset: storage.stage_store(s.asset) for s in stages.TABLE}


def materialised_since(
    instance: dg.DagsterInstance, asset: str, after: int | None
) -> tuple[dict[tuple[str, str], str | None], int | None]:
    """Tile-year partitions of ``asset`` materialised after event storage id ``after``
    (``(year, tile)`` -> the version the latest one names), and the newest storage id.
    With no ``after`` (a first look) nothing is fresh: the store's indexes are trusted."""
    key = dg.AssetKey(asset)
    if after is None:
        newest = instance.fetch_materializations(key, limit=1).records
        return {}, (newest[0].storage_id if newest else 0)
    fresh: dict[tuple[str, str], str | None] = {}
    cursor: str | None = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_storage_id=after),
            limit=1000,
            cursor=cursor,
            ascending=True,
        )
        for rec in page.records:
            after = max(after, rec.storage_id)
            mat = rec.asset_materialization
            if rec.partition_key is None or mat is None:
                continue
            try:
                tile, year = split_key(rec.partition_key)
            except ValueError:
                continue
            for t, version in recorded_versions(tile, mat.metadata).items():
                fresh[(str(year), t)] = version
        if not page.has_more:
            return fresh, after
        cursor = page.cursor


def judging_stores(
    stores: dict[str, Any], instance: dg.DagsterInstance, seen: dict[str, int]
) -> dict[str, Any]:
    """The tile-year stores read through their per-year indexes (one read per asset and
    year), the partitions materialised since the last tick (``seen``: asset -> the newest
    event storage id judged, updated here) checked against their pointers where the
    index names another version than Dagster recorded."""
    out = dict(stores)
    for asset in (s.asset for s in stages.TILE_YEAR):
        fresh, seen[asset] = materialised_since(instance, asset, seen.get(asset))  # type: ignore[assignment]
        out[asset] = IndexedReader(stores[asset], fresh)
    return out
