"""Change that re-runs exactly what it invalidates: the checkpoint watch, the stale sensor, the audit asset."""

import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from agrifm_pipeline.audit import (
    DERIVED,
    ORDER,
    SceneLister,
    current_checkpoint_sha,
    markdown_table,
    tile_year_state,
)
from agrifm_pipeline.checkpoint import checkpoint_problem, resolve_checkpoint
from agrifm_pipeline.defs.assets import GROUP, PREVIOUS_CHECKPOINT_TAG, tile_year_assets
from agrifm_pipeline.defs.audit import audit_rows
from agrifm_pipeline.defs.partitions import MAX_PARTITIONS_PER_RUN, split_key, tiles_partitions
from agrifm_pipeline.defs.requests import range_run_request, tile_rectangles
from agrifm_pipeline.defs.resources import (
    AgriFMModel,
    S2Source,
    TileYearConfig,
    ZarrStorage,
    run_fingerprints,
)
from agrifm_pipeline.errors import AgriFMError, CheckpointError
from agrifm_pipeline.lineage import Fingerprints, is_record
from agrifm_pipeline.providers.base import BatchSceneIndexed, SceneIndexed
from agrifm_pipeline.scene_listing import CURSOR_KEY, BatchedListing, recorded_in
from agrifm_pipeline.settings import gee_list_per_tick, load_settings
from agrifm_pipeline.storage import IndexedReader
from agrifm_pipeline.tiles import Tile
from agrifm_pipeline.tileyear import scene_index

REQUEST_TAG = "agrifm/stale_request"
# A request whose run has not appeared after this long is forgotten (and re-requested if still stale).
PENDING_GRACE_S = 900
IN_PROGRESS = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}


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
            frames = stores.get(ORDER[0]) if stores is not None else None
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
    """Every stored asset's store, by asset name: the three fingerprinted stages, the chip
    tables and previews (versioned files), and the region mosaics."""
    return {
        **{a: storage.store(a) for a in ORDER[:3]},
        **{a: storage.files(a) for a in DERIVED},
        "region_mosaic": storage.store("region_mosaic"),
    }


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
            version = mat.metadata.get("version")
            fresh[(str(year), tile)] = str(version.value) if version is not None else None
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
    for asset in ORDER:
        fresh, seen[asset] = materialised_since(instance, asset, seen.get(asset))  # type: ignore[assignment]
        out[asset] = IndexedReader(stores[asset], fresh)
    return out


@dataclass
class InFlight:
    """The sensor's requests still queued or running, what they cover, and what was let go."""

    requests: dict[str, Any]  # request id -> {assets, year, tiles, t}: kept in the cursor
    covered: set[tuple[str, str, int]]  # (asset, tile, year) being re-made now
    runs: list[str]  # "<run id> <STATUS> since <time>" of each live run, oldest first
    released: list[str]  # why each request was let go this tick
    retried: dict[tuple[str, int], str] = field(default_factory=dict)  # (tile, year) -> run


def _in_flight(instance: dg.DagsterInstance, cursor: dict[str, Any]) -> InFlight:
    """Look up the run of every request the cursor remembers.

    A request whose runs all ended (success, failure, cancellation, or marked failed
    from outside, as run monitoring does when a run's process dies) is let go: what
    it covered is judged again on this tick, and requested again if still stale. A
    request whose run has not appeared is kept for :data:`PENDING_GRACE_S`.
    """
    out = InFlight({}, set(), [], [])
    now = time.time()
    live: list[tuple[float, str]] = []
    for req_id, req in cursor.get("inflight", {}).items():
        runs = instance.get_runs(dg.RunsFilter(tags={REQUEST_TAG: req_id}))
        if runs:
            running = [r for r in runs if r.status in IN_PROGRESS]
            alive = bool(running)
            if not alive:
                ended = ", ".join(f"{r.run_id[:8]} {r.status.value}" for r in runs)
                n = len(req["tiles"])
                out.released.append(f"run {ended}: {n} tile-year(s) of {req['year']} released")
                out.retried.update(((t, req["year"]), ended) for t in req["tiles"])
            for r in running:
                record = instance.get_run_record_by_id(r.run_id)
                since = record.create_timestamp.timestamp() if record else req["t"]
                live.append((since, f"{r.run_id[:8]} {r.status.value} since {_hhmm(since)}"))
        else:
            alive = now - req["t"] < PENDING_GRACE_S
            if alive:
                live.append((req["t"], f"request {req_id[:8]} not started yet"))
        if alive:
            out.requests[req_id] = req
            out.covered.update((a, t, req["year"]) for a in req["assets"] for t in req["tiles"])
    out.runs = [text for _, text in sorted(live)]
    return out


def _hhmm(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _counts_message(counts: dict[str, int], flight: InFlight) -> str:
    """What a tick that requests nothing found, each kind of tile-year counted apart."""
    if counts["stale_in_flight"] == counts["waiting"] == counts["not_judged"] == 0 and not (
        counts.get("held")
    ):
        return f"every materialised tile-year is current ({counts['current']})"
    parts = [f"{counts['current']} current"]
    if counts["stale_in_flight"]:
        runs = flight.runs
        shown = "; ".join(runs[:3]) + (f"; … {len(runs) - 3} more" if len(runs) > 3 else "")
        parts.append(
            f"{counts['stale_in_flight']} stale and already requested "
            f"({len(runs)} run(s) queued or running: {shown})"
        )
    if counts["waiting"]:
        parts.append(f"{counts['waiting']} stale, waiting for a usable checkpoint")
    if counts["not_judged"]:
        parts.append(f"{counts['not_judged']} not judged")
    if counts.get("held"):
        parts.append(f"{counts['held']} stale, held (cause not in rerun_on)")
    return "nothing requested: tile-years: " + ", ".join(parts)


@dg.sensor(
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    target=dg.AssetSelection.assets(*tile_year_assets),
    description=(
        "Compares every materialised tile-year's recorded stage fingerprints with the current "
        "settings and checkpoint, and requests exactly the stale assets of exactly the stale "
        "partitions, batched many tile-years per run. Work already queued or running is not "
        "requested again; failed work is, on a later tick."
    ),
)
def stale_partitions_sensor(
    context: dg.SensorEvaluationContext,
    tile_year: TileYearConfig,
    s2: S2Source,
    model: AgriFMModel,
    storage: ZarrStorage,
) -> dg.SensorResult | dg.SkipReason:
    instance = context.instance
    cursor = json.loads(context.cursor) if context.cursor else {}
    flight = _in_flight(instance, cursor)
    inflight, covered = flight.requests, flight.covered
    for note in flight.released:
        context.log.info(f"{note}; judged again on this tick")
    ckpt = checkpoint_state(model)
    current, unknown, sha = current_fingerprints(tile_year, s2, model, ckpt)
    not_judged = ""
    if unknown:
        not_judged = f"; embeddings not judged: {sha.removeprefix('unknown: ')}"
        context.log.warning(f"embeddings not judged: {sha.removeprefix('unknown: ')}")
    unusable = ckpt[2] is not None  # a run could not load it: request nothing that needs it
    scenes = source_scenes(s2, tile_year, tick=cursor)
    seen = dict(cursor.get("seen", {}))
    stores = judging_stores(stage_stores(storage), instance, seen)
    materialised: dict[str, set[tuple[str, int]]] = {}
    for asset in ORDER:
        materialised[asset] = {
            split_key(pk) for pk in instance.get_materialized_partitions(dg.AssetKey(asset))
        }
    candidates = set().union(*materialised.values())
    scenes.prefetch(candidates, stores)  # Earth Engine: this tick's share, batched
    groups: dict[tuple[tuple[str, ...], int], list[str]] = {}
    reasons: dict[str, set[str]] = {}
    counts = {"current": 0, "stale_in_flight": 0, "waiting": 0, "not_judged": 0, "held": 0}
    rerun_on = tile_year.rerun_causes()
    held_why: dict[str, list[str]] = {}
    for tile, year in sorted(candidates):
        state = tile_year_state(stores, tile, year, current, unknown=unknown, scenes=scenes.lister)
        # Recorded by Dagster, gone from the store.
        for st in [*state.stages.values(), *state.derived.values()]:
            if not st.present and (tile, year) in materialised[st.asset]:
                st.present, st.reasons = True, [f"{st.asset} partition missing from the store"]
        stale = state.stale_assets()
        if not stale:
            counts["not_judged" if unknown else "current"] += 1
            continue
        # Only assets this partition has (the stale stage itself always).
        selection = tuple(
            a for i, a in enumerate(stale) if i == 0 or (tile, year) in materialised[a]
        )
        if unusable and "agrifm_embedding_grid" in selection:
            selection = tuple(a for a in selection if a in ORDER[:2])
            if not selection:
                counts["waiting"] += 1
                continue
        held = stale_causes(state, current) - rerun_on
        if held:  # a cause not re-run automatically (a changed source, by default)
            counts["held"] += 1
            held_why.setdefault(", ".join(sorted(held)), []).append(f"{tile}|{year}")
            continue
        if any((a, tile, year) in covered for a in selection):
            counts["stale_in_flight"] += 1
            continue  # being re-made right now
        groups.setdefault((selection, year), []).append(tile)
        reasons.setdefault(selection[0], set()).update(state.why())
    if scenes.failures:
        context.log.warning(scenes.note().removeprefix("; "))
    for causes, keys in sorted(held_why.items()):
        held_msg = (
            f"{len(keys)} stale tile-year(s) held, not re-run automatically: {causes} "
            f"not in rerun_on ({', '.join(keys[:3])}{'…' if len(keys) > 3 else ''}; see "
            "`agrifm-pipeline audit`; backfill them, or add the cause to rerun_on)"
        )
        context.log.warning(held_msg)
        not_judged += f"; {held_msg}"
    if not groups:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(_counts_message(counts, flight) + not_judged + scenes.note()),
            cursor=json.dumps({"inflight": inflight, "seen": seen, **scenes.cursor()}),
        )
    order = instance.get_dynamic_partitions(tiles_partitions.name or "tiles")
    requests: list[dg.RunRequest] = []
    for (selection, year), tiles in sorted(groups.items()):
        why = "; ".join(sorted(reasons.get(selection[0], set())))[:180]
        for _, block in tile_rectangles(order, [(t, year) for t in tiles], MAX_PARTITIONS_PER_RUN):
            req_id = uuid.uuid4().hex[:16]
            ended = sorted(
                {flight.retried[(t, year)] for t in block if (t, year) in flight.retried}
            )
            again = f" (again after run {', '.join(ended)})" if ended else ""
            inflight[req_id] = {
                "assets": list(selection),
                "year": year,
                "tiles": list(block),
                "t": time.time(),
            }
            requests.append(
                range_run_request(
                    year,
                    block,
                    asset_selection=[dg.AssetKey(a) for a in selection],
                    reason=f"stale {selection[0]}{again}: {why}",
                    tags={REQUEST_TAG: req_id},
                )
            )
            context.log.info(
                f"stale: {', '.join(selection)} for {len(block)} tile(s) of {year} ({why})"
            )
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps({"inflight": inflight, "seen": seen, **scenes.cursor()}),
    )


CHECKPOINT = dg.AssetKey("agrifm_checkpoint")


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[CHECKPOINT],
    description=(
        "Watches the checkpoint the model resource loads (same path, new content included) and "
        "requests an observation of agrifm_checkpoint whenever its sha256 changes to a usable file."
    ),
)
def checkpoint_sensor(
    context: dg.SensorEvaluationContext, model: AgriFMModel
) -> dg.SensorResult | dg.SkipReason:
    # Cursor: the recorded sha256; or, while the file is unusable, a JSON object with the
    # rejected sha256, its reason and the recorded one (so each change is reported once).
    cursor = context.cursor or ""
    rejected = json.loads(cursor) if cursor.startswith("{") else {}
    recorded = rejected.get("recorded", "") if rejected else cursor
    sha, source, problem = checkpoint_state(model)
    if sha is None:
        return dg.SkipReason(f"checkpoint not available without a download: {source}")
    if sha == rejected.get("sha256"):
        return dg.SkipReason(
            f"checkpoint {sha[:12]}… is still not usable, nothing recorded or requested "
            f"(reported when it appeared): {rejected.get('reason', '')}"
        )
    if problem is not None:
        context.log.error(
            f"checkpoint {sha[:12]}… ({source}) is not usable; not recorded, nothing "
            f"requested: {problem}"
        )
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"checkpoint {sha[:12]}… is not usable: {problem}"),
            cursor=json.dumps({"sha256": sha, "reason": problem, "recorded": recorded}),
        )
    if sha == recorded:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"checkpoint unchanged ({sha[:12]}…)"), cursor=sha
        )
    # Observed by the source asset's own function, in a run: Dagster records the data version.
    observe = dg.RunRequest(
        run_key=f"checkpoint:{sha}:{recorded}",
        asset_selection=[CHECKPOINT],
        tags={PREVIOUS_CHECKPOINT_TAG: recorded, "agrifm/reason": f"checkpoint now {sha[:12]}…"},
    )
    return dg.SensorResult(run_requests=[observe], cursor=sha)


@dg.asset(
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


all_staleness_sensors = [stale_partitions_sensor, checkpoint_sensor]
