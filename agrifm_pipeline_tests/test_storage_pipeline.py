"""The pipeline on versioned storage: corruption is caught everywhere it is read, region
names cannot reach outside their partition, and the whole pipeline runs on S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import xarray as xr

from agrifm_pipeline.cli import main as cli_main
from agrifm_pipeline.defs.audit import audit_rows
from agrifm_pipeline.defs.resources import ZarrStorage
from agrifm_pipeline.defs.sensors import register_regions
from agrifm_pipeline.defs.staleness import current_fingerprints, stage_stores
from agrifm_pipeline.errors import RegionError
from agrifm_pipeline.registry import region_id
from agrifm_pipeline.storage import CorruptionError, collect_garbage

from .pipeline_helpers import TILES, TINY, make_pipeline, make_resources, write_region
from .test_staleness import Ticker


def _corrupt(storage: ZarrStorage, asset: str, tile: str, obj: str) -> str:
    store = storage.store(asset)
    v = store.current(2019, tile)
    assert v is not None
    path = Path(v.path) / obj
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return v.id


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT_MIN_BYTES", "1000")
    with dg.instance_for_test() as instance:
        pipe = make_pipeline(tmp_path, instance=instance)
        assert pipe.materialise(TILES, [2019]).success
        yield pipe


def test_a_corrupt_grid_is_found_named_and_remade(built, capsys) -> None:
    pipe = built
    storage = pipe.storage
    vid = _corrupt(storage, "agrifm_embedding_grid", TILES[1], "embedding/0.0.0")
    # Reading it for a derived asset fails and names the partition, version and object.
    job = pipe.defs.resolve_job_def("embed_tile_years")
    from agrifm_pipeline.defs.partitions import tile_year_key

    res = job.execute_in_process(
        instance=pipe.instance,
        partition_key=str(tile_year_key(TILES[1], 2019)),
        asset_selection=[dg.AssetKey("chip_embeddings")],
        raise_on_error=False,
    )
    assert not res.success
    failure = res.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert f"agrifm_embedding_grid 2019/{TILES[1]} version {vid}: embedding/0.0.0" in failure
    # verify exits non-zero and names the object; the other partitions are fine.
    assert cli_main(["verify", "--store", storage.root]) == 1
    out = capsys.readouterr().out
    assert out.count("CORRUPT") == 1 and f"{TILES[1]} version {vid}: embedding/0.0.0" in out
    # The audit says corrupt, with what is wrong.
    res_ = make_resources(pipe.root)
    current, unknown, _ = current_fingerprints(res_["tile_year"], res_["s2"], res_["model"])
    rows = audit_rows(pipe.instance, stage_stores(storage), current, unknown=unknown)
    (row,) = [r for r in rows if r.status != "current"]
    assert (row.asset, row.tile, row.status) == ("agrifm_embedding_grid", TILES[1], "corrupt")
    assert "embedding/0.0.0: mismatch" in row.why and row.version == vid
    # The stale sensor asks for the grid (and what is made from it) again.
    ticker = Ticker(pipe)
    reqs = ticker.tick(res_)
    assert ticker.covered(reqs) == {
        (a, TILES[1], 2019)
        for a in (
            "agrifm_embedding_grid",
            "chip_embeddings",
            "embedding_preview",
            "agrifm_embedding_int8",
        )
    }
    assert all("corrupt" in r.tags["agrifm/reason"] for r in reqs)
    assert ticker.execute(reqs, res_) == [True]
    assert cli_main(["verify", "--store", storage.root]) == 0
    assert ticker.tick(res_) == []


def test_truncated_frames_name_partition_and_object(built) -> None:
    storage = built.storage
    v = storage.store("s2_frame_stack").current(2019, TILES[0])
    chunk = Path(v.path) / "frames" / "0.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(CorruptionError, match=rf"s2_frame_stack 2019/{TILES[0]} .*frames/0.0.0.0"):
        storage.store("s2_frame_stack").open(2019, TILES[0], verify=True)


def test_gc_after_a_remake_keeps_what_current_partitions_read(built, capsys) -> None:
    pipe = built
    storage = pipe.storage
    assert pipe.materialise(TILES, [2019]).success  # every partition gets a second version
    frames = storage.store("s2_frame_stack")
    assert len(frames.versions(2019, TILES[0])) == 2
    assert cli_main(["gc", "--store", storage.root, "--keep", "0", "--min-age-hours", "0"]) == 0
    for store in storage.all_stores():
        for ref in store.partitions():
            assert len(store.versions(ref.year, ref.tile)) == 1, (store.asset, ref)
    # Everything still reads back whole, and lineage still resolves upstream versions.
    assert cli_main(["verify", "--store", storage.root]) == 0
    grids = storage.store("agrifm_embedding_grid")
    lineage = grids.lineage(2019, TILES[0])
    up = lineage["inputs"]["normalized_tensors"]["version"]
    assert storage.store("normalized_tensors").version(2019, TILES[0], up).id == up
    assert "removed" in capsys.readouterr().out
    assert collect_garbage(storage.all_stores(), keep=0, min_age_s=0).removed == []


# -- region names ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "rid"),
    [("Flanders demo.geojson", "Flanders_demo"), ("a.b.c.gpkg", "a_b_c"), ("-x-.geojson", "x")],
)
def test_region_id_rule(name: str, rid: str) -> None:
    assert region_id(name) == rid


@pytest.mark.parametrize("name", ["..geojson", "___.gpkg", "é.geojson", "-.json"])
def test_a_name_with_no_id_is_refused(name: str) -> None:
    with pytest.raises(RegionError, match="empty region id"):
        region_id(name)


def test_unsafe_and_colliding_region_files_register_nothing(tmp_path: Path) -> None:
    pipe = make_pipeline(tmp_path)
    regions = Path(pipe.storage.regions_dir)
    x0, y = 449 * 1280 + 100, 4392 * 1280 + 100
    write_region(regions / "good.geojson", x0, y, x0 + 200, y + 200)
    unnamed = write_region(regions / "..geojson", x0, y, x0 + 200, y + 200)
    doc = json.loads(unnamed.read_text())
    del doc["name"]  # GDAL wrote "..geojson"; without a GeoJSON name the file's name counts
    unnamed.write_text(json.dumps(doc))
    write_region(regions / "dup.geojson", x0, y, x0 + 200, y + 200)
    shutil.copy(regions / "dup.geojson", regions / "dup.json")
    write_region(regions / "a b.geojson", x0, y, x0 + 200, y + 200)
    write_region(regions / "a_b.geojson", x0, y, x0 + 200, y + 200)
    res = pipe.resources
    changes, _, new_regions = register_regions(pipe.instance, res["tile_year"], pipe.storage)
    errors = {c.region: c.message for c in changes if c.status == "error"}
    assert "..geojson" in errors and "empty region id" in errors["..geojson"]
    assert "dup.geojson, dup.json" in errors["dup"] and "a b.geojson, a_b.geojson" in errors["a_b"]
    assert new_regions == ["good"]
    doc = pipe.storage.registry().load()["regions"]
    assert set(doc) == {"good"}
    # A second tick changes nothing (no flip between the colliding files).
    before = (Path(pipe.storage.root) / "_registry" / "regions.json").read_bytes()
    changes, _, _ = register_regions(pipe.instance, res["tile_year"], pipe.storage)
    assert all(c.status == "error" for c in changes)
    assert (Path(pipe.storage.root) / "_registry" / "regions.json").read_bytes() == before


# -- the whole pipeline on S3 -------------------------------------------------------------------
def test_pipeline_on_s3(tmp_path: Path, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every store, the registry and the catalog on S3 (moto), reached with storage_options."""
    import pystac
    import rasterio

    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT_MIN_BYTES", "1000")
    bucket = s3_server.bucket()
    root = f"s3://{bucket}/agrifm"
    options = s3_server.options()
    resources = make_resources(tmp_path, checkpoint=TINY)
    resources["storage"] = ZarrStorage(
        root=root, storage_options=options, regions_dir=str(tmp_path / "regions")
    )
    from agrifm_pipeline.definitions import build_defs

    from .pipeline_helpers import Pipeline

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tiles", TILES)
        pipe = Pipeline(tmp_path, resources, build_defs(resources), instance)
        assert pipe.materialise(TILES, [2019]).success
    storage = pipe.storage
    assert not Path(tmp_path / "store").exists()  # nothing went to a local default
    grid = storage.store("agrifm_embedding_grid").current(2019, TILES[1])
    assert grid.url.startswith(f"s3://{bucket}/agrifm/agrifm_embedding_grid.zarr/2019/")
    assert grid.gdal_path.startswith(f"/vsis3/{bucket}/agrifm/")
    ds = xr.open_zarr(grid.url, storage_options=options, decode_coords="all")
    assert str(ds.rio.crs) == "EPSG:32631" and ds["embedding"].shape == (128, 4, 4)
    # The catalog on S3 names the same version, with an href xarray opens.
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    io = pystac.StacIO.default()
    io.read_text = lambda source, *a, **k: fs.cat_file(str(source)).decode()  # type: ignore[method-assign]
    catalog = pystac.Catalog.from_file(f"{root}/catalog.json", stac_io=io)
    items = list(catalog.get_child("agrifm_embedding_grid").get_child(
        "agrifm_embedding_grid-2019").get_items())  # fmt: skip
    item = next(i for i in items if i.id == f"{TILES[1]}_2019")
    assert item.properties["agrifm:version"] == grid.id
    assert item.assets["data"].href == grid.url
    assert item.assets["data"].extra_fields["agrifm:gdal_path"] == (
        f'ZARR:"{grid.gdal_path}":/embedding'
    )
    # Chip tables and previews on S3 too, checked against their manifests.
    chips = storage.files("chip_embeddings").read(2019, TILES[1], "chips.parquet")
    assert chips[:4] == b"PAR1"
    # The command line takes its storage options from the environment.
    monkeypatch.setenv("AGRIFM_PIPELINE_STORAGE_OPTIONS", json.dumps(options))
    assert cli_main(["verify", "--store", root]) == 0
    # GDAL reads it through /vsis3/ with the same endpoint (GDAL's own variables).
    for key, value in {
        "AWS_S3_ENDPOINT": s3_server.endpoint.removeprefix("http://"),
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(key, value)
    with rasterio.open(item.assets["data"].extra_fields["agrifm:gdal_path"]) as src:
        assert src.crs.to_epsg() == 32631
        np.testing.assert_allclose(src.read(1), ds["embedding"].values[0], rtol=1e-6)


def test_the_catalog_recipe_in_the_docs_works(built) -> None:
    """docs/storage.md's recipe, word for word but the path."""
    import pystac

    root = built.storage.root
    year = (
        pystac.Catalog.from_file(f"{root}/catalog.json")
        .get_child("agrifm_embedding_grid")
        .get_child("agrifm_embedding_grid-2019")
    )
    item = next(year.get_items(f"{TILES[0]}_2019"))  # get_item is deprecated in pystac
    grid = xr.open_zarr(item.assets["data"].get_absolute_href(), decode_coords="all")
    assert str(grid.rio.crs) == "EPSG:32631"
    assert item.properties["agrifm:version"] == (
        built.storage.store("agrifm_embedding_grid").current(2019, TILES[0]).id
    )
