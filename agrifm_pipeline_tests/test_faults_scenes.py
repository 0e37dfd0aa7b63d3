"""Issue 17, item 5: changed source data is noticed.

A frame stack records the scenes it was made from (``scene_index``: id -> stamp);
the stale sensor lists each tile-year's current scenes from the source's headers
and compares. A changed, added or removed scene makes exactly the tile-years it
touches stale, with that reason. Overwriting a scene in the local root used to leave
the sensor saying "every materialised tile-year is current".
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
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
from agrifm_pipeline.defs.resources import DEFAULT_RERUN_ON, RERUN_CAUSES, S2Source
from agrifm_pipeline.defs.staleness import (
    current_fingerprints,
    source_scenes,
    stage_stores,
    stale_partitions_sensor,
)
from agrifm_pipeline.frames import frame_windows
from agrifm_pipeline.lineage import explain_scene_changes, scene_index_record
from agrifm_pipeline.providers.base import CloudMask, SceneIndexed
from agrifm_pipeline.providers.local import LocalProvider
from agrifm_pipeline.specs import SensorSpec
from agrifm_pipeline.tiles import Tile

from .pipeline_helpers import REPO_ROOT, TILES, YEARS, Pipeline, make_resources
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


def test_earth_engine_records_the_granules_it_used(tmp_path: Path) -> None:
    """Earth Engine: each kept granule's id and generation time in the record; the sensor
    does not list Earth Engine and says so."""
    from .ee_standin import ee_standin
    from .test_provider_gee import _provider

    area = Tile.from_id(EAST).geobox(10)
    with ee_standin() as s:
        provider = _provider(s, tmp_path)
        record = provider.fetch(area, frame_windows(2019, 4), SensorSpec(), CloudMask()).record()
    scenes = record["scene_index"]["scenes"]
    acquisitions = {s for f in record["frames"] for s in f["scenes"]}
    assert scenes and len(scenes) >= len(acquisitions) and record["scene_index"]["digest"]
    assert all(v.startswith("generated ") and v != "generated None" for v in scenes.values())
    assert not isinstance(provider, SceneIndexed)
    why = source_scenes(S2Source(backend="gee"), make_resources(tmp_path)["tile_year"]).note()
    assert "source scenes not compared: Earth Engine is not listed" in why
