"""The audit table: Dagster's record of every partition beside the store's.

The comparison itself (what is current, stale or corrupt, and why) is
:mod:`agrifm_pipeline.audit`, which knows nothing of Dagster; this half reads the
instance's materialisations and lays the two side by side.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg

from agrifm_pipeline import stages
from agrifm_pipeline.audit import (
    AuditRow,
    SceneLister,
    StageState,
    _current_lineage,
    _ts,
    tile_year_state,
)
from agrifm_pipeline.defs.partitions import (
    REGION_DIM,
    recorded_versions,
    region_year_key,
    split_key,
    tile_year_key,
)
from agrifm_pipeline.lineage import Fingerprints
from agrifm_pipeline.scene_listing import BatchedListing
from agrifm_pipeline.storage import IndexedReader, PartitionStore, StorageError
from agrifm_pipeline.tiles import is_block_id

# partition key -> (run id, timestamp, version named in its metadata) of the latest one
Latest = dict[str, tuple[str, float, str | None]]
# Tile-years whose pointers the audit holds at once (per asset): its memory, whatever the year.
AUDIT_BLOCK = 5000
# The files derived from a tile-year's grid: judged by the versions they were made from.
DERIVED = tuple(s.asset for s in stages.DERIVED)


def audit_rows(
    instance: Any, stores: dict[str, Any], current: Fingerprints | None, **options: Any
) -> list[AuditRow]:
    """Every row of :func:`iter_audit_rows` (same options), as a list."""
    return list(iter_audit_rows(instance, stores, current, **options))


def iter_audit_rows(
    instance: Any,
    stores: dict[str, Any],
    current: Fingerprints | None,
    *,
    tiles: set[str] | None = None,
    year: int | None = None,
    unknown: tuple[str, ...] = (),
    scenes: SceneLister | None = None,
    not_judged: str = "",
) -> Iterator[AuditRow]:
    """Every materialised or stored partition of every stored asset in ``stores``, with
    its state: the three stages, the chip tables and previews (their tile-years), and
    the region mosaics (a row per region and year, the region in the ``tile`` column),
    and the maps made from a product (a row per region or tile and year), judged by the
    product version they read.

    Dagster's record (latest materialisation per partition) and the store are read
    side by side; where they disagree the row says how. Every row that is not
    current says why. ``not_judged``: why the stages in ``unknown`` are not judged.

    Rows come as they are judged, a year at a time (tile order within it): what is kept
    meanwhile is the keys, Dagster's latest record of each, the year's pointers, and a
    few fields per grid and per stale row (what the mosaics and maps are judged by),
    never the rows or their lineages, so a continent streams to a file.
    """
    assets = [*(s.asset for s in stages.FINGERPRINTED), *(a for a in DERIVED if a in stores)]
    latest = {a: latest_materialisations(instance, a) for a in assets}
    # Every pointer read, a year's in one batch (concurrent requests on object stores).
    stores = {a: IndexedReader(s, pointers=True) for a, s in stores.items()}
    keys: set[tuple[str, int]] = set()
    for asset in assets:
        keys.update(split_key(pk) for pk in latest[asset])
        keys.update((ref.tile, int(ref.year)) for ref in stores[asset].listed())
    keys = {
        (t, y) for t, y in keys if (tiles is None or t in tiles) and (year is None or y == year)
    }
    if isinstance(scenes, BatchedListing):  # Earth Engine: every tile-year listed ahead, batched
        scenes.prefetch(keys)
    unjudged = f"not judged: {not_judged}" if not_judged else "not judged"
    grids: dict[tuple[str, int], StageState] = {}  # each tile-year's grid, without its lineage
    stale: dict[tuple[str, str, int], str] = {}  # (asset, name, year) -> why, stale rows only
    ordered = sorted(keys, key=lambda k: (k[1], k[0]))
    for i, (t, y) in enumerate(ordered):
        if i % AUDIT_BLOCK == 0 or ordered[i - 1][1] != y:
            # The next block of a year's tiles: its pointers read in one batch per asset,
            # the previous block's (and a year done with) let go.
            block = [k[0] for k in ordered[i : i + AUDIT_BLOCK] if k[1] == y]
            for asset in assets:
                stores[asset].release(y)
                if i and ordered[i - 1][1] != y:
                    stores[asset].forget(ordered[i - 1][1])
                stores[asset].load(y, block)
        state = tile_year_state(stores, t, y, current, unknown=unknown, scenes=scenes)
        grid = state.stages["embedding"]
        grids[(t, y)] = StageState(
            grid.asset, grid.present, reasons=grid.reasons, corrupt=grid.corrupt,
            version=grid.version,
        )  # fmt: skip
        judged = [(stage, st) for stage, st in state.stages.items()]
        judged += [("embedding", st) for st in state.derived.values()]
        for stage, st in judged:
            row = _audit_row(latest[st.asset], st, t, y, stage)
            if row is None:
                continue
            if row.status == "present":
                derived = st.asset in DERIVED
                if st.corrupt:
                    row.status, row.why = "corrupt", st.corrupt
                elif derived and st.stale:  # read from versions that are not current
                    row.status, row.why = "stale", "; ".join(st.reasons)
                elif current is None or stage in unknown:
                    row.status, row.why = "unknown", f"{stage} {unjudged}"
                elif st.stale:
                    row.status, row.why = "stale", "; ".join(st.reasons)
                else:
                    row.status = "current"
            if row.status == "stale":
                stale[(row.asset, row.tile, row.year)] = row.why
            yield row
    for product in stages.REGION_PRODUCTS:  # the mosaic and its int8 and COG forms
        if product.asset in stores:
            for row in _mosaic_rows(
                instance, stores, grids, tiles=tiles, year=year, asset=product.asset
            ):
                if row.status == "stale":
                    stale[(row.asset, row.tile, row.year)] = row.why
                yield row
    for made in stages.MAPS:  # similarity and class maps: judged by the product they read
        if made.asset in stores:
            yield from _map_rows(instance, stores, stale, tiles=tiles, year=year, asset=made.asset)


def _map_rows(
    instance: Any,
    stores: dict[str, Any],
    stale: dict[tuple[str, str, int], str],
    *,
    tiles: set[str] | None,
    year: int | None,
    asset: str,
) -> list[AuditRow]:
    """A row per map (a region's or a tile's, each year): current exactly when the
    product version it read (its lineage's ``inputs``) is still that product's current
    version and that product is not stale itself (``stale``: why each stale row already
    made is, by asset, name and year); else stale, naming the version that changed."""

    def tiles_read(inputs: dict[str, Any], name: str) -> set[str]:
        return set(inputs.get(stages.GRID.asset, {}).get("versions") or {name: ""})

    return _region_rows(
        instance,
        stores[asset],
        asset,
        tiles=tiles,
        year=year,
        tiles_read=tiles_read,
        reasons=lambda inputs, name, y: _map_reasons(stores, stale, inputs, name, y),
    )


def _region_rows(
    instance: Any,
    store: Any,
    asset: str,
    *,
    tiles: set[str] | None,
    year: int | None,
    tiles_read: Any,
    reasons: Any,
) -> list[AuditRow]:
    """A row per region-year (or named) partition of ``asset``, Dagster's record beside
    the store's: ``tiles_read(inputs, name)`` says which tiles its lineage read (for the
    ``tiles`` filter), ``reasons(inputs, name, year)`` why it is stale (none: current)."""
    latest = latest_materialisations(instance, asset)
    reader = IndexedReader(store, pointers=True)
    keys = {split_key(pk, REGION_DIM) for pk in latest}
    keys |= {(ref.tile, int(ref.year)) for ref in reader.partitions()}
    rows = []
    for name, y in sorted(keys, key=lambda k: (k[1], k[0])):
        if year is not None and y != year:
            continue
        lineage, corrupt, vid = _current_lineage(reader, y, name)  # type: ignore[arg-type]
        st = StageState(asset, lineage is not None, lineage=lineage or {})
        st.corrupt, st.version = corrupt, vid
        inputs = st.lineage.get("inputs", {})
        if tiles is not None and lineage is not None and not tiles_read(inputs, name) & tiles:
            continue
        row = _audit_row(latest, st, name, y, "embedding", str(region_year_key(name, y)))
        if row is None:
            continue
        if row.status == "present":
            if corrupt:
                row.status, row.why = "corrupt", corrupt
            elif why := reasons(inputs, name, y):
                row.status, row.why = "stale", "; ".join(why)
            else:
                row.status = "current"
            shas = st.lineage.get("checkpoint_sha256", [])
            row.checkpoint_sha256 = ",".join(shas) if isinstance(shas, list) else str(shas)
        rows.append(row)
    return rows


def _map_reasons(
    stores: dict[str, Any],
    stale: dict[tuple[str, str, int], str],
    inputs: dict[str, Any],
    name: str,
    year: int,
) -> list[str]:
    """Why a map whose lineage read ``inputs`` (a product version of the same name and
    year) is stale: its product has a newer current version, is gone, or is stale."""
    read = {
        a: rec["version"] for a, rec in inputs.items() if isinstance(rec, dict) and "version" in rec
    }
    if not read:
        return ["does not name the product version it was made from (written by an older release)"]
    reasons = []
    for product, version in sorted(read.items()):
        if product not in stores:
            reasons.append(f"made from {product}, which is not a stored product here")
            continue
        try:
            v = stores[product].current(year, name)
        except StorageError as exc:
            reasons.append(f"{product}: {exc}")
            continue
        if v is None:
            reasons.append(f"made from {product} version {version}, gone from the store")
        elif v.id != version:
            reasons.append(f"made from {product} version {version}; the current one is {v.id}")
        elif (why := stale.get((product, name, year))) is not None:
            reasons.append(f"{product} is stale ({why})")
    return reasons


def latest_materialisations(instance: Any, asset: str, page: int = 5000) -> Latest:
    """Dagster's latest materialisation of every partition of ``asset``: a few queries
    for the whole asset (newest first, pages of ``page`` events), not one per partition."""
    out: Latest = {}
    cursor: str | None = None
    while True:
        result = instance.fetch_materializations(dg.AssetKey(asset), limit=page, cursor=cursor)
        for rec in result.records:
            key = rec.partition_key
            if key is None or key in out:
                continue
            mat = rec.asset_materialization
            unit, sep, year = key.partition("|")
            if sep and is_block_id(unit):  # a block: each of its tiles' latest
                if mat is not None:
                    for tile, made in recorded_versions(unit, mat.metadata).items():
                        out.setdefault(f"{tile}|{year}", (rec.run_id, rec.timestamp, made))
                continue
            version = mat.metadata.get("version") if mat is not None else None
            out[key] = (rec.run_id, rec.timestamp, None if version is None else str(version.value))
        if not result.has_more:
            return out
        cursor = result.cursor


def _audit_row(
    latest: Latest, st: StageState, tile: str, year: int, stage: str, key: str | None = None
) -> AuditRow | None:
    """The row of one partition with its lineage and Dagster's record beside it; status
    ``present`` for the caller to judge, ``missing-in-store`` when only Dagster has it,
    None when neither has it. ``key``: the Dagster partition key (default tile-year)."""
    asset = st.asset
    dagster = latest.get(key or str(tile_year_key(tile, year)))
    if not st.present and dagster is None:
        return None
    lin = st.lineage
    settings = lin.get("settings", {})
    row = AuditRow(
        asset=asset,
        tile=tile,
        year=year,
        status="present",
        checkpoint_sha256=str(lin.get("embedding", {}).get("checkpoint", {}).get("sha256", ""))
        if stage == "embedding"
        else "",
        n_frames=settings.get("n_frames"),
        norm_mode=settings.get("norm_mode", "") if stage != "acquisition" else "",
        image_size=settings.get("image_size") if stage != "acquisition" else None,
        made_at=str(lin.get("created_at", "")),
        run_id=str(lin.get("run_id", "")),
        version=str(st.version),
        dagster_run_id=dagster[0] if dagster else "",
    )
    if not st.present:
        assert dagster is not None
        row.status = "missing-in-store"
        row.why = f"materialised by run {dagster[0][:8]}, but the store has no partition"
        row.disagreement = "Dagster recorded a materialisation but the store has no partition"
        row.made_at = _ts(dagster[1])
    elif dagster is None:
        row.disagreement = "in the store but never materialised through this instance"
    elif row.dagster_run_id != row.run_id:
        row.disagreement = (
            f"store written by run {row.run_id[:8]}, Dagster's latest is "
            f"{row.dagster_run_id[:8]} (written outside the pipeline, or a failed run)"
        )
    return row


def _mosaic_rows(
    instance: Any,
    stores: dict[str, PartitionStore],
    judged: dict[tuple[str, int], StageState],
    *,
    tiles: set[str] | None,
    year: int | None,
    asset: str = stages.MOSAIC.asset,
) -> list[AuditRow]:
    """A row per region mosaic (or other region product, ``asset``): stale when a tile's
    grid was re-made since (or is gone, or stale itself), missing-in-store when only
    Dagster has it."""
    grids = stores[stages.GRID.asset]

    def made(inputs: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = inputs.get(grids.asset, {}).get("versions", {})
        return out

    return _region_rows(
        instance,
        stores[asset],
        asset,
        tiles=tiles,
        year=year,
        tiles_read=lambda inputs, _name: set(made(inputs)),
        reasons=lambda inputs, _name, y: _mosaic_reasons(grids, judged, made(inputs), y),
    )


def _mosaic_reasons(
    grids: PartitionStore,
    judged: dict[tuple[str, int], StageState],
    made: dict[str, str],
    year: int,
) -> list[str]:
    """Why a mosaic made from the grid versions ``made`` ({tile: version}) is stale."""
    if not made:
        return ["does not name the grid versions it was made from (written by an older release)"]
    reasons = []
    for tile, version in sorted(made.items()):
        grid = judged.get((tile, year))
        if grid is not None:
            now = grid.version if grid.present else None
        else:
            try:
                v = grids.current(year, tile)
            except StorageError as exc:
                reasons.append(f"tile {tile}: {exc}")
                continue
            grid, now = None, (v.id if v else None)
        if now is None:
            reasons.append(f"tile {tile}: its grid is gone from the store")
        elif now != version:
            reasons.append(
                f"tile {tile}: made from grid version {version}; the current one is {now}"
            )
        elif grid is not None and grid.stale and not grid.corrupt:
            reasons.append(f"tile {tile}: its grid is stale")
    if len(reasons) > 4:
        reasons = [*reasons[:4], f"and {len(reasons) - 4} more tile(s)"]
    return reasons
