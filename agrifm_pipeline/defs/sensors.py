"""Sensors: every sensor of the pipeline.

* ``region_files_sensor``: region files -> tile and region partitions;
* ``region_mosaic_sensor``: a region's mosaic once all its tiles have grids, and again
  whenever one of those grids is re-made;
* ``stale_partitions_sensor``: exactly the stale assets of exactly the stale tile-years,
  judged with :mod:`agrifm_pipeline.defs.staleness`, batched many per run;
* ``checkpoint_sensor``: an observation of the checkpoint whenever its sha256 changes;
* ``map_remake_sensor``: a map (similarity, classes) again, with the config its lineage
  recorded, once the region product it read has a newer current version.
"""

import bisect
import datetime as dt
import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from agrifm_pipeline import stages
from agrifm_pipeline.audit import tile_year_state
from agrifm_pipeline.defs.assets import PREVIOUS_CHECKPOINT_TAG, tile_year_assets
from agrifm_pipeline.defs.keys import CHECKPOINT, MOSAIC, MOSAIC_COG, MOSAIC_INT8, key_of
from agrifm_pipeline.defs.partitions import (
    MAX_PARTITIONS_PER_RUN,
    TILES_TAG,
    TileUnits,
    region_year_key,
    regions_partitions,
    split_key,
    tiles_partitions,
    year_keys,
)
from agrifm_pipeline.defs.requests import range_run_request, tile_rectangles
from agrifm_pipeline.defs.resources import AgriFMModel, S2Source, TileYearConfig, ZarrStorage
from agrifm_pipeline.defs.staleness import (
    checkpoint_state,
    current_fingerprints,
    judging_stores,
    source_scenes,
    stage_stores,
    stale_causes,
)
from agrifm_pipeline.mapping.products import replay_config
from agrifm_pipeline.registry import RegionChange
from agrifm_pipeline.storage import MAX_INDEX_SHARDS, IndexedReader, index_shard, shard_key
from agrifm_pipeline.tiles import is_block_id

# -- region files and mosaics ----------------------------------------------------------------------


# A region past this many tiles as tile partitions strains Dagster (docs/scaling.md).
BLOCKS_ADVISED_ABOVE = 10_000


def register_regions(
    instance: dg.DagsterInstance, tile_year: TileYearConfig, storage: ZarrStorage
) -> tuple[list[RegionChange], list[str], list[str]]:
    """Scan the regions directory; return (changes, new tiles-dimension keys (tiles or
    blocks), new region keys).

    Shared by the sensor and the demo command. Nothing is ever deleted: a
    removed region is marked ``removed`` and its tiles stay partitions.
    """
    changes = storage.registry().scan(
        storage.regions_dir,
        chip_px=tile_year.chip_px,
        chips_per_side=tile_year.chips_per_side,
        scale_m=tile_year.scale_m,
    )
    registry = storage.registry()
    known_tiles = instance.get_dynamic_partitions(tiles_partitions.name or "tiles")
    known_regions = set(instance.get_dynamic_partitions(regions_partitions.name or "regions"))
    # Everything registered but not yet a partition (also heals a tick that died
    # after updating the registry and before its partition requests landed): a tile, or
    # its block with block_side > 1, unless a known key already holds it.
    new_tiles = TileUnits(registry.owners(), known_tiles).new_keys(tile_year.block_side)
    new_regions = sorted(set(registry.active_regions()) - known_regions)
    return changes, new_tiles, new_regions


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers region files under the regions directory as tile and region partitions.",
)
def region_files_sensor(
    context: dg.SensorEvaluationContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.SensorResult | dg.SkipReason:
    changes, new_tiles, new_regions = register_regions(context.instance, tile_year, storage)
    if not (changes or new_tiles or new_regions):
        return dg.SkipReason(f"no new or changed region files in {storage.regions_dir}")
    for ch in changes:
        if ch.status == "error":
            context.log.error(f"region {ch.region}: {ch.message}")
        else:
            context.log.info(f"region {ch.region} {ch.status}: {len(ch.tiles)} tiles")
            if tile_year.block_side == 1 and len(ch.tiles) > BLOCKS_ADVISED_ABOVE:
                context.log.warning(
                    f"region {ch.region} has {len(ch.tiles):,} tiles, each a partition per "
                    f"year; past ~{BLOCKS_ADVISED_ABOVE:,} tiles set AGRIFM_PIPELINE_BLOCK_SIDE"
                    "=8 (64-tile blocks) before registering it (docs/scaling.md)"
                )
    requests = []
    if new_tiles:
        requests.append(tiles_partitions.build_add_request(new_tiles))
    if new_regions:
        requests.append(regions_partitions.build_add_request(new_regions))
    # No cursor: the registry document is the state (what each file's sha256 was).
    return dg.SensorResult(dynamic_partitions_requests=requests)


def mosaic_inputs(grids: Any, tiles: list[str], year: int) -> dict[str, str] | None:
    """tile -> its current grid version; None while any tile lacks a grid."""
    out = {}
    for t in tiles:
        v = grids.current(year, t)
        if v is None:
            return None
        out[t] = v.id
    return out


@dg.sensor(
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[MOSAIC, MOSAIC_INT8, MOSAIC_COG],
    description=(
        "Requests a region's mosaic for a year once all its tiles have grids, and again "
        "whenever one of those grids is re-made: each product storage.mosaic_products names "
        "(float32, int8, COG) that was not made from the current grids."
    ),
)
def region_mosaic_sensor(
    context: dg.SensorEvaluationContext, storage: ZarrStorage
) -> dg.SensorResult | dg.SkipReason:
    # All read through their per-year indexes: one read per year, not one per tile.
    products = {
        row: IndexedReader(storage.stage_store(row.asset)) for row in storage.region_products()
    }
    grids = IndexedReader(storage.store(stages.GRID.asset))
    known = set(context.instance.get_dynamic_partitions(regions_partitions.name or "regions"))
    requests = []
    for region, entry in sorted(storage.registry().active_regions().items()):
        if region not in known:
            continue
        for year in map(int, year_keys()):
            inputs = mosaic_inputs(grids, entry["tiles"], year)
            if inputs is None:
                continue
            stale = []
            for row, reader in products.items():
                made = None
                v = reader.current(year, region)
                if v is not None:
                    read = reader.judged_lineage(v).get("inputs", {})
                    made = read.get(stages.GRID.asset, {}).get("versions")
                if made != inputs:
                    stale.append(row)
            if not stale:
                continue
            stamp = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
            which = "" if stale == [stages.MOSAIC] else ":" + ",".join(r.stage for r in stale)
            requests.append(
                dg.RunRequest(
                    run_key=f"mosaic:{region}:{year}:{stamp}{which}",
                    asset_selection=[key_of(r) for r in stale],
                    partition_key=str(region_year_key(region, year)),
                )
            )
    if not requests:
        return dg.SkipReason("every region mosaic is up to date with its tiles' grids")
    return dg.SensorResult(run_requests=requests)


# -- the stale sensor ------------------------------------------------------------------------------

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
# Without a usable checkpoint the stale sensor still re-makes the stages above the grid.
WITHOUT_CHECKPOINT = tuple(s.asset for s in stages.TILE_YEAR[: stages.TILE_YEAR.index(stages.GRID)])


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


# Tile-years judged per tick at most: a tick judges about 1 ms of Python per tile-year
# (fingerprints, the source's scenes), and must stay well within Dagster's 60 s. Above it
# the tick judges a window of the materialised tile-years (year, then tile order) and the
# next tick goes on after it, round and round (the cursor keeps where): a continent-year
# (125,000 tile-years) is judged whole every 13 ticks, and what one tick requests is
# bounded by the window (JUDGE_PER_TICK / MAX_PARTITIONS_PER_RUN runs at most).
JUDGE_PER_TICK = 10_000
SWEEP_KEY = "sweep"


def judging_window(
    candidates: set[tuple[str, int]], after: list[Any] | None, limit: int | None = None
) -> tuple[list[tuple[str, int]], dict[str, Any], str]:
    """The tile-years this tick judges: every one while there are at most ``limit`` (in
    (year, tile) order); else ``limit`` of them in (year, index shard, tile) order (see
    :func:`_by_shard`) starting after ``after`` (the last one the previous tick judged,
    ``[year, tile]``), wrapping round. Returns them, what the
    cursor keeps ({} without a sweep) and what the tick's message adds ("" without)."""
    limit = JUDGE_PER_TICK if limit is None else limit
    if len(candidates) <= limit:
        return sorted(candidates, key=_by_year), {}, ""
    ordered = sorted(candidates, key=_by_shard)
    start = 0
    if after:
        start = bisect.bisect_right(
            ordered, _by_shard((str(after[1]), int(after[0]))), key=_by_shard
        )
    window = (ordered[start:] + ordered[:start])[:limit]
    last = window[-1]
    ticks = -(-len(ordered) // limit)
    note = (
        f"; judged {len(window)} of {len(ordered)} materialised tile-years this tick "
        f"({window[0][1]} {window[0][0]} to {last[1]} {last[0]}; every one is judged once "
        f"every {ticks} ticks)"
    )
    return window, {SWEEP_KEY: [last[1], last[0]]}, note


def _by_year(key: tuple[str, int]) -> tuple[int, str]:
    return key[1], key[0]


def _by_shard(key: tuple[str, int]) -> tuple[int, int, str, str]:
    """(year, index shard, 8 x 8 block, tile): a window of consecutive tile-years in this
    order falls in few shards of each year's index (a shard under N is its shard under
    1024, modulo N) and holds whole blocks (a block's tiles share a shard), so a tick reads
    those shards, not the whole index, and requests a block's stale tiles in one run."""
    return key[1], index_shard(key[0], MAX_INDEX_SHARDS), shard_key(key[0]), key[0]


def _run_batches(
    units: TileUnits, order: Sequence[str], tiles: list[str], year: int
) -> list[tuple[str | None, list[str]]]:
    """Stale ``tiles`` of ``year`` as runs: (None, consecutive tile partitions, at most
    MAX_PARTITIONS_PER_RUN) where tiles are partitions; (block, its stale tiles) where a
    block is, one block-year a run, the run doing only those tiles."""
    plain: list[str] = []
    by_block: dict[str, list[str]] = {}
    for t in tiles:
        unit = units.unit(t)
        if unit is None or unit == t:
            plain.append(t)
        else:
            by_block.setdefault(unit, []).append(t)
    out: list[tuple[str | None, list[str]]] = [
        (None, run)
        for _, run in tile_rectangles(order, [(t, year) for t in plain], MAX_PARTITIONS_PER_RUN)
    ]
    out += [(b, sorted(ts)) for b, ts in sorted(by_block.items())]
    return out


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
    order = instance.get_dynamic_partitions(tiles_partitions.name or "tiles")
    units = TileUnits(storage.registry().owners() if any(map(is_block_id, order)) else (), order)
    materialised: dict[str, set[tuple[str, int]]] = {}
    for asset in (s.asset for s in stages.TILE_YEAR):
        made = (split_key(pk) for pk in instance.get_materialized_partitions(dg.AssetKey(asset)))
        # A block materialised stands for each of its registered tiles.
        materialised[asset] = {(t, y) for unit, y in made for t in units.tiles(unit)}
    candidates = set().union(*materialised.values())
    scenes.prefetch(candidates, stores)  # Earth Engine: this tick's share, batched
    groups: dict[tuple[tuple[str, ...], int], list[str]] = {}
    reasons: dict[str, set[str]] = {}
    counts = {"current": 0, "stale_in_flight": 0, "waiting": 0, "not_judged": 0, "held": 0}
    rerun_on = tile_year.rerun_causes()
    held_why: dict[str, list[str]] = {}
    judged, sweep, sweep_note = judging_window(candidates, cursor.get(SWEEP_KEY))
    by_year: dict[int, list[str]] = {}
    for tile, year in judged:
        by_year.setdefault(year, []).append(tile)
    for asset in (s.asset for s in stages.TILE_YEAR):  # the window's index shards, batched
        for year, tiles in by_year.items():
            stores[asset].load(year, tiles)
    for tile, year in judged:
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
        if unusable and stages.GRID.asset in selection:
            selection = tuple(a for a in selection if a in WITHOUT_CHECKPOINT)
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
            skip_reason=dg.SkipReason(
                _counts_message(counts, flight) + sweep_note + not_judged + scenes.note()
            ),
            cursor=json.dumps({"inflight": inflight, "seen": seen, **sweep, **scenes.cursor()}),
        )
    requests: list[dg.RunRequest] = []
    for (selection, year), tiles in sorted(groups.items()):
        why = "; ".join(sorted(reasons.get(selection[0], set())))[:180]
        for unit, block in _run_batches(units, order, tiles, year):
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
            tags = {REQUEST_TAG: req_id}
            if unit is not None:  # a block partition: only these of its tiles
                tags[TILES_TAG] = ",".join(block)
            requests.append(
                range_run_request(
                    year,
                    block if unit is None else [unit],
                    asset_selection=[dg.AssetKey(a) for a in selection],
                    reason=f"stale {selection[0]}{again}: {why}",
                    tags=tags,
                    n_tile_years=len(block),
                )
            )
            context.log.info(
                f"stale: {', '.join(selection)} for {len(block)} tile(s) of {year} ({why})"
            )
    if sweep_note:
        context.log.info(sweep_note.removeprefix("; "))
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps({"inflight": inflight, "seen": seen, **sweep, **scenes.cursor()}),
    )


# -- the checkpoint --------------------------------------------------------------------------------


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


# -- maps made from a product -----------------------------------------------------------------------

REGION_PRODUCT_ASSETS = frozenset(s.asset for s in stages.REGION_PRODUCTS)


@dg.sensor(
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[key_of(s) for s in stages.MAPS],
    description=(
        "Requests a region-year's similarity or class map again, with the config its lineage "
        "recorded (query, or labels and classifier, and the product read), once the region "
        "product it was made from has a newer current version; a map whose config cannot be "
        "replayed (its labels file gone or changed) is reported, not requested."
    ),
)
def map_remake_sensor(
    context: dg.SensorEvaluationContext, storage: ZarrStorage
) -> dg.SensorResult | dg.SkipReason:
    known = set(context.instance.get_dynamic_partitions(regions_partitions.name or "regions"))
    # Cursor: the un-replayable maps already reported (one line each, not one per tick).
    reported = set(json.loads(context.cursor)) if context.cursor else set()
    still: set[str] = set()
    products: dict[str, IndexedReader] = {}
    requests = []
    for row in stages.MAPS:
        files = storage.stage_store(row.asset)
        maps = IndexedReader(files)
        for ref in maps.partitions():
            region, year = ref.tile, int(ref.year)
            v = maps.current(year, region)
            if region not in known or v is None:
                continue  # a tile's map (made by the CLI) is no Dagster partition
            inputs = maps.judged_lineage(v).get("inputs", {})
            read = [(a, r["version"]) for a, r in inputs.items() if "version" in r]
            if len(read) != 1 or read[0][0] not in REGION_PRODUCT_ASSETS:
                continue
            product, made_from = read[0]
            if product not in products:
                products[product] = IndexedReader(storage.stage_store(product))
            now = products[product].current(year, region)
            if now is None or now.id == made_from:
                continue
            config, why = replay_config(files.lineage(year, region, v.id))
            key = f"{row.asset}:{region}:{year}:{v.id}:{now.id}"
            if config is None:
                still.add(key)
                if key not in reported:
                    context.log.warning(
                        f"{row.asset} {region} {year} was made from {product} {made_from}, now "
                        f"{now.id}; not re-made: {why}"
                    )
                continue
            requests.append(
                dg.RunRequest(
                    run_key=f"map:{key}",
                    asset_selection=[key_of(row)],
                    partition_key=str(region_year_key(region, year)),
                    run_config={"ops": {row.asset: {"config": config}}},
                    tags={"agrifm/reason": f"{product} now {now.id} (made from {made_from})"},
                )
            )
            context.log.info(f"{row.asset} {region} {year}: re-made from {product} {now.id}")
    cursor = json.dumps(sorted(still))
    if not requests:
        why = f"; {len(still)} cannot be replayed (see the log)" if still else ""
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"every map is made from its product's current version{why}"),
            cursor=cursor,
        )
    return dg.SensorResult(run_requests=requests, cursor=cursor)


all_sensors = [
    region_files_sensor,
    region_mosaic_sensor,
    stale_partitions_sensor,
    checkpoint_sensor,
    map_remake_sensor,
]
