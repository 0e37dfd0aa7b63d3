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
from dataclasses import dataclass, field
from typing import Any

from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.lineage import STAGES, Fingerprints, explain_difference
from agrifm_pipeline.storage import StorageError, ZarrStore

STAGE_ASSET = {
    "acquisition": "s2_frame_stack",
    "normalisation": "normalized_tensors",
    "embedding": "agrifm_embedding_grid",
}
DERIVED = ("chip_embeddings", "embedding_preview")
ORDER = ("s2_frame_stack", "normalized_tensors", "agrifm_embedding_grid", *DERIVED)


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

    def first_stale(self) -> str | None:
        for stage in STAGES:
            st = self.stages.get(stage)
            if st is not None and st.present and st.stale:
                return stage
        return None

    def stale_assets(self) -> tuple[str, ...]:
        stage = self.first_stale()
        return downstream_of(stage) if stage else ()


def _current_lineage(
    store: ZarrStore, year: int, tile: str
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
    stores: dict[str, ZarrStore],
    tile: str,
    year: int,
    current: Fingerprints | None,
    *,
    unknown: tuple[str, ...] = (),
) -> TileYearState:
    """Compare one tile-year's stored fingerprints with ``current``.

    Stages in ``unknown`` (e.g. the embedding when the checkpoint cannot be
    resolved without downloading it) are not judged.
    """
    stages: dict[str, StageState] = {}
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
        stages[stage] = st
    # A stage whose upstream is stale is stale too, whatever its own inputs say.
    for i, stage in enumerate(STAGES[1:], start=1):
        up = stages[STAGES[i - 1]]
        st = stages[stage]
        if st.present and up.present and up.stale and not st.stale:
            st.reasons = [f"{up.asset} is stale"]
    return TileYearState(tile, year, stages)


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
    stores: dict[str, ZarrStore],
    current: Fingerprints | None,
    *,
    tiles: set[str] | None = None,
    year: int | None = None,
    unknown: tuple[str, ...] = (),
) -> list[AuditRow]:
    """Every materialised or stored partition of the three stored stages, with its state.

    Dagster's record (latest materialisation per partition) and the Zarr attrs
    are read side by side; where they disagree the row says how.
    """
    import dagster as dg

    from agrifm_pipeline.defs.partitions import split_key

    keys: set[tuple[str, int]] = set()
    dagster_runs: dict[tuple[str, str, int], tuple[str, float]] = {}
    for asset in STAGE_ASSET.values():
        ak = dg.AssetKey(asset)
        for pk in instance.get_materialized_partitions(ak):
            t, y = split_key(pk)
            keys.add((t, y))
        for ref in stores[asset].partitions():
            keys.add((ref.tile, int(ref.year)))
    keys = {
        (t, y) for t, y in keys if (tiles is None or t in tiles) and (year is None or y == year)
    }
    for asset in STAGE_ASSET.values():
        ak = dg.AssetKey(asset)
        for t, y in keys:
            from agrifm_pipeline.defs.partitions import tile_year_key

            result = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=ak, asset_partitions=[str(tile_year_key(t, y))]),
                limit=1,
            )
            if result.records:
                rec = result.records[0]
                dagster_runs[(asset, t, y)] = (rec.run_id, rec.timestamp)
    rows: list[AuditRow] = []
    for t, y in sorted(keys, key=lambda k: (k[1], k[0])):
        state = tile_year_state(stores, t, y, current, unknown=unknown)
        for stage, st in state.stages.items():
            asset = st.asset
            in_dagster = (asset, t, y) in dagster_runs
            if not st.present and not in_dagster:
                continue
            lin = st.lineage
            settings = lin.get("settings", {})
            row = AuditRow(
                asset=asset,
                tile=t,
                year=y,
                status="current",
                checkpoint_sha256=str(
                    lin.get("embedding", {}).get("checkpoint", {}).get("sha256", "")
                )
                if stage == "embedding"
                else "",
                n_frames=settings.get("n_frames"),
                norm_mode=settings.get("norm_mode", "") if stage != "acquisition" else "",
                image_size=settings.get("image_size") if stage != "acquisition" else None,
                made_at=str(lin.get("created_at", "")),
                run_id=str(lin.get("run_id", "")),
                version=str(st.version),
                dagster_run_id=dagster_runs.get((asset, t, y), ("", 0.0))[0],
            )
            if not st.present:
                row.status = "missing-in-store"
                row.disagreement = (
                    "Dagster recorded a materialisation but the store has no partition"
                )
                row.made_at = _ts(dagster_runs[(asset, t, y)][1])
            else:
                if not in_dagster:
                    row.disagreement = "in the store but never materialised through this instance"
                elif row.dagster_run_id != row.run_id:
                    row.disagreement = (
                        f"store written by run {row.run_id[:8]}, Dagster's latest is "
                        f"{row.dagster_run_id[:8]} (written outside the pipeline, or a failed run)"
                    )
                if st.corrupt:
                    row.status, row.why = "corrupt", st.corrupt
                elif current is None or stage in unknown:
                    row.status = "unknown"
                elif st.stale:
                    row.status, row.why = "stale", "; ".join(st.reasons)
            rows.append(row)
    return rows


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
