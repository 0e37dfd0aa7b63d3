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
normalisation          normalized_tensors, agrifm_embedding_grid, chips, preview,
                       int8 grid
embedding              agrifm_embedding_grid, chip_embeddings, embedding_preview,
                       agrifm_embedding_int8
=====================  =====================================================

Chip vectors, previews and the int8 grid are made from the grid alone, so they are
exactly as current as the grid they were made from.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from agrifm_pipeline import stages as table
from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.lineage import (
    SCENE_INDEX_KEY,
    STAGES,
    Fingerprints,
    explain_difference,
    explain_scene_changes,
    is_record,
    scene_digest,
)
from agrifm_pipeline.storage import PartitionStore, StorageError

STAGE_ASSET = {s.stage: s.asset for s in table.FINGERPRINTED}
DERIVED = tuple(s.asset for s in table.DERIVED)
ORDER = tuple(s.asset for s in table.TILE_YEAR)


# (tile, year) -> the source's current scenes of that tile-year (id -> stamp), None if unknown
SceneLister = Callable[[str, int], Mapping[str, str] | None]


def downstream_of(stage: str) -> tuple[str, ...]:
    """The tile-year assets to re-make when ``stage`` is stale."""
    return tuple(s.asset for s in table.downstream_of(stage))


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
    (``""`` when fine or never checked, else what verification found) and its id.

    The lineage is the record the pointer (or the year's index) keeps
    (:func:`~agrifm_pipeline.lineage.lineage_record`) where there is one: no manifest
    is read; :func:`_full_lineage` reads it where a difference must be explained."""
    try:
        v = store.current(year, tile)
        if v is None:
            return None, "", ""
        lineage = store.judged_lineage(v)  # a manifest is cached: versions never change
    except StorageError as exc:
        return {}, str(exc), ""
    mark = v.integrity  # in the pointer already read: no extra request
    if mark and not mark.get("ok", True):
        return lineage, "; ".join(mark.get("problems", [])) or "failed verification", v.id
    return lineage, "", v.id


def _full_lineage(store: PartitionStore, year: int, tile: str, st: StageState) -> dict[str, Any]:
    """The whole lineage of the stage's version (kept in ``st``), where it holds a record."""
    if is_record(st.lineage) and st.version:
        st.lineage = store.lineage(year, tile, st.version)
    return st.lineage


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
    # the source's scenes and their digest, listed once
    listed: list[tuple[Mapping[str, str] | None, str | None]] = []

    def scene_reasons(st: StageState) -> list[str]:
        recorded = st.lineage.get("acquisition", {}).get(SCENE_INDEX_KEY)
        if scenes is None or not isinstance(recorded, dict):
            return []  # not listed here, or made before scenes were recorded
        if not listed:
            now = scenes(tile, year)
            listed.append((now, None if now is None else scene_digest(now)))
        now, digest = listed[0]
        if now is None or recorded.get("digest") == digest:
            return []
        full = _full_lineage(stores[st.asset], year, tile, st)
        recorded = full.get("acquisition", {}).get(SCENE_INDEX_KEY, {})
        return explain_scene_changes(recorded.get("scenes", {}), now)

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
                full = _full_lineage(stores[asset], year, tile, st)
                rec = full.get("fingerprints", {}).get(stage, {})
                st.reasons = explain_difference(rec.get("inputs", {}), cur.inputs) or [
                    "recorded fingerprint differs (upstream stage changed)"
                ]
            st.reasons += scene_reasons(st)
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


def _ts(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def write_rows(rows: Iterable[AuditRow], fmt: str, out: TextIO) -> int:
    """``rows`` written to ``out`` one at a time as CSV or as a JSON array (the same text
    :func:`format_table` makes, and a newline): nothing is held but the row being
    written. Returns how many were written."""
    n = 0
    if fmt == "csv":
        w = csv.DictWriter(out, fieldnames=list(AUDIT_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow(r.as_dict())
            n += 1
        return n
    if fmt != "json":
        raise ValueError(f"format {fmt!r}: stream csv or json")
    for r in rows:
        out.write("[\n  " if n == 0 else ",\n  ")
        out.write(json.dumps(r.as_dict(), indent=2).replace("\n", "\n  "))
        n += 1
    out.write("\n]\n" if n else "[]\n")
    return n


def format_table(rows: list[AuditRow], fmt: str = "table") -> str:

    if fmt in ("json", "csv"):
        buf = io.StringIO()
        write_rows(rows, fmt, buf)
        return buf.getvalue().removesuffix("\n") if fmt == "json" else buf.getvalue()
    dicts = [r.as_dict() for r in rows]
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
