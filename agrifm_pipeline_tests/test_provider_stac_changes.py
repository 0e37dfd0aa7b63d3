"""Issue 28, item 5: the stale sensor knows a changed STAC item and re-makes exactly the
tile-years it intersects, through the pipeline, against the real STAC API.

The 2 x 2 tile-years' frame stacks are made from the test archive (a collection of its
own, edited here); the sensor lists each tile-year with a search of its own (the
provider lists as Earth Engine does, a share per tick) and compares with the scene index
each frame stack recorded. A reprocessed item (same id, newer ``updated`` and generation)
is a changed scene, a new granule over one tile touches that tile only, a withdrawn
one the tile-years it covered. A run reads the items the listing left in the store's
item cache: it does not search again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from agrifm_pipeline.definitions import build_defs
from agrifm_pipeline.defs.partitions import tile_year_key
from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
from agrifm_pipeline.defs.resources import RERUN_CAUSES, S2Source
from agrifm_pipeline.defs.sensors import stale_partitions_sensor
from agrifm_pipeline.settings import GEE_LIST_PER_TICK_ENV

from .pipeline_helpers import TILES, Pipeline, make_resources
from .stac_testbed import (
    Archive,
    CogOptions,
    FaultFront,
    ItemSpec,
    StacArchive,
    StacBed,
    crop_layers,
    earth_search_id,
    platform_of,
    scene_layers,
)
from .test_staleness import Ticker

WEST, EAST = TILES
COLLECTION = "c1-changes"
DATES = ("2018-11-17", "2018-12-12", "2019-04-16", "2019-05-16", "2019-07-25")


@dataclass
class StacWorld:
    pipe: Pipeline
    ticker: Ticker
    bed: StacBed
    front: FaultFront
    archive: Archive
    sample: StacArchive

    def resources(self) -> dict[str, Any]:
        s2 = S2Source(
            backend="stac",
            stac_api_url=self.front.url,
            stac_collection=COLLECTION,
            stac_item_cache=str(self.pipe.root / "item-cache"),
        )
        return {**make_resources(self.pipe.root, rerun_on=list(RERUN_CAUSES)), "s2": s2}

    def searches(self) -> int:
        return len(self.front.requests(r"^/search"))

    def recorded(self, tile: str, year: int) -> dict[str, str]:
        lineage = self.pipe.storage.store("s2_frame_stack").lineage(year, tile)
        return dict(lineage["acquisition"]["scene_index"]["scenes"])

    def tick(self) -> tuple[list[dg.RunRequest], str]:
        ctx = dg.build_sensor_context(
            instance=self.pipe.instance, cursor=self.ticker.cursor, resources=self.resources()
        )
        result = stale_partitions_sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        self.ticker.cursor = result.cursor
        skip = result.skip_reason.skip_message if result.skip_reason else ""
        return list(result.run_requests or []), str(skip)

    def publish(self, *specs: ItemSpec) -> list[dict[str, Any]]:
        self.archive.items, self.archive.files = [], {}
        made = [self.archive.add(s) for s in specs]
        self.archive.publish(self.bed.s3, self.bed.api, [])
        return made


@pytest.fixture
def stac_world(
    stac_bed: StacBed,
    stac_archive: StacArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[StacWorld]:
    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT_MIN_BYTES", "1000")
    monkeypatch.delenv(GEE_LIST_PER_TICK_ENV, raising=False)
    archive = Archive(tmp_path / "cogs", stac_archive.bucket, CogOptions(block_size=256))
    collection = archive.collection(COLLECTION)
    for date in DATES:
        sc = stac_archive.scenes[date]
        craft = platform_of(date)
        archive.add(ItemSpec(sc, COLLECTION, earth_search_id(craft, "31UES", sc.when),
                             platform=craft))  # fmt: skip
    archive.publish(stac_bed.s3, stac_bed.api, [collection])
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tiles", TILES)
        res = make_resources(tmp_path)
        pipe = Pipeline(tmp_path, res, build_defs(res), instance)
        world = StacWorld(pipe, Ticker(pipe), stac_bed, stac_bed.front(), archive, stac_archive)
        job = build_defs(world.resources()).resolve_job_def("embed_tile_years")
        result = job.execute_in_process(
            instance=instance,
            tags={RANGE_START: str(tile_year_key(WEST, 2018)),
                  RANGE_END: str(tile_year_key(EAST, 2019))},
            asset_selection=[dg.AssetKey("s2_frame_stack")],
        )  # fmt: skip
        assert result.success
        yield world


def _reasons(requests: list[dg.RunRequest]) -> str:
    return " ".join(r.tags["agrifm/reason"] for r in requests)


def test_a_changed_added_or_removed_item_remakes_exactly_its_tile_years(
    stac_world: StacWorld,
) -> None:
    w = stac_world
    frames = "s2_frame_stack"
    assert w.searches() == 4  # one search per tile-year
    # Nothing changed: each tile-year listed with a search of its own, all current.
    reqs, why = w.tick()
    assert reqs == [] and why.startswith(
        "every materialised tile-year is current (4); source scenes: Earth Search listed 4 of "
        "4 tile-year(s) this tick in 4 request(s)"
    ), why
    assert w.searches() == 8
    stamps = w.recorded(EAST, 2019)
    assert len(stamps) == 3 and all(v.startswith("updated ") for v in stamps.values())
    # An item of 2019 reprocessed under the same id: both tiles of 2019, not 2018.
    sc = w.sample.scenes["2019-05-16"]
    same_id = earth_search_id(platform_of("2019-05-16"), "31UES", sc.when)
    (new,) = w.publish(ItemSpec(
        sc, COLLECTION, same_id, platform=platform_of("2019-05-16"), baseline="05.11",
        generation=dt.datetime(2025, 2, 1, tzinfo=dt.UTC),
        updated=dt.datetime(2025, 2, 2, tzinfo=dt.UTC),
    ))  # fmt: skip
    reqs, _ = w.tick()
    assert w.ticker.covered(reqs) == {(frames, t, 2019) for t in TILES}
    assert all(r.tags["agrifm/reason"].endswith(f"scene {same_id} changed") for r in reqs)
    before = w.searches()
    assert w.ticker.execute(reqs, w.resources()) == [True]
    assert w.searches() == before  # the run read the items the listing cached
    assert w.recorded(WEST, 2019)[same_id].startswith("updated 2025-02-02")
    assert w.tick()[0] == []
    # A granule over the eastern tile only (the sample from column 8 on): that tile alone.
    sc = w.sample.scenes["2019-06-20"]
    east_only = earth_search_id("sentinel-2b", "31UES", sc.when)
    w.publish(ItemSpec(sc, COLLECTION, east_only, platform="sentinel-2b",
                       layers=crop_layers(scene_layers(sc, 1000), 8, 64)))  # fmt: skip
    reqs, _ = w.tick()
    assert w.ticker.covered(reqs) == {(frames, EAST, 2019)}
    assert _reasons(reqs).endswith(f"scene {east_only} added")
    assert w.ticker.execute(reqs, w.resources()) == [True]
    assert w.tick()[0] == []
    # An item of 2018 withdrawn: both tiles of 2018.
    gone = earth_search_id(platform_of("2018-12-12"), "31UES", w.sample.scenes["2018-12-12"].when)
    w.bed.api.delete_items(COLLECTION, [gone])
    reqs, _ = w.tick()
    assert w.ticker.covered(reqs) == {(frames, t, 2018) for t in TILES}
    assert all(r.tags["agrifm/reason"].endswith(f"scene {gone} removed") for r in reqs)
    assert new["id"] == same_id
