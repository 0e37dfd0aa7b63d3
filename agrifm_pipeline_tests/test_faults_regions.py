"""Regions that used to explode into thousands of tiles, or be cut silently (issue 17, item 3),
and coordinates that cannot be degrees (item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import MultiPolygon, Polygon, box

from agrifm_pipeline.errors import RegionError
from agrifm_pipeline.regions import region_tiles_record, tiles_for_region
from agrifm_pipeline.registry import RegionRegistry
from agrifm_pipeline.settings import DEFAULT_MAX_REGION_TILES, MAX_REGION_TILES_ENV
from agrifm_pipeline.tiles import Tile

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
    count = int(str(err.value).split("would register ")[1].split(" tiles")[0].replace(",", ""))
    assert 10_000 < count < 16_000 and "limit of 10,000" in str(err.value)


def test_bad_limit_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_REGION_TILES_ENV, "lots")
    with pytest.raises(ValueError, match=rf"{MAX_REGION_TILES_ENV}='lots'"):
        tiles_for_region(FLANDERS)


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
