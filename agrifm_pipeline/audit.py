"""What is current, what is stale and why: the comparison behind the stale sensor and the audit.

A tile-year's three stored stages each record the fingerprint of the settings
that made them (:mod:`agrifm_pipeline.lineage`). With the current settings
and checkpoint we compute the current fingerprints; a stage is stale when its
recorded fingerprint differs (or its partition is gone from the store), and
then it and every tile-year asset below it must be re-made:

=====================  =====================================================
stale stage            assets to re-materialise for that tile-year
=====================  =====================================================
acquisition            s2_frame_stack and everything below
normalisation          normalized_tensors, agrifm_embedding_grid, chips, preview
embedding              agrifm_embedding_grid, chip_embeddings, embedding_preview
=====================  =====================================================

Chip vectors and previews are made from the grid alone, so they are exactly
as current as the grid they were made from.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.lineage import (
    SCENE_INDEX_KEY,
    STAGES,
    Fingerprints,
    explain_difference,
    explain_scene_changes,
)
from agrifm_pipeline.storage import PartitionStore, StorageError

STAGE_ASSET = {
    "acquisition": "s2_frame_stack",
    "normalisation": "normalized_tensors",
    "embedding": "agrifm_embedding_grid",
}
DERIVED = ("chip_embeddings", "embedding_preview")
ORDER = ("s2_frame_stack", "normalized_tensors", "agrifm_embedding_grid", *DERIVED)


# (tile, year) -> the source's current scenes of that tile-year (id -> stamp), None if unknown
SceneLister = Callable[[str, int], Mapping[str, str] | None]


def downstream_of(stage: str) -> tuple[str, ...]:
    """The tile-year assets to re-make when ``stage`` is stale."""
    return ORDER[list(STAGES).index(stage) :]


@dataclass
class StageState:
    asset: str
    present: bool
    recorded: str | None = None
    current: str | None = None
    reasons: list[str] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    corrupt: str = ""  # what verification found wrong with the current version
    version: str = ""

    @property
    def stale(self) -> bool:
        return bool(self.reasons)


@dataclass
class TileYearState:
    tile: str
    year: int
    stages: dict[str, StageState]
    # chip_embeddings, embedding_preview: judged by the versions they were read from
    derived: dict[str, StageState] = field(default_factory=dict)

    def first_stale(self) -> str | None:
        for stage in STAGES:
            st = self.stages.get(stage)
            if st is not None and st.present and st.stale:
                return stage
        return None

    def stale_assets(self) -> tuple[str, ...]:
        """What to re-make: from the first stale stage down; else the stale derived files."""
        stage = self.first_stale()
        if stage:
            return downstream_of(stage)
        return tuple(a for a in DERIVED if a in self.derived and self.derived[a].stale)

    def why(self) -> list[str]:
        """The reasons of the first asset :meth:`stale_assets` names."""
        stage = self.first_stale()
        if stage:
            return self.stages[stage].reasons
        stale = self.stale_assets()
        return self.derived[stale[0]].reasons if stale else []


def _derived_state(
    store: PartitionStore, tile: str, year: int, stages: dict[str, StageState], asset: str
) -> StageState:
    """A chip table's or preview's state: current exactly when every stage version it
    was read from (its lineage's ``inputs``) is still the current one and not stale."""
    lineage, corrupt, vid = _current_lineage(store, year, tile)
    if lineage is None:
        return StageState(asset, present=False)
    st = StageState(asset, True, lineage=lineage, corrupt=corrupt, version=vid)
    if corrupt:
        st.reasons = [f"corrupt: {corrupt}"]
        return st
    by_asset = {s.asset: s for s in stages.values()}
    inputs = lineage.get("inputs", {})
    grid = by_asset[STAGE_ASSET["embedding"]]
    if not inputs.get(grid.asset, {}).get("version"):
        st.reasons = [
            f"does not name the {grid.asset} version it was made from (written by an older release)"
        ]
    for up_asset, rec in inputs.items():
        up = by_asset.get(up_asset)
        made_from = rec.get("version") if isinstance(rec, dict) else None
        if up is None or not made_from:
            continue
        if not up.present:
            st.reasons.append(f"made from {up_asset} version {made_from}, gone from the store")
        elif made_from != up.version:
            st.reasons.append(
                f"made from {up_asset} version {made_from}; the current one is {up.version}"
            )
    if not st.reasons and grid.present and grid.stale and not grid.corrupt:
        st.reasons = [f"{grid.asset} is stale"]
    return st


def _current_lineage(
    store: PartitionStore, year: int, tile: str
) -> tuple[dict[str, Any] | None, str, str]:
    """The current version's lineage (None when there is none), its integrity verdict
    (``""`` when fine or never checked, else what verification found) and its id."""
    try:
        v = store.current(year, tile)
        if v is None:
            return None, "", ""
        lineage = store.lineage(year, tile, v.id)  # cached per version: versions never change
    except StorageError as exc:
        return {}, str(exc), ""
    mark = v.integrity  # in the pointer already read: no extra request
    if mark and not mark.get("ok", True):
        return lineage, "; ".join(mark.get("problems", [])) or "failed verification", v.id
    return lineage, "", v.id


def tile_year_state(
    stores: dict[str, PartitionStore],
    tile: str,
    year: int,
    current: Fingerprints | None,
    *,
    unknown: tuple[str, ...] = (),
    scenes: SceneLister | None = None,
) -> TileYearState:
    """Compare one tile-year's stored fingerprints with ``current``.

    Stages in ``unknown`` (e.g. the embedding when the checkpoint cannot be
    resolved without downloading it) are not judged. ``scenes(tile, year)`` lists the
    source's current scenes of the tile-year (id -> stamp; None when it cannot): each
    stage is then also stale when the scenes recorded in its lineage differ, with
    the scenes that changed, appeared or went as the reason.
    """
    stages: dict[str, StageState] = {}
    listed: list[Mapping[str, str] | None] = []  # the source's scenes, listed once

    def scene_reasons(lineage: dict[str, Any]) -> list[str]:
        recorded = lineage.get("acquisition", {}).get(SCENE_INDEX_KEY)
        if scenes is None or not isinstance(recorded, dict):
            return []  # not listed here, or made before scenes were recorded
        if not listed:
            listed.append(scenes(tile, year))
        now = listed[0]
        return [] if now is None else explain_scene_changes(recorded.get("scenes", {}), now)

    for stage, asset in STAGE_ASSET.items():
        lineage, corrupt, vid = _current_lineage(stores[asset], year, tile)
        if lineage is None:
            stages[stage] = StageState(asset, present=False)
            continue
        rec = lineage.get("fingerprints", {}).get(stage, {})
        st = StageState(
            asset, True, rec.get("fingerprint"), lineage=lineage, corrupt=corrupt, version=vid
        )
        if corrupt:
            st.reasons = [f"corrupt: {corrupt}"]
            stages[stage] = st
            continue
        if current is not None and stage not in unknown:
            cur = current.for_stage(stage)
            st.current = cur.value
            if st.recorded != cur.value:
                st.reasons = explain_difference(rec.get("inputs", {}), cur.inputs) or [
                    "recorded fingerprint differs (upstream stage changed)"
                ]
            st.reasons += scene_reasons(lineage)
        stages[stage] = st
    # A stage whose upstream is stale is stale too, whatever its own inputs say.
    for i, stage in enumerate(STAGES[1:], start=1):
        up = stages[STAGES[i - 1]]
        st = stages[stage]
        if st.present and up.present and up.stale and not st.stale:
            st.reasons = [f"{up.asset} is stale"]
    derived = {a: _derived_state(stores[a], tile, year, stages, a) for a in DERIVED if a in stores}
    return TileYearState(tile, year, stages, derived)


def current_checkpoint_sha(checkpoint: str | None) -> tuple[str | None, str]:
    """The sha256 the model resource would load, without downloading; (None, why) if unknown."""
    from agrifm_pipeline.checkpoint import resolve_checkpoint
    from agrifm_pipeline.settings import load_settings

    settings = load_settings()
    try:
        resolved = resolve_checkpoint(checkpoint or None, settings.replace(auto_download=False))
    except CheckpointError as exc:
        if checkpoint or settings.checkpoint:
            return None, str(exc)
        return None, (
            f"no checkpoint set (RS_EMBED_AGRIFM_CKPT) and none cached at "
            f"{settings.checkpoint_cache_path}; sensors never download it — run "
            "`agrifm-pipeline checkpoint` or any embedding run to fetch it"
        )
    return resolved.sha256, resolved.source


# -- the audit table ------------------------------------------------------------------------
AUDIT_COLUMNS = (
    "asset",
    "tile",
    "year",
    "status",
    "why",
    "checkpoint_sha256",
    "n_frames",
    "norm_mode",
    "image_size",
    "made_at",
    "run_id",
    "dagster_run_id",
    "version",
    "disagreement",
)


@dataclass
class AuditRow:
    asset: str
    tile: str
    year: int
    status: str  # current | stale | corrupt | missing-in-store | unknown
    why: str = ""
    checkpoint_sha256: str = ""
    n_frames: int | None = None
    norm_mode: str = ""
    image_size: int | None = None
    made_at: str = ""
    run_id: str = ""
    dagster_run_id: str = ""
    version: str = ""
    disagreement: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def audit_rows(
    instance: Any,
    stores: dict[str, PartitionStore],
    current: Fingerprints | None,
    *,
    tiles: set[str] | None = None,
    year: int | None = None,
    unknown: tuple[str, ...] = (),
    scenes: SceneLister | None = None,
    not_judged: str = "",
) -> list[AuditRow]:
    """Every materialised or stored partition of every stored asset in ``stores``, with
    its state: the three stages, the chip tables and previews (their tile-years), and
    the region mosaics (a row per region and year, the region in the ``tile`` column).

    Dagster's record (latest materialisation per partition) and the store are read
    side by side; where they disagree the row says how. Every row that is not
    current says why. ``not_judged``: why the stages in ``unknown`` are not judged.
    """
    import dagster as dg

    from agrifm_pipeline.defs.partitions import split_key

    assets = [*STAGE_ASSET.values(), *(a for a in DERIVED if a in stores)]
    keys: set[tuple[str, int]] = set()
    for asset in assets:
        for pk in instance.get_materialized_partitions(dg.AssetKey(asset)):
            keys.add(split_key(pk))
        for ref in stores[asset].partitions():
            keys.add((ref.tile, int(ref.year)))
    keys = {
        (t, y) for t, y in keys if (tiles is None or t in tiles) and (year is None or y == year)
    }
    unjudged = f"not judged: {not_judged}" if not_judged else "not judged"
    rows: list[AuditRow] = []
    states: dict[tuple[str, int], TileYearState] = {}
    for t, y in sorted(keys, key=lambda k: (k[1], k[0])):
        state = states[(t, y)] = tile_year_state(
            stores, t, y, current, unknown=unknown, scenes=scenes
        )
        judged = [(stage, st) for stage, st in state.stages.items()]
        judged += [("embedding", st) for st in state.derived.values()]
        for stage, st in judged:
            row = _audit_row(instance, st, t, y, stage)
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
            rows.append(row)
    if "region_mosaic" in stores:
        rows += _mosaic_rows(instance, stores, states, tiles=tiles, year=year)
    return rows


def _latest_materialisation(instance: Any, asset: str, key: str) -> tuple[str, float] | None:
    """(run id, timestamp) of Dagster's latest materialisation of one partition, or None."""
    import dagster as dg

    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
    )
    if not result.records:
        return None
    rec = result.records[0]
    return rec.run_id, rec.timestamp


def _audit_row(
    instance: Any, st: StageState, tile: str, year: int, stage: str, key: str | None = None
) -> AuditRow | None:
    """The row of one partition with its lineage and Dagster's record beside it; status
    ``present`` for the caller to judge, ``missing-in-store`` when only Dagster has it,
    None when neither has it. ``key``: the Dagster partition key (default tile-year)."""
    from agrifm_pipeline.defs.partitions import tile_year_key

    asset = st.asset
    dagster = _latest_materialisation(instance, asset, key or str(tile_year_key(tile, year)))
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
    states: dict[tuple[str, int], TileYearState],
    *,
    tiles: set[str] | None,
    year: int | None,
) -> list[AuditRow]:
    """A row per region mosaic: stale when a tile's grid was re-made since (or is gone, or
    stale itself), missing-in-store when only Dagster has it."""
    import dagster as dg

    from agrifm_pipeline.defs.partitions import REGION_DIM, region_year_key, split_key

    mosaics, grids = stores["region_mosaic"], stores[STAGE_ASSET["embedding"]]
    keys = {split_key(pk, REGION_DIM) for pk in instance.get_materialized_partitions(
        dg.AssetKey("region_mosaic"))}  # fmt: skip
    keys |= {(ref.tile, int(ref.year)) for ref in mosaics.partitions()}
    rows = []
    for region, y in sorted(keys, key=lambda k: (k[1], k[0])):
        if year is not None and y != year:
            continue
        lineage, corrupt, vid = _current_lineage(mosaics, y, region)
        st = StageState("region_mosaic", lineage is not None, lineage=lineage or {})
        st.corrupt, st.version = corrupt, vid
        made = st.lineage.get("inputs", {}).get(grids.asset, {}).get("versions", {})
        if tiles is not None and lineage is not None and not set(made) & tiles:
            continue
        row = _audit_row(instance, st, region, y, "embedding", str(region_year_key(region, y)))
        if row is None:
            continue
        if row.status == "present":
            if corrupt:
                row.status, row.why = "corrupt", corrupt
            elif reasons := _mosaic_reasons(grids, states, made, y):
                row.status, row.why = "stale", "; ".join(reasons)
            else:
                row.status = "current"
            shas = st.lineage.get("checkpoint_sha256", [])
            row.checkpoint_sha256 = ",".join(shas) if isinstance(shas, list) else str(shas)
        rows.append(row)
    return rows


def _mosaic_reasons(
    grids: PartitionStore,
    states: dict[tuple[str, int], TileYearState],
    made: dict[str, str],
    year: int,
) -> list[str]:
    """Why a mosaic made from the grid versions ``made`` ({tile: version}) is stale."""
    if not made:
        return ["does not name the grid versions it was made from (written by an older release)"]
    reasons = []
    for tile, version in sorted(made.items()):
        state = states.get((tile, year))
        if state is not None:
            grid = state.stages["embedding"]
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


def _ts(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def format_table(rows: list[AuditRow], fmt: str = "table") -> str:
    import csv
    import io
    import json

    dicts = [r.as_dict() for r in rows]
    if fmt == "json":
        return json.dumps(dicts, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(AUDIT_COLUMNS))
        w.writeheader()
        w.writerows(dicts)
        return buf.getvalue()
    cols = ["asset", "tile", "year", "status", "checkpoint_sha256", "n_frames", "norm_mode",
            "image_size", "made_at", "run_id", "why", "disagreement"]  # fmt: skip
    cells = [[_cell(d[c], c) for c in cols] for d in dicts]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any, col: str) -> str:
    if value is None:
        return ""
    text = str(value)
    if col in ("checkpoint_sha256",):
        return text[:12]
    if col == "run_id":
        return text[:8]
    return text


def markdown_table(rows: list[AuditRow], limit: int = 200) -> str:
    cols = ["asset", "tile", "year", "status", "checkpoint_sha256", "n_frames", "norm_mode",
            "image_size", "made_at", "why", "disagreement"]  # fmt: skip
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join(
        "| " + " | ".join(_cell(r.as_dict()[c], c).replace("|", "/") for c in cols) + " |\n"
        for r in rows[:limit]
    )
    more = (
        f"\n… and {len(rows) - limit} more rows (see `agrifm-pipeline audit`)"
        if len(rows) > limit
        else ""
    )
    return head + body + more
