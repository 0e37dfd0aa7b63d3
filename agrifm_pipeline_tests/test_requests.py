"""Batched run requests (ranges of tiles x one year) and the weekly schedule."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import dagster as dg
import pytest

from agrifm_pipeline.defs.requests import (
    RANGE_END,
    RANGE_START,
    tile_rectangles,
    tile_year_run_requests,
)
from agrifm_pipeline.defs.schedules import current_year_refresh

from .pipeline_helpers import TILES, make_pipeline, write_region

ORDER = ["a", "b", "c", "d", "e", "f"]


def test_rectangles_cover_exactly_the_wanted_tile_years() -> None:
    wanted = [("a", 2019), ("b", 2019), ("d", 2019), ("e", 2019), ("f", 2019), ("c", 2020)]
    blocks = tile_rectangles(ORDER, wanted, max_per_run=2)
    assert blocks == [(2019, ["a", "b"]), (2019, ["d", "e"]), (2019, ["f"]), (2020, ["c"])]
    covered = {(t, y) for y, ts in blocks for t in ts}
    assert covered == set(wanted)


def test_unknown_tile_is_named() -> None:
    with pytest.raises(KeyError, match="zz"):
        tile_rectangles(ORDER, [("zz", 2019)], 4)


def test_run_requests_carry_range_tags() -> None:
    reqs = tile_year_run_requests(
        ORDER, [("b", 2019), ("c", 2019)], asset_selection=[dg.AssetKey("x")], reason="test"
    )
    (req,) = reqs
    assert req.tags[RANGE_START] == "b|2019" and req.tags[RANGE_END] == "c|2019"
    assert req.asset_selection == [dg.AssetKey("x")]


def test_weekly_schedule_requests_current_year_of_registered_tiles(tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        _schedule_case(tmp_path, instance)


def _schedule_case(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    pipe = make_pipeline(tmp_path, instance=instance)
    write_region(Path(pipe.storage.regions_dir) / "r.geojson", 573800, 5621900, 575800, 5622900)
    pipe.storage.registry().scan(pipe.storage.regions_dir, chip_px=64, chips_per_side=2, scale_m=10)
    with dg.build_schedule_context(  # closed: see test_blocks' weekly refresh test
        instance=pipe.instance,
        resources=pipe.resources,
        scheduled_execution_time=dt.datetime(2026, 6, 1, 3, tzinfo=dt.UTC),
    ) as ctx:
        reqs = list(current_year_refresh(ctx))
    assert len(reqs) == 1
    assert reqs[0].tags[RANGE_START] == f"{TILES[0]}|2026"
    assert reqs[0].tags[RANGE_END] == f"{TILES[1]}|2026"


def test_deployment_picks_its_source_from_the_environment() -> None:
    from agrifm_pipeline.definitions import default_resources
    from agrifm_pipeline.errors import SettingsError

    res = default_resources(
        {"AGRIFM_PIPELINE_S2_BACKEND": "gee", "AGRIFM_PIPELINE_GEE_PROJECT": "p1"}
    )
    assert res["s2"].backend == "gee" and res["s2"].gee_project == "p1"
    assert default_resources({})["s2"].identity() == {"name": "local", "root": "data/s2_sample"}
    with pytest.raises(SettingsError, match="AGRIFM_PIPELINE_S2_BACKEND"):
        default_resources({"AGRIFM_PIPELINE_S2_BACKEND": "sentinelhub"})
