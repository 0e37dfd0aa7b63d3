"""Regions that used to explode into thousands of tiles, or be cut silently (issue 17, item 3),
and coordinates that cannot be degrees (item 6)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import geopandas as gpd
import pytest
import shapely
import shapely.affinity
from pyproj import Transformer
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box

from agrifm_pipeline import regions as regions_module
from agrifm_pipeline.errors import RegionError
from agrifm_pipeline.regions import region_tiles_record, tiles_for_region
from agrifm_pipeline.registry import RegionChange, RegionRegistry, region_id
from agrifm_pipeline.settings import DEFAULT_MAX_REGION_TILES, MAX_REGION_TILES_ENV
from agrifm_pipeline.tiles import Tile, tile_size_m

ZONE_60_AND_1 = {32760, 32701}  # southern hemisphere either side of 180°


def _fiji_box_utm(half_m: float = 2000.0) -> gpd.GeoDataFrame:
    """A square centred on 180° E, 17° S, saved in EPSG:32760 (zone 60 south)."""
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32760", always_xy=True).transform(180.0, -17.0)
    square = box(x - half_m, y - half_m, x + half_m, y + half_m)
    return gpd.GeoDataFrame(geometry=[square], crs="EPSG:32760")


def _in_crs(tiles: list[Tile], crs: str) -> gpd.GeoSeries:
    """The tiles' squares in one CRS (each from its own zone)."""
    return gpd.GeoSeries(
        [gpd.GeoSeries([box(*t.bounds)], crs=t.crs).to_crs(crs).iloc[0] for t in tiles], crs=crs
    )


def test_box_at_the_antimeridian_in_utm_gives_its_few_tiles(tmp_path: Path) -> None:
    """It used to become 8,640 tiles in all 60 zones."""
    region = _fiji_box_utm()
    path = tmp_path / "fiji.geojson"
    region.to_file(path, driver="GeoJSON")
    tiles = tiles_for_region(path)
    assert {t.epsg for t in tiles} == ZONE_60_AND_1
    assert 2 <= len(tiles) <= 8  # 4 km across 180°: at most 2 x 2 per zone
    area = region.geometry.iloc[0]
    squares = _in_crs(tiles, "EPSG:32760")
    # Every tile meets the region, and together they cover it.
    assert all(sq.intersection(area).area > 0 for sq in squares)
    assert area.difference(shapely.union_all(squares.values)).area < 1e-6 * area.area


def test_the_same_box_in_wgs84_gives_the_same_tiles() -> None:
    utm = _fiji_box_utm()
    wgs = utm.to_crs("EPSG:4326")
    lons = [x for x, _ in wgs.geometry.iloc[0].exterior.coords]
    assert min(lons) < -179.9 and max(lons) > 179.9  # vertices on both sides of 180°
    assert tiles_for_region(wgs) == tiles_for_region(utm)


def test_fiji_like_region_in_wgs84_crossing_180() -> None:
    """4° x 3° around 180°: vertices on both sides, or cut at 180° as RFC 7946 asks."""
    crossing = Polygon([(177.0, -19.0), (-179.0, -19.0), (-179.0, -16.0), (177.0, -16.0)])
    cut = MultiPolygon([box(177.0, -19.0, 180.0, -16.0), box(-180.0, -19.0, -179.0, -16.0)])
    tiles = tiles_for_region(gpd.GeoDataFrame(geometry=[crossing], crs="EPSG:4326"))
    assert tiles == tiles_for_region(gpd.GeoDataFrame(geometry=[cut], crs="EPSG:4326"))
    assert {t.epsg for t in tiles} == ZONE_60_AND_1
    # About the region's area in tiles (plus a ring of edge tiles), not the world's.
    area_m2 = gpd.GeoSeries([cut], crs="EPSG:4326").to_crs("EPSG:32760").area.iloc[0]
    assert area_m2 / 8960**2 < len(tiles) < 1.15 * area_m2 / 8960**2
    west = [t for t in tiles if t.epsg == 32760]
    east = [t for t in tiles if t.epsg == 32701]
    assert len(west) > 2 * len(east) > 0  # 3° of it lie west of 180°, 1° east


def test_longitudes_beyond_180_are_refused_with_the_fix() -> None:
    """It used to be cut silently to the 2 tiles west of 180°."""
    with pytest.raises(RegionError) as err:
        tiles_for_region(box(179.9, -17.1, 180.1, -17.0))
    msg = str(err.value)
    assert "longitude 180.1" in msg and "[-180, 180]" in msg and "-179.900" in msg


def _geojson(path: Path, ring: list[tuple[float, float]], crs: str | None = None) -> Path:
    doc: dict = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {},
                "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
            }
        ],
    }
    if crs is not None:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def test_projected_geojson_without_crs_says_so_and_how_to_declare_it(tmp_path: Path) -> None:
    """It used to fail with "reaches latitude 5622000.000"."""
    ring = [(574000, 5618000), (582000, 5618000), (582000, 5626000), (574000, 5626000)]
    bare = _geojson(tmp_path / "utm.geojson", [*ring, ring[0]])
    with pytest.raises(RegionError) as err:
        tiles_for_region(bare)
    msg = str(err.value)
    assert str(bare) in msg and "look projected" in msg and "latitude 5622" not in msg
    assert '"crs"' in msg and "urn:ogc:def:crs:EPSG::" in msg
    # Following the advice works.
    declared = _geojson(
        tmp_path / "utm_declared.geojson", [*ring, ring[0]], crs="urn:ogc:def:crs:EPSG::32631"
    )
    assert [t.id for t in tiles_for_region(declared)] == ["32631_8960m_E0064_N0627"]


def test_projected_geometry_given_as_wgs84_says_how_to_give_its_crs() -> None:
    with pytest.raises(RegionError, match=r"look projected.*GeoDataFrame\(geometry=\[geom\]"):
        tiles_for_region(box(574000, 5618000, 582000, 5626000))


# --- the tile limit ----------------------------------------------------------------------

FLANDERS = box(4.05, 50.74, 4.20, 50.80)


def test_region_over_the_limit_is_refused_with_its_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_REGION_TILES_ENV, raising=False)
    n = len(tiles_for_region(FLANDERS))
    assert n > 1
    with pytest.raises(RegionError, match=rf"would register {n} tiles.*limit of {n - 1}"):
        tiles_for_region(FLANDERS, max_tiles=n - 1)
    monkeypatch.setenv(MAX_REGION_TILES_ENV, str(n - 1))
    with pytest.raises(RegionError, match=MAX_REGION_TILES_ENV):
        tiles_for_region(FLANDERS)
    monkeypatch.setenv(MAX_REGION_TILES_ENV, str(n))  # the user raises the limit
    assert len(tiles_for_region(FLANDERS)) == n


def test_default_limit_is_ten_thousand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_REGION_TILES_ENV, raising=False)
    assert DEFAULT_MAX_REGION_TILES == 10_000
    big = box(0.5, 40.0, 11.5, 50.0)  # about 900 x 1100 km: some 12,000 tiles
    with pytest.raises(RegionError) as err:
        tiles_for_region(big)
    # Refused from its area (a lower bound of its count), before counting its tiles.
    msg = str(err.value)
    count = int(msg.split("would register at least ")[1].split(" tiles")[0].replace(",", ""))
    assert 10_000 < count < 16_000 and "limit of 10,000" in msg


def test_bad_limit_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_REGION_TILES_ENV, "lots")
    with pytest.raises(ValueError, match=rf"{MAX_REGION_TILES_ENV}='lots'"):
        tiles_for_region(FLANDERS)


# The demo's tile geometry (1 chip of 64 px: 640 m tiles), under which the tester's box hung.
DEMO_TILES = {"chip_px": 64, "chips_per_side": 1}
HUGE = box(-20.0, -60.0, 60.0, 70.0)  # Europe and Africa


def _no_tile_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    def counted(*args: object, **kwargs: object) -> None:
        raise AssertionError("tiles were counted for a region its area already refuses")

    monkeypatch.setattr(regions_module, "_cover_blocks", counted)


@pytest.mark.parametrize("geometry", [{}, DEMO_TILES], ids=["design", "demo"])
def test_a_continent_is_refused_from_its_area_before_counting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, geometry: dict[str, int]
) -> None:
    """It used to count every tile first: no answer in 300 s at 640 m (10 s at 8960 m),
    while a region sensor's tick has 60 s."""
    monkeypatch.delenv(MAX_REGION_TILES_ENV, raising=False)
    _no_tile_counting(monkeypatch)
    path = tmp_path / "huge.geojson"
    gpd.GeoDataFrame(geometry=[HUGE], crs="EPSG:4326").to_file(path, driver="GeoJSON")
    t0 = time.perf_counter()
    with pytest.raises(RegionError) as err:
        tiles_for_region(path, **geometry)
    assert time.perf_counter() - t0 < 10.0  # a guard: it takes some 0.05 s
    msg = str(err.value)
    size = tile_size_m(**geometry)
    at_least = int(msg.split("at least ")[1].split(" tiles")[0].replace(",", ""))
    area_m2 = sum(
        gpd.GeoSeries([part], crs="EPSG:4326").to_crs(f"EPSG:{epsg}").area.iloc[0]
        for epsg, part in regions_module._zone_parts(HUGE)
    )
    assert at_least == math.floor(area_m2 / size**2) > 1_000_000
    assert str(path) in msg and f"tiles of {size} m" in msg and "limit of 10,000" in msg
    assert f"raise {MAX_REGION_TILES_ENV} above {at_least}" in msg


def test_the_region_sensor_refuses_a_continent_within_its_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the registry scan each region-sensor tick runs, at the demo's 640 m tiles."""
    monkeypatch.delenv(MAX_REGION_TILES_ENV, raising=False)
    _no_tile_counting(monkeypatch)
    regions = tmp_path / "regions"
    regions.mkdir()
    gpd.GeoDataFrame(geometry=[HUGE], crs="EPSG:4326").to_file(regions / "huge.geojson")
    t0 = time.perf_counter()
    (change,) = RegionRegistry(tmp_path / "store").scan(regions, **DEMO_TILES, scale_m=10.0)
    assert time.perf_counter() - t0 < 10.0
    assert change.status == "error" and change.region == "huge"
    assert "refused from its area" in change.message and MAX_REGION_TILES_ENV in change.message


def test_a_region_at_the_limit_still_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The area bound never refuses a region that fits: one whose count is exactly the
    limit registers, one tile more is refused with its exact count."""
    monkeypatch.delenv(MAX_REGION_TILES_ENV, raising=False)
    region = box(2.0, 49.0, 3.2, 49.8)  # some 90 x 90 km: about 1,100 tiles
    n = len(tiles_for_region(region))
    area_m2 = gpd.GeoSeries([region], crs="EPSG:4326").to_crs("EPSG:32631").area.iloc[0]
    assert n - 200 < area_m2 / 8960**2 < n  # its area alone is just under its count
    assert len(tiles_for_region(region, max_tiles=n)) == n
    with pytest.raises(RegionError, match=rf"would register {n:,} tiles.*limit of {n - 1:,}"):
        tiles_for_region(region, max_tiles=n - 1)
    # Just under the default limit, through the sensor's path, at the design's tiles.
    big = box(1.0, 43.0, 9.0, 50.0)
    monkeypatch.setenv(MAX_REGION_TILES_ENV, "100000")
    n_big = len(tiles_for_region(big))
    monkeypatch.setenv(MAX_REGION_TILES_ENV, str(n_big))
    assert len(tiles_for_region(big)) == n_big


def _brute_force(
    region: shapely.Geometry, size: int
) -> list[Tile]:  # the former count: every tile of every zone part's bounds
    out = []
    region = regions_module._normalise_longitudes(region, "region")  # cut at 180°
    for epsg, part in regions_module._zone_parts(region):
        geom = gpd.GeoSeries([part], crs="EPSG:4326").to_crs(f"EPSG:{epsg}").iloc[0]
        x0, y0, x1, y1 = geom.bounds
        for c in range(max(0, math.floor(x0 / size)), math.floor(x1 / size) + 1):
            for r in range(max(0, math.floor(y0 / size)), math.floor(y1 / size) + 1):
                cell = box(c * size, r * size, (c + 1) * size, (r + 1) * size)
                if geom.intersects(cell) and not geom.touches(cell):
                    out.append(Tile(epsg, size, c, r))
    return sorted(out)


ODD_REGIONS = {
    "with_a_hole": box(4.0, 50.7, 4.3, 50.9).difference(box(4.1, 50.75, 4.15, 50.8)),
    "thin_diagonal": shapely.affinity.rotate(box(3.0, 50.0, 4.0, 50.005), 37),
    "two_zones": box(5.8, 49.9, 6.2, 50.1),
    "across_180": Polygon([(179.8, -17.2), (-179.9, -17.2), (-179.9, -17.0), (179.8, -17.0)]),
    "a_line": LineString([(4.0, 50.0), (4.2, 50.15), (4.3, 50.0)]),
    "round": Point(4.0, 50.0).buffer(0.1, 32),
}


@pytest.mark.parametrize("name", sorted(ODD_REGIONS))
def test_block_search_finds_the_tiles_a_tile_by_tile_test_finds(name: str) -> None:
    region = ODD_REGIONS[name]
    tiles = tiles_for_region(region, **DEMO_TILES, max_tiles=100_000)
    assert tiles == _brute_force(region, 640) and tiles


def test_scattered_fields_cost_their_tiles_not_their_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small fields at both ends of every zone: the former count tested every tile of
    each zone part's bounds (some 1,000 x 12,000 at 640 m per part, 120 parts: minutes)."""
    fields = [
        box(lon, lat, lon + 0.01, lat + 0.01)
        for zone in range(60)
        for lon in [-180.0 + 6.0 * zone + 2.5]
        for lat in (-79.0, -1.0, 1.0, 79.0)
    ]
    tested = 0
    intersects = shapely.intersects

    def counting(a: object, b: object, **kwargs: object) -> object:
        nonlocal tested
        tested += int(getattr(b, "size", 1))
        return intersects(a, b, **kwargs)

    monkeypatch.setattr(regions_module.shapely, "intersects", counting)
    tiles = tiles_for_region(MultiPolygon(fields), **DEMO_TILES)
    assert len({t.epsg for t in tiles}) == 120 and len(tiles) <= 240 * 9
    assert tested < 200_000, tested  # the former count: over 1,000,000,000


def test_a_long_ragged_edge_stops_the_count_at_four_times_the_limit() -> None:
    """A region small in area but long (a river, a road): counting stops once it has
    found four times the limit, and says so."""
    road = shapely.affinity.rotate(box(3.0, 50.0, 4.5, 50.00005), 30)  # 5 m wide
    with pytest.raises(RegionError) as err:
        tiles_for_region(road, **DEMO_TILES, max_tiles=10)
    msg = str(err.value)
    assert "more than 40 tiles" in msg and "limit of 10" in msg and "counting stopped" in msg
    assert MAX_REGION_TILES_ENV in msg


def test_registry_refuses_the_region_and_keeps_what_it_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the region sensor's scan: an error for the big region, nothing lost."""
    regions = tmp_path / "regions"
    regions.mkdir()
    gpd.GeoDataFrame(geometry=[FLANDERS], crs="EPSG:4326").to_file(regions / "flanders.geojson")
    registry = RegionRegistry(tmp_path / "store")
    geometry = {"chip_px": 224, "chips_per_side": 4, "scale_m": 10.0}
    monkeypatch.delenv(MAX_REGION_TILES_ENV, raising=False)
    (added,) = registry.scan(regions, **geometry)
    assert added.status == "added"
    gpd.GeoDataFrame(geometry=[box(0.5, 40.0, 11.5, 50.0)], crs="EPSG:4326").to_file(
        regions / "too_big.geojson"
    )
    _fiji_box_utm().to_file(regions / "fiji.geojson")
    changes = {c.region: c for c in registry.scan(regions, **geometry)}
    assert changes["too_big"].status == "error" and changes["too_big"].tiles == []
    assert "more than the limit of 10,000" in changes["too_big"].message
    assert changes["fiji"].status == "added" and len(changes["fiji"].tiles) <= 8
    active = registry.active_regions()
    assert set(active) == {"flanders", "fiji"}
    assert active["flanders"]["tiles"] == added.tiles


def test_record_of_a_region_across_180() -> None:
    """Bounds as RFC 7946 writes a box across 180° (west > east), and the area of the
    region itself, not of the long way round."""
    crossing = Polygon([(177.0, -19.0), (-179.0, -19.0), (-179.0, -16.0), (177.0, -16.0)])
    tiles = tiles_for_region(crossing)
    rec = region_tiles_record(crossing, tiles)
    assert rec["zones"] == [32701, 32760] and rec["n_tiles"] == len(tiles)
    west, south, east, north = rec["bounds_wgs84"]
    assert (west, east) == pytest.approx((177.0, -179.0)) and (south, north) == (-19.0, -16.0)
    # 4° x 3° at 17.5° S: about 425 x 333 km.
    assert 135_000 < rec["area_km2"] < 147_000
    utm = _fiji_box_utm()
    assert region_tiles_record(utm, tiles_for_region(utm))["area_km2"] == pytest.approx(
        16.0, rel=1e-3
    )


# --- region names --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
FIELD = [(4.10, 50.76), (4.12, 50.76), (4.12, 50.77), (4.10, 50.77), (4.10, 50.76)]


def _named(path: Path, name: object = None, *, feature_name: object = None) -> Path:
    """A FeatureCollection with a top-level ``name``, or (``feature_name``) one Feature
    with ``properties.name``; neither when both are None."""
    geometry = {"type": "Polygon", "coordinates": [[list(p) for p in FIELD]]}
    if feature_name is not None:
        doc: dict = {"type": "Feature", "properties": {"name": feature_name}, "geometry": geometry}
    else:
        doc = {
            "type": "FeatureCollection",
            "features": [{"type": "Feature", "properties": {}, "geometry": geometry}],
        }
        if name is not None:
            doc["name"] = name
    path.write_text(json.dumps(doc))
    return path


def _scan(tmp_path: Path) -> dict[str, RegionChange]:
    registry = RegionRegistry(tmp_path / "store")
    changes = registry.scan(tmp_path / "regions", chip_px=224, chips_per_side=4, scale_m=10.0)
    return {c.region: c for c in changes}


def test_a_geojson_names_its_region(tmp_path: Path) -> None:
    """It used to be named after its file (``upload_3f9a``), whatever it said."""
    regions = tmp_path / "regions"
    regions.mkdir()
    _named(regions / "upload_3f9a.geojson", "field_a")
    _named(regions / "export.json", feature_name="Field B")  # one Feature: properties.name
    _named(regions / "plain.geojson")  # no name: the file's
    gpd.GeoDataFrame(geometry=[Polygon(FIELD)], crs="EPSG:4326").to_file(
        regions / "parcel.gpkg", layer="something_else"
    )  # not GeoJSON: the file's name
    changes = _scan(tmp_path)
    assert {r: c.status for r, c in changes.items()} == {
        "field_a": "added", "Field_B": "added", "plain": "added", "parcel": "added",
    }  # fmt: skip
    active = RegionRegistry(tmp_path / "store").active_regions()
    assert active["field_a"]["file"] == str(regions / "upload_3f9a.geojson")
    # Renaming a named file keeps its region: no removal, no new region, nothing to do
    # but note where its file is now.
    (regions / "upload_3f9a.geojson").rename(regions / "fields.geojson")
    assert _scan(tmp_path) == {}
    active = RegionRegistry(tmp_path / "store").active_regions()
    assert set(active) == {"field_a", "Field_B", "plain", "parcel"}
    assert active["field_a"]["file"] == str(regions / "fields.geojson")
    assert _scan(tmp_path) == {}  # and the next tick has nothing to do


@pytest.mark.parametrize(
    ("name", "said"),
    [("é", "empty region id"), ("--", "empty region id"), ("x" * 97, "97 characters"),
     (12, "not text"), ({"en": "x"}, "not text")],
)  # fmt: skip
def test_an_unusable_geojson_name_is_refused_with_the_fix(
    tmp_path: Path, name: object, said: str
) -> None:
    regions = tmp_path / "regions"
    regions.mkdir()
    path = _named(regions / "good_file_name.geojson", name)
    (change,) = _scan(tmp_path).values()
    assert change.status == "error" and change.tiles == []
    msg = change.message
    assert str(path) in msg and said in msg and "remove" in msg and "name" in msg
    if isinstance(name, str):
        assert repr(name) in msg
    # Never quietly named after the file instead.
    assert RegionRegistry(tmp_path / "store").active_regions() == {}


def test_a_registered_file_given_an_unusable_name_keeps_its_region(tmp_path: Path) -> None:
    regions = tmp_path / "regions"
    regions.mkdir()
    path = _named(regions / "field.geojson", "field")
    assert _scan(tmp_path)["field"].status == "added"
    _named(path, "é")
    (change,) = _scan(tmp_path).values()
    assert change.status == "error" and "empty region id" in change.message
    assert set(RegionRegistry(tmp_path / "store").active_regions()) == {"field"}


def test_two_files_with_one_geojson_name_collide(tmp_path: Path) -> None:
    regions = tmp_path / "regions"
    regions.mkdir()
    _named(regions / "a.geojson", "field")
    _named(regions / "b.geojson", "field")
    changes = _scan(tmp_path)
    assert set(changes) == {"field"} and changes["field"].status == "error"
    assert "a.geojson, b.geojson" in changes["field"].message
    assert RegionRegistry(tmp_path / "store").active_regions() == {}


def test_the_bundled_regions_keep_their_ids() -> None:
    """Their GeoJSON names are their file names: the demo's region, the docs' examples."""
    from agrifm_pipeline.demo import DEMO_REGION, DEMO_REGIONS_DIR

    assert region_id(DEMO_REGIONS_DIR / f"{DEMO_REGION}.geojson") == DEMO_REGION
    assert region_id(REPO / "data" / "regions" / "flanders_demo.geojson") == "flanders_demo"
