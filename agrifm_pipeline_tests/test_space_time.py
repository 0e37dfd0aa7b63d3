"""Tiles, regions and frame windows."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from pathlib import Path

import geopandas as gpd
import pytest
from shapely.geometry import Polygon, box

from agrifm_pipeline.errors import InputContractError, RegionError
from agrifm_pipeline.frames import frame_windows, range_windows
from agrifm_pipeline.regions import region_tiles_record, tiles_for_region, utm_epsg
from agrifm_pipeline.tiles import Tile

REPO = Path(__file__).resolve().parents[1]

# --- tiles -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tile", [Tile(32631, 8960, 64, 627), Tile(32755, 8960, 30, 700), Tile(32601, 4480, 0, 0)]
)
def test_tile_id_round_trip(tile: Tile) -> None:
    assert Tile.from_id(tile.id) == tile
    assert "|" not in tile.id and "," not in tile.id
    x0, y0, x1, y1 = tile.bounds
    assert x1 - x0 == y1 - y0 == tile.size_m
    assert x0 == tile.col * tile.size_m and y0 == tile.row * tile.size_m


def test_tile_grid_and_chips() -> None:
    tile = Tile(32631, 8960, 64, 627)
    gbox = tile.geobox(10.0)
    assert gbox.shape == (896, 896) and str(gbox.crs) == "EPSG:32631"
    assert gbox.affine.c == 573440.0 and gbox.affine.f == 5626880.0
    chips = tile.chip_geoboxes(224, 10.0)
    assert len(chips) == 16
    assert (
        chips[0].extent.boundingbox.left == 573440.0
        and chips[0].extent.boundingbox.top == 5626880.0
    )
    assert chips[1].extent.boundingbox.left == chips[0].extent.boundingbox.right
    assert chips[4].extent.boundingbox.top == chips[0].extent.boundingbox.bottom
    assert sum(c.shape[0] * c.shape[1] for c in chips) == 896 * 896


@pytest.mark.parametrize(
    "bad", ["32631_8960m_E64_N627", "4326_8960m_E0064_N0627", "x", "32631|8960"]
)
def test_bad_tile_ids(bad: str) -> None:
    with pytest.raises(RegionError):
        Tile.from_id(bad)


# --- regions -----------------------------------------------------------------------------

FLANDERS = box(4.05, 50.74, 4.20, 50.80)


def test_utm_zones() -> None:
    assert utm_epsg(4.06, 50.7) == 32631
    assert utm_epsg(6.01, 50.7) == 32632
    assert utm_epsg(-58.4, -34.6) == 32721
    assert utm_epsg(180.0, 10.0) == 32660
    with pytest.raises(RegionError, match="outside UTM"):
        utm_epsg(10.0, 85.0)


def test_files_in_any_crs_give_the_same_tiles(tmp_path: Path) -> None:
    expected = tiles_for_region(FLANDERS)
    assert expected and {t.epsg for t in expected} == {32631}
    wgs = gpd.GeoDataFrame(geometry=[FLANDERS], crs="EPSG:4326")
    wgs.to_file(tmp_path / "r.geojson", driver="GeoJSON")
    wgs.to_crs("EPSG:3857").to_file(tmp_path / "r.gpkg", driver="GPKG")
    assert tiles_for_region(tmp_path / "r.geojson") == expected
    assert tiles_for_region(tmp_path / "r.gpkg") == expected
    # In its UTM zone, densified edges differ slightly from the WGS84 box: compare as sets of
    # ids from a shape defined in UTM directly instead.
    utm = wgs.to_crs("EPSG:32631")
    assert tiles_for_region(utm) == tiles_for_region(utm.to_crs("EPSG:4326"))


def test_every_tile_meets_the_region_and_neighbours_do_not() -> None:
    tiles = tiles_for_region(FLANDERS)
    region = gpd.GeoSeries([FLANDERS], crs="EPSG:4326").to_crs("EPSG:32631").iloc[0]
    for t in tiles:
        assert box(*t.bounds).intersection(region).area > 0
    cols = [t.col for t in tiles]
    outside = Tile(32631, 8960, max(cols) + 2, tiles[0].row)
    assert box(*outside.bounds).intersection(region).area == 0 and outside not in tiles


def test_region_across_two_zones() -> None:
    tiles = tiles_for_region(box(5.95, 50.0, 6.05, 50.05))
    assert {t.epsg for t in tiles} == {32631, 32632}


def test_southern_hemisphere() -> None:
    tiles = tiles_for_region(box(-58.5, -34.7, -58.4, -34.6))
    assert {t.epsg for t in tiles} == {32721}


def test_demo_region_covers_the_bundled_sample() -> None:
    tiles = tiles_for_region(REPO / "data" / "regions" / "flanders_demo.geojson")
    assert [t.id for t in tiles] == ["32631_8960m_E0064_N0627"]
    bounds = json.loads((REPO / "data" / "s2_sample" / "manifest.json").read_text())["bounds"]
    x0, y0, x1, y1 = tiles[0].bounds
    assert (
        x0 <= bounds["left"]
        and bounds["right"] <= x1
        and y0 <= bounds["bottom"]
        and bounds["top"] <= y1
    )
    rec = region_tiles_record(REPO / "data" / "regions" / "flanders_demo.geojson", tiles)
    assert rec["n_tiles"] == 1 and rec["zones"] == [32631] and 0.3 < rec["area_km2"] < 0.5


def test_region_errors(tmp_path: Path) -> None:
    with pytest.raises(RegionError, match="outside UTM"):
        tiles_for_region(box(10, 84.5, 11, 85))
    with pytest.raises(RegionError, match="empty"):
        tiles_for_region(Polygon())
    bowtie = Polygon([(4.0, 50.0), (4.1, 50.1), (4.1, 50.0), (4.0, 50.1), (4.0, 50.0)])
    with pytest.raises(RegionError, match=r"invalid geometry.*make_valid"):
        tiles_for_region(bowtie)
    with pytest.raises(RegionError, match="does not exist"):
        tiles_for_region(tmp_path / "missing.geojson")
    junk = tmp_path / "junk.geojson"
    junk.write_text("this is not geojson")
    with pytest.raises(RegionError, match=r"junk\.geojson cannot be read"):
        tiles_for_region(junk)
    nocrs = tmp_path / "nocrs.gpkg"
    with pytest.warns(UserWarning, match="'crs' was not provided"):  # the point of the file
        gpd.GeoDataFrame(geometry=[FLANDERS]).to_file(nocrs, driver="GPKG")
    with pytest.raises(RegionError, match="no CRS"):
        tiles_for_region(nocrs)


# --- frame windows -----------------------------------------------------------------------


def test_peer_boundaries_2022() -> None:
    wins = frame_windows(2022, 8)
    starts = [w.start.isoformat()[5:] for w in wins]
    assert starts == ["01-01", "02-15", "04-02", "05-17", "07-02", "08-17", "10-01", "11-16"]
    assert wins[-1].end == dt.date(2023, 1, 1)


def test_leap_year_follows_the_floor_rule() -> None:
    wins = frame_windows(2020, 8)
    # 366 days: boundaries at floor(366 * i / 8) = 0, 45, 91, 137, 183, 228, 274, 320.
    offsets = [(w.start - dt.date(2020, 1, 1)).days for w in wins]
    assert offsets == [0, 45, 91, 137, 183, 228, 274, 320]
    assert wins[1].start == dt.date(2020, 2, 15) and wins[2].start == dt.date(2020, 4, 1)


@pytest.mark.parametrize(
    ("year", "n"), [(2021, 1), (2021, 365), (2020, 366), (2019, 5), (2019, 12)]
)
def test_windows_are_contiguous_and_end_exclusive(year: int, n: int) -> None:
    wins = frame_windows(year, n)
    assert (
        len(wins) == n
        and wins[0].start == dt.date(year, 1, 1)
        and wins[-1].end == dt.date(year + 1, 1, 1)
    )
    assert all(a.end == b.start for a, b in itertools.pairwise(wins))
    assert all(w.days >= 1 for w in wins)
    assert not wins[0].contains(wins[0].end)


def test_arbitrary_range() -> None:
    wins = range_windows("2019-03-01", "2019-03-11", 3)
    assert [(w.start.day, w.end.day) for w in wins] == [(1, 4), (4, 7), (7, 11)]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: range_windows("2019-03-10", "2019-03-10", 1), "empty"),
        (lambda: range_windows("2019-03-10", "2019-03-01", 1), "empty"),
        (lambda: frame_windows(2016, 8), "2017"),
        (lambda: range_windows("2019-03-01", "2019-03-05", 5), "more than the 4 days"),
        (lambda: frame_windows(2020, 0), ">= 1"),
        (lambda: frame_windows(2021, 366), "more than the 365 days"),
    ],
)
def test_frame_errors(call, match: str) -> None:
    with pytest.raises(InputContractError, match=match):
        call()
