"""Issue 17, item 7: the audit covers every stored asset.

Chip tables and previews (versioned files) and region mosaics are reported like the
Zarr stages: missing from the store, or stale because they were made from a grid
version that is no longer current; every row that is not current says why, and the
stale sensor asks for chip tables and previews again (region mosaics are asked for by
``region_mosaic_sensor``). The audit used to list the three Zarr stages only.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dagster as dg

from agrifm_pipeline.audit import AuditRow
from agrifm_pipeline.defs.audit import audit_rows
from agrifm_pipeline.defs.partitions import region_year_key, tile_year_key
from agrifm_pipeline.defs.sensors import region_files_sensor
from agrifm_pipeline.defs.staleness import current_fingerprints, stage_stores

from . import test_staleness
from .pipeline_helpers import TILES, YEARS, Pipeline, write_region
from .test_staleness import _resources

world = test_staleness.world  # the materialised 2 x 2 tile-years, their ticker and checkpoint
DERIVED = ("chip_embeddings", "embedding_preview", "agrifm_embedding_int8")


def _audit(pipe: Pipeline, res: dict[str, Any]) -> dict[tuple[str, str, int], AuditRow]:
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    rows = audit_rows(pipe.instance, stage_stores(pipe.storage), current, unknown=unknown)
    assert all(r.why for r in rows if r.status != "current"), [r for r in rows if not r.why]
    return {(r.asset, r.tile, r.year): r for r in rows}


def _remake_grid(pipe: Pipeline, tile: str, year: int) -> str:
    """The grid alone, again (a new version); its chip table and preview are not re-made."""
    job = pipe.defs.resolve_job_def("embed_tile_years")
    assert job.execute_in_process(
        instance=pipe.instance,
        partition_key=str(tile_year_key(tile, year)),
        asset_selection=[dg.AssetKey("agrifm_embedding_grid")],
    ).success
    v = pipe.storage.store("agrifm_embedding_grid").current(year, tile)
    assert v is not None
    return v.id


def test_chip_tables_and_previews_are_audited_and_requested_again(world) -> None:
    pipe, ticker, ckpt = world
    res = _resources(pipe, ckpt)
    rows = _audit(pipe, res)
    assert {a for a, _, _ in rows} == {
        "s2_frame_stack", "normalized_tensors", "agrifm_embedding_grid", *DERIVED
    }  # fmt: skip
    assert len(rows) == 6 * len(TILES) * len(YEARS)
    assert {r.status for r in rows.values()} == {"current"}
    chips = rows[("chip_embeddings", TILES[0], 2019)]
    assert chips.version and chips.run_id == chips.dagster_run_id and chips.checkpoint_sha256
    # A grid made again on its own: the chip table and preview read the old version.
    old = rows[("agrifm_embedding_grid", TILES[0], 2019)].version
    new = _remake_grid(pipe, TILES[0], 2019)
    rows = _audit(pipe, res)
    for asset in DERIVED:
        row = rows[(asset, TILES[0], 2019)]
        assert row.status == "stale", row
        assert f"made from agrifm_embedding_grid version {old}; the current one is {new}" in row.why
    assert rows[("agrifm_embedding_grid", TILES[0], 2019)].status == "current"
    assert sum(r.status != "current" for r in rows.values()) == len(DERIVED)
    # A preview deleted by hand (every version and its pointer).
    shutil.rmtree(Path(pipe.storage.root) / "embedding_preview" / "2018" / TILES[1])
    row = _audit(pipe, res)[("embedding_preview", TILES[1], 2018)]
    assert row.status == "missing-in-store" and "store has no partition" in row.why
    # The stale sensor asks for exactly those, and no grid or frames.
    reqs = ticker.tick(res)
    assert ticker.covered(reqs) == {
        *((a, TILES[0], 2019) for a in DERIVED),
        ("embedding_preview", TILES[1], 2018),
    }
    assert any("made from agrifm_embedding_grid version" in r.tags["agrifm/reason"] for r in reqs)
    assert ticker.execute(reqs, res) == [True] * len(reqs)
    assert ticker.tick(res) == []
    assert {r.status for r in _audit(pipe, res).values()} == {"current"}


def test_region_mosaics_are_audited(world) -> None:
    pipe, _, ckpt = world
    res = _resources(pipe, ckpt)
    regions = Path(pipe.storage.regions_dir)
    write_region(regions / "field_a.geojson", 573800, 5621900, 575800, 5622900)  # both tiles
    ctx = dg.build_sensor_context(instance=pipe.instance, resources=res)
    added = region_files_sensor(ctx)
    assert isinstance(added, dg.SensorResult)
    pipe.instance.add_dynamic_partitions("regions", ["field_a"])
    job = pipe.defs.resolve_job_def("mosaic_regions")
    for year in YEARS:
        key = str(region_year_key("field_a", year))
        assert job.execute_in_process(instance=pipe.instance, partition_key=key).success
    rows = _audit(pipe, res)
    assert rows[("region_mosaic", "field_a", 2019)].status == "current"
    # One of its tiles' grids is made again: the 2019 mosaic is stale, and says which tile.
    old = rows[("agrifm_embedding_grid", TILES[1], 2019)].version
    new = _remake_grid(pipe, TILES[1], 2019)
    rows = _audit(pipe, res)
    row = rows[("region_mosaic", "field_a", 2019)]
    assert row.status == "stale", row
    assert row.why == f"tile {TILES[1]}: made from grid version {old}; the current one is {new}"
    assert rows[("region_mosaic", "field_a", 2018)].status == "current"
    # Deleted from the store: Dagster still has it.
    shutil.rmtree(Path(pipe.storage.root) / "region_mosaic.zarr" / "2018" / "field_a")
    row = _audit(pipe, res)[("region_mosaic", "field_a", 2018)]
    assert row.status == "missing-in-store" and "store has no partition" in row.why
    # A settings change makes the tiles' grids stale, and the mosaics made from them.
    changed = _resources(pipe, ckpt, norm_mode="unit_scale")
    row = _audit(pipe, changed)[("region_mosaic", "field_a", 2019)]
    assert row.status == "stale" and f"tile {TILES[0]}: its grid is stale" in row.why
