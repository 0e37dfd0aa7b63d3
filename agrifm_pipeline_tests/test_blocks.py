"""Block partitions (``block_side`` > 1): Dagster counts blocks of tiles x years, and
every tile keeps its own versions, lineage, staleness and audit row."""

from __future__ import annotations

import datetime
import io
import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from agrifm_pipeline.audit import AuditRow, format_table, write_rows
from agrifm_pipeline.definitions import _tile_year_from_env, build_defs
from agrifm_pipeline.defs.audit import audit_rows, iter_audit_rows
from agrifm_pipeline.defs.partitions import (
    TILES_TAG,
    TileUnits,
    partitions_per_run,
    tile_year_key,
)
from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
from agrifm_pipeline.defs.schedules import current_year_refresh
from agrifm_pipeline.defs.sensors import _run_batches, region_files_sensor
from agrifm_pipeline.defs.staleness import current_fingerprints, stage_stores
from agrifm_pipeline.errors import RegionError, SettingsError
from agrifm_pipeline.settings import canonical_block_side
from agrifm_pipeline.storage import IndexedReader
from agrifm_pipeline.tiles import Block, Tile, is_block_id, partition_unit

from .pipeline_helpers import TILES, TINY, make_resources, write_region
from .test_staleness import Ticker

BLOCK = "32631_1280m_2x2_E0224_N2196"  # the two sample tiles, columns 448-449 of row 4392
YEAR = 2019


def test_block_ids_are_never_tile_ids_and_round_trip() -> None:
    tile = Tile.from_id("32631_8960m_E0064_N0627")
    block = Block.of(tile, 8)
    assert block.id == "32631_8960m_8x8_E0008_N0078"
    assert Block.from_id(block.id) == block and block.contains(tile)
    assert not block.contains(Tile.from_id("32631_8960m_E0072_N0627"))
    assert is_block_id(block.id) and not is_block_id(tile.id)
    assert partition_unit(tile.id, 1) == tile.id and partition_unit(tile.id, 8) == block.id
    with pytest.raises(RegionError, match="is not of the form"):
        Tile.from_id(block.id)
    with pytest.raises(RegionError, match=r"e\.g\. 32631_8960m_8x8_E0008_N0078"):
        Block.from_id("32631_8960m_8x4_E0008_N0078")  # not square
    with pytest.raises(RegionError, match=r"outside 2\.\.64"):
        Block(32631, 8960, 65, 0, 0)


@pytest.mark.parametrize("raw", ["0", "65", "eight", "2.5"])
def test_block_side_out_of_range_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError, match="AGRIFM_PIPELINE_BLOCK_SIDE"):
        _tile_year_from_env({"AGRIFM_PIPELINE_BLOCK_SIDE": raw})
    assert canonical_block_side(" 8 ") == 8
    assert _tile_year_from_env({"AGRIFM_PIPELINE_BLOCK_SIDE": "8"}).block_side == 8
    assert _tile_year_from_env({}).block_side == 1


def test_units_keep_known_tiles_and_fill_blocks() -> None:
    a, b = "32631_1280m_E0448_N4392", "32631_1280m_E0449_N4392"
    c = "32631_1280m_E0450_N4392"  # the next block
    units = TileUnits([a, b, c], known=[a])
    # A tile already a partition stays one; the others go under blocks.
    assert units.new_keys(2) == [BLOCK, "32631_1280m_2x2_E0225_N2196"]
    units = TileUnits([a, b, c], known=[a, BLOCK])
    assert units.unit(a) == a and units.unit(b) == BLOCK and units.unit(c) is None
    assert units.tiles(BLOCK) == [a, b] and units.tiles(a) == [a]
    batches = _run_batches(units, [a, BLOCK], [a, b], YEAR)
    assert batches == [(None, [a]), (BLOCK, [b])]


class World:
    def __init__(self, root: Path, instance: dg.DagsterInstance, ckpt: Path) -> None:
        self.root, self.instance, self.ckpt = root, instance, ckpt
        write_region(root / "regions" / "pair.geojson", 573500, 5621800, 575900, 5623000)

    def resources(self, **kw: Any) -> dict[str, Any]:
        return make_resources(self.root, checkpoint=self.ckpt, block_side=2, **kw)

    def register(self) -> dg.SensorResult:
        ctx = dg.build_sensor_context(instance=self.instance, resources=self.resources())
        result = region_files_sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        for req in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        return result

    def run(self, tags: dict[str, str], **kw: Any) -> dg.ExecuteInProcessResult:
        job = build_defs(self.resources(**kw)).resolve_job_def("embed_tile_years")
        return job.execute_in_process(instance=self.instance, tags=tags)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT_MIN_BYTES", "1000")
    ckpt = tmp_path / "weights" / "AgriFM.pth"
    ckpt.parent.mkdir()
    shutil.copy(TINY, ckpt)
    with dg.instance_for_test() as instance:
        yield World(tmp_path, instance, ckpt)


def _range(unit: str) -> dict[str, str]:
    key = str(tile_year_key(unit, YEAR))
    return {RANGE_START: key, RANGE_END: key}


def test_a_block_partition_does_each_tile_and_says_so_per_tile(world: World) -> None:
    world.register()
    assert world.instance.get_dynamic_partitions("tiles") == [BLOCK]
    result = world.run(_range(BLOCK))
    assert result.success
    storage = world.resources()["storage"]
    grids = storage.store("agrifm_embedding_grid")
    made = {t: grids.current(YEAR, t) for t in TILES}
    assert all(v is not None for v in made.values())
    # Dagster's record of the block names each tile's version, as the store has it.
    key = str(tile_year_key(BLOCK, YEAR))
    for asset in ("s2_frame_stack", "agrifm_embedding_grid", "chip_embeddings"):
        rec = world.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
        ).records[0]
        meta = rec.asset_materialization.metadata
        store = storage.stage_store(asset)
        assert meta["versions"].value == {t: store.current(YEAR, t).id for t in TILES}
        assert meta["tiles_made"].value == 2 and set(meta["tiles"].value) == set(TILES)
    grid_meta = (
        world.instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("agrifm_embedding_grid"), asset_partitions=[key]
            ),
            limit=1,
        )
        .records[0]
        .asset_materialization.metadata
    )
    assert grid_meta["n_frames"].value == 8  # shared by every tile: the block's own field
    # One check evaluation per block and check, judged on both tiles.
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert len(evaluations) == len(result.get_asset_check_evaluations()) == 5  # one per check
    assert {e.partition for e in evaluations.values()} == {key}
    assert all(e.metadata["tiles_judged"].value == 2 for e in evaluations.values())
    # The western tile is mostly fill: the block's clear-fraction check fails, naming it.
    clear = evaluations.pop("frame_stack_clear_fraction")
    assert not clear.passed and clear.metadata["failed_tiles"].value == [TILES[0]]
    assert "Failed on 1 of 2 tiles" in (clear.description or "")
    assert all(e.passed for e in evaluations.values())
    # The audit: a row per tile, Dagster's run beside each.
    res = world.resources()
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    rows = audit_rows(world.instance, stage_stores(storage), current, unknown=unknown)
    grid_rows = {r.tile: r for r in rows if r.asset == "agrifm_embedding_grid"}
    assert set(grid_rows) == set(TILES)
    assert {r.status for r in grid_rows.values()} == {"current"}
    assert {r.dagster_run_id for r in grid_rows.values()} == {result.run_id}
    assert {r.version for r in grid_rows.values()} == {v.id for v in made.values()}


def test_stale_tiles_of_a_block_rerun_alone_and_the_rest_keep_their_versions(
    world: World,
) -> None:
    world.register()
    assert world.run(_range(BLOCK)).success
    ticker = Ticker(world)  # type: ignore[arg-type]
    assert ticker.tick(world.resources()) == []
    # A new normalisation makes both tiles stale: one run, the block, both tiles named.
    reqs = ticker.tick(world.resources(norm_mode="unit_scale"))
    assert len(reqs) == 1
    (req,) = reqs
    assert req.tags[RANGE_START] == req.tags[RANGE_END] == str(tile_year_key(BLOCK, YEAR))
    assert req.tags[TILES_TAG] == ",".join(TILES) and req.tags["agrifm/n_tile_years"] == "2"
    # A run of the block that names one tile does that tile only.
    storage = world.resources()["storage"]
    grids = storage.store("agrifm_embedding_grid")
    before = {t: grids.current(YEAR, t).id for t in TILES}
    one = world.run({**_range(BLOCK), TILES_TAG: TILES[0]}, norm_mode="unit_scale")
    assert one.success
    after = {t: grids.current(YEAR, t).id for t in TILES}
    assert after[TILES[0]] != before[TILES[0]] and after[TILES[1]] == before[TILES[1]]
    # Next tick, under the new setting: only the other tile is stale.
    ticker.cursor = None
    reqs = ticker.tick(world.resources(norm_mode="unit_scale"))
    assert [r.tags[TILES_TAG] for r in reqs] == [TILES[1]]
    # The audit keeps each tile's own latest run: the first tile's from the one-tile run.
    res = world.resources(norm_mode="unit_scale")
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    rows = audit_rows(world.instance, stage_stores(storage), current, unknown=unknown)
    grid = {r.tile: r for r in rows if r.asset == "agrifm_embedding_grid"}
    assert grid[TILES[0]].dagster_run_id == one.run_id and grid[TILES[0]].status == "current"
    assert grid[TILES[1]].dagster_run_id != one.run_id and grid[TILES[1]].status == "stale"


def test_the_weekly_refresh_asks_one_run_per_block(world: World) -> None:
    world.register()
    # Closed here: an unclosed schedule context leaves the instance it entered as the
    # current definitions-state storage until it is collected, in whatever test runs then.
    with dg.build_schedule_context(
        instance=world.instance,
        resources=world.resources(),
        scheduled_execution_time=datetime.datetime(YEAR, 6, 1, 3, tzinfo=datetime.UTC),
    ) as ctx:
        reqs = current_year_refresh(ctx)
    assert isinstance(reqs, list) and len(reqs) == 1
    assert reqs[0].tags[RANGE_START].startswith(BLOCK + "|")
    assert reqs[0].tags["agrifm/n_tile_years"] == "2"


def test_backfill_runs_hold_about_sixteen_tiles() -> None:
    assert [partitions_per_run(s) for s in (1, 2, 3, 4, 8, 64)] == [16, 4, 1, 1, 1, 1]


def _row(i: int, status: str = "current") -> AuditRow:
    return AuditRow("agrifm_embedding_grid", f"32631_1280m_E{i:04d}_N4392", YEAR, status)


def test_streamed_audit_rows_are_the_tables_text() -> None:
    rows = [_row(1), _row(2, "stale")]
    for fmt in ("csv", "json"):
        out = io.StringIO()
        assert write_rows(iter(rows), fmt, out) == 2
        assert out.getvalue().rstrip("\n") == format_table(rows, fmt).rstrip("\n")
        empty = io.StringIO()
        assert write_rows(iter([]), fmt, empty) == 0
        assert empty.getvalue().rstrip("\n") == format_table([], fmt).rstrip("\n")
    assert json.loads(format_table(rows, "json"))[1]["status"] == "stale"


def test_the_audit_yields_before_it_has_judged_everything(world: World) -> None:
    world.register()
    assert world.run(_range(BLOCK)).success
    res = world.resources()
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    rows = iter_audit_rows(world.instance, stage_stores(res["storage"]), current, unknown=unknown)
    first = next(rows)  # a generator: a row comes out before the rest are judged
    assert first.status == "current" and len([first, *rows]) == 2 * 6


def test_the_manifest_cache_keeps_the_most_recent_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from agrifm_pipeline.storage import versions

    monkeypatch.setattr(versions, "MANIFEST_CACHE_SIZE", 3)
    monkeypatch.setattr(versions, "_MANIFEST_CACHE", versions.OrderedDict())
    for i in range(5):
        versions._remember(("u", "2019", f"t{i}", "v"), {"i": i})
    assert list(versions._MANIFEST_CACHE) == [("u", "2019", f"t{i}", "v") for i in (2, 3, 4)]
    assert versions._cached(("u", "2019", "t2", "v")) == {"i": 2}  # used: kept longest now
    versions._remember(("u", "2019", "t5", "v"), {"i": 5})
    assert ("u", "2019", "t3", "v") not in versions._MANIFEST_CACHE
    assert versions._cached(("u", "2019", "t2", "v")) == {"i": 2}


def test_a_reader_forgets_a_year_and_reads_it_again(world: World) -> None:
    world.register()
    assert world.run(_range(BLOCK)).success
    reader = IndexedReader(world.resources()["storage"].store("agrifm_embedding_grid"))
    assert set(reader.index(YEAR) or {}) == set(TILES)
    reader.forget(YEAR)
    assert set(reader.index(YEAR) or {}) == set(TILES) and reader.reads["index"] == 2


def test_the_control_plane_bench_hands_a_continent_to_the_continent_bench() -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_control_plane.py"
    spec = importlib.util.spec_from_file_location("bench_control_plane_probe", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    asked = bench._tiles_asked  # type: ignore[attr-defined]
    assert asked(["--tiles", "125000", "--ui"]) == 125000 > bench.CONTINENT_TILES  # type: ignore[attr-defined]
    assert asked(["--tiles=250"]) == 250 and asked(["--years", "8"]) is None
