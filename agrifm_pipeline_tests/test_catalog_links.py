"""The STAC catalog's links after many commits: each item once, every year kept.

The pipeline tests open the catalog after one run and find their items. Here the
catalog is written by :meth:`StacCatalog.record` for several years, tiles and
assets, with a partition committed again, and its documents are read as a STAC
client reads them: a year's catalog links each of its items exactly once, the
collection keeps a child for every year ever recorded (and a temporal extent
over all of them), the root one child per asset, and an item names the version
that is current now.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pystac
import pytest

from agrifm_pipeline.catalog import StacCatalog
from agrifm_pipeline.storage import Version, ZarrStore
from agrifm_pipeline_tests.pipeline_helpers import TILES

A, B = TILES


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def _commit(root: Path, asset: str, year: int, tile: str, n: int = 0) -> Version:
    store = ZarrStore(str(root), asset)
    v = store.put_objects(year, tile, {"x.bin": f"{n}".encode()}, {"run_id": f"run{n}"})
    StacCatalog(str(root)).record(v, store.lineage(year, tile, v.id))
    return v


def _doc(root: Path, *parts: str) -> dict[str, Any]:
    return json.loads(root.joinpath(*parts).read_text())


def _links(doc: dict[str, Any], rel: str) -> list[str]:
    return [link["href"] for link in doc["links"] if link["rel"] == rel]


def test_a_recommitted_partition_is_linked_once_and_names_its_new_version(root: Path) -> None:
    first = _commit(root, "s2_frame_stack", 2019, A, 1)
    _commit(root, "s2_frame_stack", 2019, B, 2)
    again = _commit(root, "s2_frame_stack", 2019, A, 3)
    assert again.id != first.id
    year = _doc(root, "stac", "s2_frame_stack", "2019", "catalog.json")
    assert sorted(_links(year, "item")) == [f"./{A}.json", f"./{B}.json"]
    item = _doc(root, "stac", "s2_frame_stack", "2019", f"{A}.json")
    assert item["properties"]["agrifm:version"] == again.id
    assert item["properties"]["agrifm:run_id"] == "run3"
    assert item["assets"]["data"]["href"] == again.url
    # A STAC client walking the links finds each partition once.
    cat = pystac.Catalog.from_file(str(root / "catalog.json"))
    collection = cat.get_child("s2_frame_stack")
    assert collection is not None
    found = [(c.id, i.id) for c in collection.get_children() for i in c.get_items()]
    assert sorted(found) == [
        ("s2_frame_stack-2019", f"{A}_2019"),
        ("s2_frame_stack-2019", f"{B}_2019"),
    ]


def test_the_collection_keeps_every_year_recorded(root: Path) -> None:
    """Years recorded out of order, one of them again: a child each, extent over all."""
    for year in (2019, 2017, 2018, 2019):
        _commit(root, "agrifm_embedding_grid", year, A, year)
    collection = _doc(root, "stac", "agrifm_embedding_grid", "collection.json")
    assert _links(collection, "child") == [f"./{y}/catalog.json" for y in (2017, 2018, 2019)]
    ((start, end),) = collection["extent"]["temporal"]["interval"]
    assert start.startswith("2017-01-01") and end.startswith("2019-12-31")
    cat = pystac.Catalog.from_file(str(root / "catalog.json"))
    grids = cat.get_child("agrifm_embedding_grid")
    assert grids is not None
    assert sorted(c.id for c in grids.get_children()) == [
        f"agrifm_embedding_grid-{y}" for y in (2017, 2018, 2019)
    ]


def test_the_root_links_each_asset_once(root: Path) -> None:
    for asset in ("s2_frame_stack", "agrifm_embedding_grid", "s2_frame_stack"):
        for year in (2018, 2019):
            _commit(root, asset, year, B)
    top = _doc(root, "catalog.json")
    assert sorted(_links(top, "child")) == [
        "./stac/agrifm_embedding_grid/collection.json",
        "./stac/s2_frame_stack/collection.json",
    ]


def test_rebuild_rewrites_the_same_links_without_duplicates(root: Path) -> None:
    for year in (2018, 2019):
        for tile in TILES:
            _commit(root, "s2_frame_stack", year, tile)
    before = {
        p.relative_to(root): _links(json.loads(p.read_text()), "item")
        + _links(json.loads(p.read_text()), "child")
        for p in root.rglob("catalog.json")
    }
    store = ZarrStore(str(root), "s2_frame_stack")
    assert StacCatalog(str(root)).rebuild([store]) == 4
    after = {
        p.relative_to(root): _links(json.loads(p.read_text()), "item")
        + _links(json.loads(p.read_text()), "child")
        for p in root.rglob("catalog.json")
    }
    assert after == before
    collection = _doc(root, "stac", "s2_frame_stack", "collection.json")
    assert _links(collection, "child") == ["./2018/catalog.json", "./2019/catalog.json"]
