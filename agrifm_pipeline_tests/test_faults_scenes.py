"""Issue 17, item 5: changed source data is noticed.

A frame stack records the scenes it was made from (``scene_index``: id -> stamp);
the stale sensor lists each tile-year's current scenes from the source's headers
and compares. A changed, added or removed scene makes exactly the tile-years it
touches stale, with that reason. Overwriting a scene in the local root used to leave
the sensor saying "every materialised tile-year is current". Earth Engine (the real
client against the stand-in) is listed many tile-years per request, a share of them
per sensor tick, round all of them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from shapely.geometry import box, mapping

from agrifm_pipeline.cli import main as cli_main
from agrifm_pipeline.definitions import build_defs
from agrifm_pipeline.defs.audit import audit_rows
from agrifm_pipeline.defs.partitions import tile_year_key
from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
from agrifm_pipeline.defs.resources import DEFAULT_RERUN_ON, RERUN_CAUSES, S2Source
from agrifm_pipeline.defs.sensors import stale_partitions_sensor
from agrifm_pipeline.defs.staleness import current_fingerprints, source_scenes, stage_stores
from agrifm_pipeline.frames import frame_windows
from agrifm_pipeline.lineage import explain_scene_changes, scene_index_record
from agrifm_pipeline.providers.base import BatchSceneIndexed, CloudMask, SceneIndexed
from agrifm_pipeline.providers.gee import LIST_BATCH
from agrifm_pipeline.providers.local import LocalProvider
from agrifm_pipeline.scene_listing import BatchedListing
from agrifm_pipeline.settings import GEE_LIST_PER_TICK_ENV
from agrifm_pipeline.specs import SensorSpec
from agrifm_pipeline.tiles import Tile

from .ee_standin import Granule, StandIn, catalog_from_directory, ee_standin, redelivery
from .ee_standin import _granule as _standin_granule
from .pipeline_helpers import REPO_ROOT, TILES, YEARS, Pipeline, make_resources
from .test_provider_gee import _provider, _service_account_key
from .test_staleness import ALL, Ticker

SAMPLE = REPO_ROOT / "data" / "s2_sample"
WEST, EAST = TILES  # the sample reaches 4 px into the western tile, 60 px into the eastern one


def _resources(tmp_path: Path, root: Path, **tile_year: Any) -> dict[str, Any]:
    """The pipeline's resources on ``root``; re-running a changed source is opted into
    (``rerun_on`` holds it by default: see the first test)."""
    tile_year.setdefault("rerun_on", list(RERUN_CAUSES))
    return {**make_resources(tmp_path, **tile_year), "s2": S2Source(local_root=str(root))}


@pytest.fixture
def scenes_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Pipeline, Ticker, Path]]:
    """The 2 x 2 tile-years made from a copy of the sample that the test may edit."""
    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT_MIN_BYTES", "1000")
    root = tmp_path / "scenes"
    shutil.copytree(SAMPLE, root)
    with dg.instance_for_test() as instance:
        res = _resources(tmp_path, root)
        instance.add_dynamic_partitions("tiles", TILES)
        pipe = Pipeline(tmp_path, res, build_defs(res), instance)
        assert pipe.materialise(TILES, YEARS).success
        yield pipe, Ticker(pipe), root


def _write_scene(root: Path, src_date: str, date: str, col0: int = 0, dx: float = 0.0) -> None:
    """A new scene ``date`` (and its mask) from ``src_date``'s, columns ``col0`` onwards,
    moved ``dx`` metres east."""
    for sub in ("", "masks/"):
        with rasterio.open(SAMPLE / f"{sub}{src_date}.tif") as src:
            arr, profile = src.read()[:, :, col0:], dict(src.profile)
            descriptions, t = src.descriptions, src.transform
        profile.update(
            width=arr.shape[2], blockxsize=arr.shape[2],
            transform=Affine(t.a, t.b, t.c + col0 * t.a + dx, t.d, t.e, t.f),
        )  # fmt: skip
        with rasterio.open(root / f"{sub}{date}.tif", "w", **profile) as dst:
            dst.write(arr)
            dst.descriptions = descriptions


def _tick_reason(ticker: Ticker, resources: dict[str, Any]) -> tuple[list[dg.RunRequest], str]:
    ctx = dg.build_sensor_context(
        instance=ticker.pipe.instance, cursor=ticker.cursor, resources=resources
    )
    result = stale_partitions_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    ticker.cursor = result.cursor
    skip = result.skip_reason.skip_message if result.skip_reason else ""
    return list(result.run_requests or []), str(skip)


def test_overwritten_scene_makes_its_tile_years_stale_with_the_scene_named(
    scenes_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    pipe, ticker, root = scenes_world
    res = _resources(tmp_path, root)
    assert _tick_reason(ticker, res) == ([], "every materialised tile-year is current (4)")
    # Overwritten in place, as an operator re-exporting one date would.
    path = root / "2019-05-16.tif"
    with rasterio.open(path, "r+") as ds:
        ds.write(np.where(ds.read() > 0, ds.read() + 7, 0).astype("uint16"))
    # By default a changed source is reported, not re-run (rerun_on leaves "source" out).
    held, reason = _tick_reason(ticker, _resources(tmp_path, root, rerun_on=list(DEFAULT_RERUN_ON)))
    assert held == [] and "2 stale tile-year(s) held" in reason and "source not in" in reason
    reqs, _ = _tick_reason(ticker, res)
    assert ticker.covered(reqs) == {(a, t, 2019) for a in ALL for t in TILES}  # not 2018
    assert all("scene 2019-05-16.tif changed" in r.tags["agrifm/reason"] for r in reqs)
    # The audit names it too, for the frames and what was made from them.
    scenes = source_scenes(res["s2"], res["tile_year"])
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    rows = audit_rows(
        pipe.instance, stage_stores(pipe.storage), current, unknown=unknown, scenes=scenes.lister
    )
    stale = {(r.asset, r.tile, r.year): r.why for r in rows if r.status == "stale"}
    frames = {(a, t, y) for a, t, y in stale if a == "s2_frame_stack"}
    assert frames == {("s2_frame_stack", t, 2019) for t in TILES}
    assert stale[("s2_frame_stack", WEST, 2019)] == "scene 2019-05-16.tif changed"
    assert all(r.status == "current" for r in rows if r.year == 2018)
    # `agrifm-pipeline audit` (where the held message sends users) says the same.
    monkeypatch.setenv("DAGSTER_HOME", pipe.instance.root_directory)
    monkeypatch.setattr("agrifm_pipeline.cli.pipeline_resources", lambda *_: res)
    assert cli_main(["audit", "--store", pipe.storage.root, "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {(r["asset"], r["tile"], r["year"]) for r in printed if r["status"] == "stale"} == set(
        stale
    )
    assert all(r["why"] for r in printed if r["status"] != "current")
    # Re-made: the new frames record the new stamp, and the sensor settles.
    assert ticker.execute(reqs, res) == [True]
    assert _tick_reason(ticker, res) == ([], "every materialised tile-year is current (4)")
    made = pipe.storage.store("s2_frame_stack").lineage(2019, EAST)["acquisition"]
    assert made["scene_index"]["scenes"]["2019-05-16.tif"].startswith(f"{path.stat().st_size}:")


def test_added_and_removed_scenes_touch_exactly_the_tiles_they_cover(
    scenes_world, tmp_path: Path
) -> None:
    _, ticker, root = scenes_world
    res = _resources(tmp_path, root)
    # A new date over the eastern part of the sample only: the western tile is not touched.
    _write_scene(root, "2019-06-10", "2019-06-05", col0=8)
    # And one 30 km away, over no tile at all.
    _write_scene(root, "2019-06-10", "2019-06-06", dx=30_000.0)
    reqs, _ = _tick_reason(ticker, res)
    assert ticker.covered(reqs) == {(a, EAST, 2019) for a in ALL}
    assert all(r.tags["agrifm/reason"].endswith("scene 2019-06-05.tif added") for r in reqs)
    assert ticker.execute(reqs, res) == [True]
    assert _tick_reason(ticker, res)[0] == []
    # A removed scene (with its mask) touches both tiles of its year.
    (root / "2019-01-01.tif").unlink()
    (root / "masks" / "2019-01-01.tif").unlink()
    reqs, _ = _tick_reason(ticker, res)
    assert ticker.covered(reqs) == {(a, t, 2019) for a in ALL for t in TILES}
    assert all("scene 2019-01-01.tif removed" in r.tags["agrifm/reason"] for r in reqs)


def test_a_changed_mask_or_cloud_fraction_is_a_changed_scene(tmp_path: Path) -> None:
    root = tmp_path / "scenes"
    shutil.copytree(SAMPLE, root)
    area, windows = Tile.from_id(EAST).geobox(10), frame_windows(2019, 4)
    provider = LocalProvider(root)
    assert isinstance(provider, SceneIndexed)
    before = provider.scene_index(area, windows, SensorSpec())
    assert "2019-05-16.tif" in before and "2018-12-02.tif" not in before  # other year
    # The fetch records the same index it lists.
    stack = provider.fetch(area, windows, SensorSpec(), CloudMask())
    assert stack.record()["scene_index"] == scene_index_record(before)
    with rasterio.open(root / "masks" / "2019-05-16.tif", "r+") as ds:
        ds.write(np.full((ds.height, ds.width), 9, dtype="uint8"), 2)
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["dates"]:
        if entry["date"] == "2019-06-10":
            entry["cloud_fraction"] = 0.9
    (root / "manifest.json").write_text(json.dumps(manifest))
    after = LocalProvider(root).scene_index(area, windows, SensorSpec())
    assert explain_scene_changes(before, after) == [
        "scene 2019-05-16.tif changed",
        "scene 2019-06-10.tif changed",
    ]


def test_stac_items_are_known_by_id_and_updated_time(tmp_path: Path) -> None:
    """STAC: the item id and its ``updated`` time; an item elsewhere is not the tile's."""
    near, far = [4.0585, 50.7431, 4.0677, 50.7489], [5.0, 50.0, 5.01, 50.01]

    def save(updated: str) -> LocalProvider:
        catalog = pystac.Catalog(id="c", description="items")
        for name, bbox in (("S2A_near", near), ("S2A_far", far)):
            item = pystac.Item(
                name, mapping(box(*bbox)), bbox, dt.datetime(2019, 5, 16, tzinfo=dt.UTC),
                {"updated": updated},
            )  # fmt: skip
            catalog.add_item(item)
        catalog.normalize_and_save(str(tmp_path / "stac"), pystac.CatalogType.SELF_CONTAINED)
        return LocalProvider(tmp_path / "stac")

    area, windows = Tile.from_id(EAST).geobox(10), frame_windows(2019, 4)
    first = save("2024-01-01T00:00:00Z").scene_index(area, windows, SensorSpec())
    assert first == {"S2A_near": "updated 2024-01-01T00:00:00+00:00"}
    again = save("2025-03-01T00:00:00Z").scene_index(area, windows, SensorSpec())
    assert explain_scene_changes(first, again) == ["scene S2A_near changed"]


# --- Earth Engine: granules listed again, many tile-years per request ----------------------


@dataclass
class EEWorld:
    pipe: Pipeline
    ticker: Ticker
    standin: StandIn
    key: str  # the service-account key file the gee source signs in with

    def resources(self, **tile_year: Any) -> dict[str, Any]:
        """The pipeline on the stand-in; every cause re-run unless ``rerun_on`` is given."""
        tile_year.setdefault("rerun_on", list(RERUN_CAUSES))
        s2 = S2Source(
            backend="gee",
            gee_project=self.standin.project,
            gee_service_account_key=self.key,
            gee_endpoint=self.standin.url,
            gee_slots_dir=str(self.pipe.root / "slots"),
        )
        return {**make_resources(self.pipe.root, **tile_year), "s2": s2}

    def listings(self) -> int:
        """``value:compute`` requests the stand-in has answered (or refused) so far."""
        return len(self.standin.bodies("value:compute"))

    def recorded(self, tile: str, year: int) -> dict[str, str]:
        lineage = self.pipe.storage.store("s2_frame_stack").lineage(year, tile)
        return dict(lineage["acquisition"]["scene_index"]["scenes"])

    def materialise(self, t0: str, y0: int, t1: str, y1: int) -> None:
        """Frame stacks (only) of the tile-year range, from the stand-in."""
        job = build_defs(self.resources()).resolve_job_def("embed_tile_years")
        result = job.execute_in_process(
            instance=self.pipe.instance,
            tags={RANGE_START: str(tile_year_key(t0, y0)), RANGE_END: str(tile_year_key(t1, y1))},
            asset_selection=[dg.AssetKey("s2_frame_stack")],
        )
        assert result.success


@pytest.fixture
def ee_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EEWorld]:
    """The 2 x 2 tile-years' frame stacks fetched from Earth Engine (the stand-in)."""
    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT_MIN_BYTES", "1000")
    monkeypatch.delenv(GEE_LIST_PER_TICK_ENV, raising=False)
    with ee_standin(catalog=catalog_from_directory()) as s, dg.instance_for_test() as instance:
        key = _service_account_key(tmp_path / "key.json", s.url + "/token")
        res = make_resources(tmp_path)
        instance.add_dynamic_partitions("tiles", TILES)
        world = EEWorld(Pipeline(tmp_path, res, build_defs(res), instance), None, s, key)  # type: ignore[arg-type]
        world.ticker = Ticker(world.pipe)
        world.materialise(TILES[0], 2018, TILES[-1], 2019)
        yield world


def _east_only_granule(tmp_path: Path, date: str) -> Granule:
    """A granule of a new date over the eastern tile only (the sample from column 8 on)."""
    root = tmp_path / "ingested"
    (root / "masks").mkdir(parents=True, exist_ok=True)
    _write_scene(root, "2019-06-10", date, col0=8)
    day = dt.date.fromisoformat(date)
    return _standin_granule(root, day, 3.0, "31UES", dt.datetime(2024, 3, 1, tzinfo=dt.UTC))


def _reasons(requests: list[dg.RunRequest]) -> str:
    return " ".join(r.tags["agrifm/reason"] for r in requests)


def test_earth_engine_granules_redelivered_added_or_removed_make_exactly_their_tile_years_stale(
    ee_world: EEWorld, tmp_path: Path
) -> None:
    w, s = ee_world, ee_world.standin
    res = w.resources()
    # Unchanged: the listing is exactly what each fetch recorded; 4 tile-years, one request.
    before = w.listings()
    reqs, why = _tick_reason(w.ticker, res)
    assert reqs == [] and why.startswith(
        "every materialised tile-year is current (4); source scenes: Earth Engine listed 4 of 4 "
        "tile-year(s) this tick in 1 request(s)"
    )
    assert w.listings() - before == 1
    assert all(v.startswith("generated ") for v in w.recorded(EAST, 2019).values())
    # A granule of 2019 delivered again (a newer generation): both tiles of 2019, not 2018.
    old = next(g for g in s.catalog if g.index.startswith("20190516"))
    new = redelivery(old, dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    s.add_granules(new)
    reqs, _ = _tick_reason(w.ticker, res)
    assert w.ticker.covered(reqs) == {("s2_frame_stack", t, 2019) for t in TILES}
    assert all(
        f"scene {new.index} added" in r.tags["agrifm/reason"]
        and f"scene {old.index} removed" in r.tags["agrifm/reason"]
        for r in reqs
    )
    assert w.ticker.execute(reqs, res) == [True]
    assert _tick_reason(w.ticker, res)[0] == []  # made again: it records the new delivery
    assert new.index in w.recorded(WEST, 2019) and old.index not in w.recorded(WEST, 2019)
    # A granule ingested over the eastern tile only: the western tile stays current.
    east = _east_only_granule(tmp_path, "2019-06-05")
    s.add_granules(east)
    reqs, _ = _tick_reason(w.ticker, res)
    assert w.ticker.covered(reqs) == {("s2_frame_stack", EAST, 2019)}
    assert _reasons(reqs).endswith(f"scene {east.index} added")
    assert w.ticker.execute(reqs, res) == [True]
    assert _tick_reason(w.ticker, res)[0] == []
    # A granule withdrawn from 2018: both tiles of 2018.
    gone = sorted(w.recorded(EAST, 2018))[0]
    s.remove_granules(gone)
    reqs, _ = _tick_reason(w.ticker, res)
    assert w.ticker.covered(reqs) == {("s2_frame_stack", t, 2018) for t in TILES}
    assert all(r.tags["agrifm/reason"].endswith(f"scene {gone} removed") for r in reqs)
    # The audit lists every tile-year too, in one request, and names the scene.
    before = w.listings()
    scenes = source_scenes(res["s2"], res["tile_year"])
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    rows = audit_rows(
        w.pipe.instance,
        stage_stores(w.pipe.storage),
        current,
        unknown=unknown,
        scenes=scenes.lister,
    )
    assert w.listings() - before == 1 and not scenes.failures
    stale = {(r.tile, r.year): r.why for r in rows if r.status == "stale"}
    assert stale == {(t, 2018): f"scene {gone} removed" for t in TILES}


def test_earth_engine_lists_n_tile_years_in_ceil_n_over_batch_requests(tmp_path: Path) -> None:
    """Many tile-years per request, each answered as its own listing (and as fetch records)."""
    tiles = [f"32631_1280m_E{c:04d}_N4392" for c in range(430, 470)]  # 40 tiles, 3 years
    keys = [(t, y) for t in tiles for y in (2018, 2019, 2020)]
    requests = [(k, Tile.from_id(k[0]).geobox(10), frame_windows(k[1], 8)) for k in keys]
    sensor = SensorSpec()
    with ee_standin(catalog=catalog_from_directory(redelivered=("2019-05-11",))) as s:
        provider = _provider(s, tmp_path)
        assert isinstance(provider, BatchSceneIndexed)
        provider.initialise()
        listed = {}
        for batch, n in ((LIST_BATCH, len(keys)), (7, 20)):
            provider.list_batch = batch
            before = len(s.bodies("value:compute"))
            listed[batch] = provider.scene_indexes(requests[:n], sensor)
            assert len(s.bodies("value:compute")) - before == math.ceil(n / batch)
            assert set(listed[batch]) == set(keys[:n])
        found = listed[LIST_BATCH]
        # Each key's answer is that tile-year's own listing, and what its fetch records.
        area = Tile.from_id(EAST).geobox(10)
        stack = provider.fetch(area, frame_windows(2019, 8), sensor, CloudMask())
        assert found[(EAST, 2019)] == provider.scene_index(area, frame_windows(2019, 8), sensor)
        assert scene_index_record(found[(EAST, 2019)]) == stack.record()["scene_index"]
        assert found[(EAST, 2018)] and not found[(tiles[0], 2019)]  # far west: no granule
        # The older delivery of 2019-05-11 is not listed (the fetch does not use it).
        assert sum(k.startswith("20190511") for k in found[(EAST, 2019)]) == 1
        # A granule that becomes clear enough to pass the scene filter appears.
        cloudy = next(g for g in s.catalog if g.index.startswith("20181202"))
        cloudy.props["CLOUDY_PIXEL_PERCENTAGE"] = 10.0
        now = provider.scene_index(area, frame_windows(2018, 8), sensor)
        assert explain_scene_changes(found[(EAST, 2018)], now) == [f"scene {cloudy.index} added"]


def test_earth_engine_listing_stops_when_the_tick_is_up(tmp_path: Path) -> None:
    """The wall-clock cap: batches not started by then wait for the next tick."""
    cfg = make_resources(tmp_path)["tile_year"].resolve()
    keys = [(t, y) for t in TILES for y in YEARS]
    with ee_standin(catalog=catalog_from_directory()) as s:
        provider = _provider(s, tmp_path, list_batch=1)
        listing = BatchedListing(provider, cfg, per_tick=4, tick_s=0.0)
        listing.prefetch(keys)
        assert len(s.bodies("value:compute")) == 1  # the first batch always goes
        assert (listing.n_listed, listing.n_waiting) == (1, 3)
        assert listing.state()["next"] == f"{WEST}|2019"  # where the next tick goes on
        assert listing(WEST, 2018) is not None and listing(WEST, 2019) is None
        assert "3 left for the next tick" in listing.note()


def test_earth_engine_round_robin_and_a_found_change_does_not_flicker(
    ee_world: EEWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, s = ee_world, ee_world.standin
    monkeypatch.setenv(GEE_LIST_PER_TICK_ENV, "2")
    res = w.resources(rerun_on=list(DEFAULT_RERUN_ON))  # a changed source is held, reported
    every = "(up to 2 a tick, AGRIFM_PIPELINE_GEE_LIST_PER_TICK: each is listed every 2 tick(s))"

    def tick() -> tuple[str, dict[str, Any], int]:
        before = w.listings()
        reqs, why = _tick_reason(w.ticker, res)
        assert reqs == [] and every in why
        return why, json.loads(w.ticker.cursor or "{}")["gee_listing"], w.listings() - before

    why, cursor, n = tick()  # the western tile's two years
    assert "listed 2 of 4 tile-year(s) this tick in 1 request(s)" in why and n == 1
    assert why.startswith("every materialised tile-year is current (4)")
    assert cursor == {"next": f"{EAST}|2018", "changed": {}}
    s.add_granules(_east_only_granule(tmp_path, "2019-06-05"))
    held = (
        f"1 stale tile-year(s) held, not re-run automatically: source not in rerun_on ({EAST}|2019"
    )
    why, cursor, n = tick()  # the eastern tile's: found changed
    assert held in why and "3 current" in why and n == 1
    assert cursor["next"] == f"{WEST}|2018" and list(cursor["changed"]) == [f"{EAST}|2019"]
    why, cursor, n = tick()  # the western tile's again: the change is still reported
    assert held in why and "1 found changed earlier, still stale until listed again" in why
    assert list(cursor["changed"]) == [f"{EAST}|2019"] and n == 1
    why, cursor, n = tick()  # listed again, still changed
    assert held in why and "found changed earlier" not in why
    # Made again (a backfill of the held tile-year): current, and forgotten, on the next ticks.
    w.materialise(EAST, 2019, EAST, 2019)
    why, cursor, _ = tick()
    assert why.startswith("every materialised tile-year is current (4)") and not cursor["changed"]
    why, cursor, _ = tick()
    assert why.startswith("every materialised tile-year is current (4)")


def test_earth_engine_listing_failures_are_reported_never_current(
    ee_world: EEWorld, tmp_path: Path
) -> None:
    w, s = ee_world, ee_world.standin
    res = w.resources(rerun_on=list(DEFAULT_RERUN_ON))
    s.add_granules(_east_only_granule(tmp_path, "2019-06-05"))
    held = (
        f"1 stale tile-year(s) held, not re-run automatically: source not in rerun_on ({EAST}|2019"
    )
    assert held in _tick_reason(w.ticker, res)[1]
    # Quota refused on every attempt of the tick's request; then a dropped connection.
    for fail in (lambda: s.fail_next(5, 429, "Too many requests."), lambda: s.drop_next(5)):
        fail()
        reqs, why = _tick_reason(w.ticker, res)
        assert reqs == [] and "source scenes not listed for 4 tile-year(s)" in why
        assert "Earth Engine kept failing the granule lists of 4 tile-year(s) after 2" in why
        assert "listed 0 of 4" in why
        assert held in why  # what was found changed stays stale, not current
        s.failures.clear()
        s.drops = 0
    # A refusal (not retried) in the audit: the tile-years are failures, never compared.
    s.fail_next(1, 403, "Permission denied.")
    scenes = source_scenes(res["s2"], res["tile_year"])
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    audit_rows(
        w.pipe.instance, stage_stores(w.pipe.storage), current, unknown=unknown,
        scenes=scenes.lister,
    )  # fmt: skip
    assert len(scenes.failures) == 4 and "Permission denied" in scenes.note()
    assert "source scenes not listed for 4 tile-year(s)" in scenes.note()
    # Listed again once Earth Engine answers.
    assert held in _tick_reason(w.ticker, res)[1]
