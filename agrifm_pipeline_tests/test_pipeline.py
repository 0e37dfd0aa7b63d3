"""The Dagster pipeline end to end on the real sample with the tiny reference checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
import torch
import xarray as xr

from agrifm_pipeline import inference
from agrifm_pipeline.defs.partitions import region_year_key, tile_year_key
from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
from agrifm_pipeline.defs.sensors import region_files_sensor, region_mosaic_sensor
from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.storage import LINEAGE_ATTR, lineage_from_attrs
from agrifm_pipeline.tiles import Tile
from agrifm_pipeline.tileyear import TileYearSettings, model_input, normalise_tile

from .pipeline_helpers import TILES, YEARS, Pipeline, make_pipeline, write_region

TILE_YEAR_ASSETS = [
    "s2_frame_stack",
    "normalized_tensors",
    "agrifm_embedding_grid",
    "chip_embeddings",
    "embedding_preview",
    "agrifm_embedding_int8",
]


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Pipeline, dg.ExecuteInProcessResult, int]:
    """2 tiles x 2 years in ONE run; counts how often the model was loaded."""
    root = tmp_path_factory.mktemp("pipeline")
    pipe = make_pipeline(root)
    inference.clear_engine_cache()
    loads = {"n": 0}
    original = inference.EmbeddingEngine.create

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        loads["n"] += 1
        return original(*a, **kw)

    inference.EmbeddingEngine.create = counting  # type: ignore[method-assign]
    try:
        result = pipe.materialise(TILES, YEARS)
    finally:
        inference.EmbeddingEngine.create = original  # type: ignore[method-assign]
    return pipe, result, loads["n"]


def materializations(
    result: dg.ExecuteInProcessResult, asset: str
) -> list[dg.AssetMaterialization]:
    """One asset's materialisations in a run (two assets can share a step)."""
    key = dg.AssetKey(asset)
    return [
        e.step_materialization_data.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key == key
    ]


def test_one_run_materialises_every_partition_and_loads_the_model_once(built) -> None:
    _, result, loads = built
    assert result.success
    assert loads == 1
    wanted = {str(tile_year_key(t, y)) for t in TILES for y in YEARS}
    for asset in TILE_YEAR_ASSETS:
        got = {str(m.partition) for m in materializations(result, asset)}
        assert got == wanted, asset
    # Per-partition metadata differs per partition (not one blob copied to all).
    grids = materializations(result, "agrifm_embedding_grid")
    clear = {str(m.partition): m.metadata["mean_clear_fraction"].value for m in grids}
    assert clear[str(tile_year_key(TILES[0], 2019))] < clear[str(tile_year_key(TILES[1], 2019))]


def test_lineage_on_materialisations(built) -> None:
    _, result, _ = built
    (m,) = [
        m
        for m in materializations(result, "agrifm_embedding_grid")
        if str(m.partition) == str(tile_year_key(TILES[1], 2019))
    ]
    md = m.metadata
    assert md["n_frames"].value == 8 and md["norm_mode"].value == "agrifm_stats"
    assert md["image_size"].value == 64
    sha = json.loads(
        (Path(__file__).parent / "fixtures/agrifm/tiny_p444_manifest.json").read_text()
    )["checkpoint_sha256"]
    assert md["checkpoint_sha256"].value == sha
    lineage = md["lineage"].value
    for key in (
        "settings",
        "acquisition",
        "normalisation",
        "embedding",
        "fingerprints",
        "output",
        "inputs",
    ):
        assert key in lineage, key
    frames = lineage["acquisition"]["frames"]
    assert len(frames) == 8 and {"start", "end", "n_scenes", "clear_fraction"} <= set(frames[0])
    assert lineage["acquisition"]["provider"] == "local"
    assert lineage["embedding"]["checkpoint"]["sha256"] == sha
    assert lineage["embedding"]["precision"] == "float32"
    assert lineage["embedding"]["model_config"]["embed_dim"] == 16
    assert lineage["output"]["grid_hw"] == [2, 2]
    assert set(lineage["fingerprints"]) == {"acquisition", "normalisation", "embedding"}
    assert lineage["package_version"]
    # 2018 has scenes only in Nov-Dec: the other windows are back-filled, and say so.
    (m18,) = [
        m
        for m in result.asset_materializations_for_node("s2_frame_stack")
        if str(m.partition) == str(tile_year_key(TILES[1], 2018))
    ]
    assert m18.metadata["n_backfilled_frames"].value >= 6


def test_outputs_open_cold_with_crs_coordinates_and_lineage(built) -> None:
    pipe, _, _ = built
    root = Path(pipe.storage.root)
    # Found cold through the STAC catalog, as a tool outside the pipeline would.
    item = stac_item(root, "agrifm_embedding_grid", 2019, TILES[1])
    path = item.assets["data"].href
    assert item.properties["agrifm:n_frames"] == 8
    assert item.properties["agrifm:norm_mode"] == "agrifm_stats"
    assert item.properties["proj:code"] == "EPSG:32631"
    from pyproj import Transformer

    x0, y0, x1, y1 = Tile.from_id(TILES[1]).bounds
    lon, lat = Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True).transform(
        (x0 + x1) / 2, (y0 + y1) / 2
    )
    west, south, east, north = item.bbox
    assert item.geometry["type"] == "Polygon" and west < lon < east and south < lat < north
    ds = xr.open_zarr(path, decode_coords="all")
    da = ds["embedding"]
    assert da.dims == ("band", "y", "x") and da.shape == (128, 4, 4)
    assert str(da.rio.crs) == "EPSG:32631"
    # 2 chips of 64 px x 10 m over 2 cells each: 320 m cells, centres inside the tile.
    x0 = 449 * 1280
    np.testing.assert_allclose(ds["x"].values, x0 + 160 + 320 * np.arange(4))
    np.testing.assert_allclose(ds["y"].values, 4393 * 1280 - 160 - 320 * np.arange(4))
    lineage = json.loads(ds.attrs[LINEAGE_ATTR])
    assert item.properties["agrifm:checkpoint_sha256"] == ds.attrs["checkpoint_sha256"]
    assert item.properties["agrifm:untrained"] is bool(ds.attrs["untrained"])
    assert lineage["tile"] == TILES[1] and lineage["year"] == 2019
    # GDAL itself reads the grid with its CRS and transform.
    assert item.assets["data"].extra_fields["agrifm:gdal_path"] == f'ZARR:"{path}":/embedding'
    with rasterio.open(item.assets["data"].extra_fields["agrifm:gdal_path"]) as src:
        assert src.crs.to_epsg() == 32631
        assert src.transform.a == 320 and src.transform.c == x0 and src.count == 128
        np.testing.assert_allclose(src.read(5), da.values[4], rtol=1e-6)
    # Neighbouring tiles sit side by side on one lattice.
    left = xr.open_zarr(
        stac_item(root, "agrifm_embedding_grid", 2019, TILES[0]).assets["data"].href,
        decode_coords="all",
    )
    assert left["x"].values[-1] + 320 == ds["x"].values[0]
    np.testing.assert_allclose(left["y"].values, ds["y"].values)
    # Frame stacks and tensors describe themselves too.
    fs = xr.open_zarr(
        stac_item(root, "s2_frame_stack", 2019, TILES[1]).assets["data"].href, decode_coords="all"
    )
    assert fs["frames"].dims == ("time", "band", "y", "x") and fs["frames"].dtype == np.uint16
    assert fs["frames"].shape == (8, 10, 128, 128) and str(fs.rio.crs) == "EPSG:32631"
    nt = xr.open_zarr(stac_item(root, "normalized_tensors", 2019, TILES[1]).assets["data"].href)
    assert nt["chip_stats"].dims == ("chip", "time", "band", "stat")
    assert nt["chip_stats"].shape == (4, 8, 10, 4) and "tensors" not in nt  # the default
    assert nt.attrs["tensors_kept"] == 0 and nt.attrs["n_nonfinite"] == 0
    # Chip vectors: GeoParquet with geometry, mean and max per chip.
    table = pq.read_table(stac_item(root, "chip_embeddings", 2019, TILES[1]).assets["data"].href)
    assert table.num_rows == 4 and b"geo" in table.schema.metadata
    row = table.slice(0, 1).to_pylist()[0]
    np.testing.assert_allclose(row["mean"], da.values[:, :2, :2].mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(row["max"], da.values[:, :2, :2].max(axis=(1, 2)), rtol=1e-6)
    png = stac_item(root, "embedding_preview", 2019, TILES[1]).assets["data"].href
    assert Path(png).read_bytes()[:4] == b"\x89PNG"
    # Lineage names the exact upstream versions read, and they exist.
    grids = pipe.storage.store("agrifm_embedding_grid")
    read = lineage["inputs"]["normalized_tensors"]["version"]
    assert pipe.storage.store("normalized_tensors").version(2019, TILES[1], read).id == read
    assert lineage["inputs"]["agrifm_checkpoint"]["sha256"]
    assert grids.current(2019, TILES[1]).id == item.properties["agrifm:version"]


def stac_item(root: Path, asset: str, year: int, tile: str) -> pystac.Item:
    """An item reached from the root catalog by its links, as a STAC client would."""
    catalog = pystac.Catalog.from_file(str(root / "catalog.json"))
    collection = catalog.get_child(asset)
    assert collection is not None, [c.id for c in catalog.get_children()]
    year_catalog = collection.get_child(f"{asset}-{year}")
    assert year_catalog is not None
    for item in year_catalog.get_items():
        if item.id == f"{tile}_{year}":
            item.make_asset_hrefs_absolute()
            return item
    raise AssertionError(f"no STAC item for {asset} {tile} {year}")


def test_kept_tensors_are_what_the_encoder_sees(built, tmp_path: Path) -> None:
    """storage.keep_tensors stores the model input; without it the embedding step
    normalises the stored frames again. Both give the same tensors and grids."""
    pipe, _, _ = built
    kept = make_pipeline(tmp_path, keep_tensors=True)
    assert kept.materialise(TILES[1:], [2019]).success
    part = ("2019", TILES[1])
    nt = kept.storage.store("normalized_tensors").open(*part)
    assert nt.attrs["tensors_kept"] == 1 and nt["tensors"].shape == (4, 8, 10, 64, 64)
    frames = pipe.storage.store("s2_frame_stack").open(*part)
    cfg = TileYearSettings.from_record(lineage_from_attrs(nt.attrs)["settings"])
    again, _ = normalise_tile(frames["frames"].values, cfg)
    np.testing.assert_array_equal(nt["tensors"].values, again.numpy())
    # The statistics agree with the tensors they summarise.
    stats = nt["chip_stats"].sel(stat=["min", "max"]).values
    np.testing.assert_array_equal(stats[..., 0], again.flatten(3).min(-1).values.numpy())
    grid_kept = kept.storage.store("agrifm_embedding_grid").open(*part)["embedding"].values
    grid = pipe.storage.store("agrifm_embedding_grid").open(*part)["embedding"].values
    np.testing.assert_array_equal(grid_kept, grid)


def test_model_input_refuses_frames_it_was_not_made_from(built) -> None:
    pipe, _, _ = built
    part = ("2019", TILES[1])
    nt = pipe.storage.store("normalized_tensors").open(*part)
    frames = pipe.storage.store("s2_frame_stack").open(*part)
    lineage = lineage_from_attrs(nt.attrs)
    x = model_input(nt, lambda: frames, lineage, "t|2019")
    assert x.shape == (4, 8, 10, 64, 64) and x.dtype == torch.float32
    assert frames.encoding["agrifm_version"] == lineage["inputs"]["s2_frame_stack"]["version"]
    # A lineage naming another frames version than the one opened: refused, not re-derived.
    other = json.loads(json.dumps(lineage))
    other["inputs"]["s2_frame_stack"]["version"] = "v20190101T000000000000Z-00000000"
    with pytest.raises(InputContractError, match="re-materialise normalized_tensors"):
        model_input(nt, lambda: frames, other, "t|2019")
    # A lineage that names no version (an older release's partition): refused too.
    del other["inputs"]["s2_frame_stack"]["version"]
    with pytest.raises(InputContractError, match="does not name the s2_frame_stack version"):
        model_input(nt, lambda: frames, other, "t|2019")
    # Frames whose values no longer give the recorded statistics.
    changed = frames.copy(deep=True)
    changed["frames"].values[:, :, :8, :8] = 9999  # above every recorded maximum
    with pytest.raises(InputContractError, match="does not reproduce the statistics"):
        model_input(nt, lambda: changed, lineage, "t|2019")


def test_checks_ran_per_partition(built) -> None:
    """Each check has one evaluation per partition of the run, recorded against it."""
    _, result, _ = built
    evals: dict[str, dict[str, dg.AssetCheckEvaluation]] = {}
    for e in result.get_asset_check_evaluations():
        evals.setdefault(e.check_name, {})[str(e.partition)] = e
    assert set(evals) == {
        "frame_stack_shape_and_dtype",
        "frame_stack_clear_fraction",
        "normalized_tensors_finite",
        "embedding_finite",
        "embedding_non_degenerate",
    }
    wanted = {str(tile_year_key(t, y)) for t in TILES for y in YEARS}
    for name, per in evals.items():
        assert set(per) == wanted, name
    for name in ("frame_stack_shape_and_dtype", "normalized_tensors_finite", "embedding_finite",
                 "embedding_non_degenerate"):  # fmt: skip
        assert all(e.passed for e in evals[name].values()), name
    # The tile the sample barely touches is flagged by the clear-fraction check (a warning),
    # on its own partitions only.
    clear = evals["frame_stack_clear_fraction"]
    for key, e in clear.items():
        assert e.passed == (TILES[1] in key), key
        assert e.severity == dg.AssetCheckSeverity.WARN


def test_region_sensor_mosaic_and_removal(built, tmp_path: Path) -> None:
    pipe, _, _ = built
    regions = Path(pipe.storage.regions_dir)
    # Region A covers both tiles; region B only the second: the shared tile is produced once.
    write_region(regions / "field_a.geojson", 573800, 5621900, 575800, 5622900)
    write_region(regions / "field b.geojson", 575000, 5621900, 575600, 5622500)
    instance = dg.DagsterInstance.ephemeral()
    ctx = dg.build_sensor_context(instance=instance, resources=pipe.resources)
    result = region_files_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    adds = {
        r.partitions_def_name: list(r.partition_keys) for r in result.dynamic_partitions_requests
    }
    assert sorted(adds["tiles"]) == TILES and len(adds["tiles"]) == 2
    assert sorted(adds["regions"]) == ["field_a", "field_b"]
    owners = pipe.storage.registry().owners()
    assert owners[TILES[1]] == ["field_a", "field_b"] and owners[TILES[0]] == ["field_a"]
    instance.add_dynamic_partitions("tiles", adds["tiles"])
    instance.add_dynamic_partitions("regions", adds["regions"])
    again = region_files_sensor(
        dg.build_sensor_context(instance=instance, resources=pipe.resources)
    )
    assert isinstance(again, dg.SkipReason)

    # The mosaic sensor asks for each region-year whose tiles all have grids.
    pipe.instance.add_dynamic_partitions("regions", adds["regions"])
    mctx = dg.build_sensor_context(instance=pipe.instance, resources=pipe.resources)
    asked = region_mosaic_sensor(mctx)
    assert isinstance(asked, dg.SensorResult)
    keys = sorted(r.partition_key for r in asked.run_requests)
    assert keys == sorted(str(region_year_key(r, y)) for r in ("field_a", "field_b") for y in YEARS)
    job = pipe.defs.resolve_job_def("mosaic_regions")
    out = job.execute_in_process(
        instance=pipe.instance, partition_key=str(region_year_key("field_a", 2019))
    )
    assert out.success
    root = Path(pipe.storage.root)
    mosaic_item = stac_item(root, "region_mosaic", 2019, "field_a")
    mosaic = xr.open_zarr(mosaic_item.assets["data"].href, decode_coords="all")
    grid = mosaic["embedding"]
    assert grid.shape == (128, 4, 8) and str(grid.rio.crs) == "EPSG:32631"
    for i, tile in enumerate(TILES):
        g = pipe.storage.store("agrifm_embedding_grid").open(2019, tile)["embedding"].values
        np.testing.assert_array_equal(grid.values[:, :, 4 * i : 4 * i + 4], g)
    with rasterio.open(mosaic_item.assets["data"].extra_fields["agrifm:gdal_path"]) as src:
        assert src.crs.to_epsg() == 32631 and src.width == 8 and src.transform.c == 448 * 1280
    # Once made, the mosaic is current: no request for it again.
    again = region_mosaic_sensor(
        dg.build_sensor_context(instance=pipe.instance, resources=pipe.resources)
    )
    wanted = {r.partition_key for r in getattr(again, "run_requests", [])}
    assert str(region_year_key("field_a", 2019)) not in wanted

    # Removing a region file deletes nothing.
    (regions / "field b.geojson").unlink()
    region_files_sensor(dg.build_sensor_context(instance=instance, resources=pipe.resources))
    doc = pipe.storage.registry().load()["regions"]
    assert doc["field_b"]["status"] == "removed"
    assert pipe.storage.store("agrifm_embedding_grid").exists(2019, TILES[1])
    assert TILES[1] in instance.get_dynamic_partitions("tiles")


def test_bad_region_file_is_reported_not_fatal(tmp_path: Path) -> None:
    pipe = make_pipeline(tmp_path)
    regions = Path(pipe.storage.regions_dir)
    regions.mkdir(parents=True)
    (regions / "broken.geojson").write_text("{not json")
    write_region(regions / "ok.geojson", 575000, 5621900, 575600, 5622500)
    ctx = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), resources=pipe.resources)
    result = region_files_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    adds = {
        r.partitions_def_name: list(r.partition_keys) for r in result.dynamic_partitions_requests
    }
    assert adds["regions"] == ["ok"]
    assert "broken" not in pipe.storage.registry().load()["regions"]


def test_region_across_two_utm_zones_gets_one_mosaic_per_zone(tmp_path: Path) -> None:
    """A region on the 6°E zone boundary: tiles in EPSG:32631 and 32632, a mosaic group for each."""
    import geopandas as gpd
    import shapely

    from agrifm_pipeline.definitions import build_defs
    from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
    from agrifm_pipeline.defs.resources import S2Source
    from agrifm_pipeline.defs.sensors import register_regions

    from .pipeline_helpers import make_resources

    resources = make_resources(tmp_path)
    resources["s2"] = S2Source(backend="synthetic", synthetic_seed=3)
    storage = resources["storage"]
    regions = Path(storage.regions_dir)
    regions.mkdir(parents=True)
    gpd.GeoDataFrame(geometry=[shapely.box(5.995, 50.0, 6.005, 50.004)], crs="EPSG:4326").to_file(
        regions / "border.geojson", driver="GeoJSON"
    )
    defs = build_defs(resources)
    with dg.instance_for_test() as instance:
        _, tiles, regs = register_regions(instance, resources["tile_year"], storage)
        assert {t.split("_")[0] for t in tiles} == {"32631", "32632"}
        instance.add_dynamic_partitions("tiles", tiles)
        instance.add_dynamic_partitions("regions", regs)
        job = defs.resolve_job_def("embed_tile_years")
        order = instance.get_dynamic_partitions("tiles")
        result = job.execute_in_process(
            instance=instance,
            tags={
                RANGE_START: str(tile_year_key(order[0], 2020)),
                RANGE_END: str(tile_year_key(order[-1], 2020)),
            },
            asset_selection=[
                dg.AssetKey("s2_frame_stack"),
                dg.AssetKey("normalized_tensors"),
                dg.AssetKey("agrifm_embedding_grid"),
            ],
        )
        assert result.success
        out = defs.resolve_job_def("mosaic_regions").execute_in_process(
            instance=instance, partition_key=str(region_year_key("border", 2020))
        )
        assert out.success
    root = Path(storage.store("region_mosaic").current(2020, "border").path)
    for epsg in (32631, 32632):
        group = root / f"utm_{epsg}"
        ds = xr.open_zarr(group, decode_coords="all")
        assert ds.rio.crs.to_epsg() == epsg and ds["embedding"].shape[0] == 128
        with rasterio.open(f'ZARR:"{group}":/embedding') as src:
            assert src.crs.to_epsg() == epsg
    lineage = storage.store("region_mosaic").lineage(2020, "border")
    assert json.loads(zarr_attrs(root)[LINEAGE_ATTR]) == lineage
    assert lineage["zones"] == [32631, 32632] and sorted(lineage["tiles"]) == sorted(tiles)


def zarr_attrs(path: Path) -> dict:
    return json.loads((path / ".zattrs").read_text())


def test_normalisation_and_embedding_share_a_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Selected together, each tile-year is normalised once and goes straight to the
    encoder; selected alone, the embedding reads the stored partitions and the
    normalisation loads no model. The grids agree either way."""
    from agrifm_pipeline.defs import steps as assets  # the step bodies, counted below

    calls = {"normalise": 0, "model_input": 0, "engine": 0}

    def counted(name, fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            calls[name] += 1
            return fn(*a, **kw)

        return wrapper

    monkeypatch.setattr(assets, "normalise_tile", counted("normalise", assets.normalise_tile))
    monkeypatch.setattr(assets, "model_input", counted("model_input", assets.model_input))
    monkeypatch.setattr(
        inference.EmbeddingEngine, "create", counted("engine", inference.EmbeddingEngine.create)
    )
    inference.clear_engine_cache()
    pipe = make_pipeline(tmp_path)
    job = pipe.defs.resolve_job_def("embed_tile_years")
    assert {n.name for n in job.graph.nodes} >= {"s2_frame_stack", "normalise_and_embed"}
    n = len(TILES) * len(YEARS)
    assert pipe.materialise(TILES, YEARS).success
    assert calls == {"normalise": n, "model_input": 0, "engine": 1}
    grids = pipe.storage.store("agrifm_embedding_grid")
    tile, year = TILES[1], YEARS[1]
    first = grids.open(year, tile)["embedding"].values.copy()

    def run(*keys: str) -> dg.ExecuteInProcessResult:
        return job.execute_in_process(
            instance=pipe.instance,
            tags={
                RANGE_START: str(tile_year_key(TILES[0], YEARS[0])),
                RANGE_END: str(tile_year_key(TILES[-1], YEARS[-1])),
            },
            asset_selection=[dg.AssetKey(k) for k in keys],
        )

    calls.update(normalise=0, model_input=0, engine=0)
    inference.clear_engine_cache()
    result = run("agrifm_embedding_grid")
    assert result.success and calls == {"normalise": 0, "model_input": n, "engine": 1}
    assert {str(m.partition) for m in materializations(result, "agrifm_embedding_grid")} == {
        str(tile_year_key(t, y)) for t in TILES for y in YEARS
    }
    assert materializations(result, "normalized_tensors") == []
    np.testing.assert_array_equal(grids.open(year, tile)["embedding"].values, first)

    calls.update(normalise=0, model_input=0, engine=0)
    inference.clear_engine_cache()
    result = run("normalized_tensors")
    assert result.success and calls == {"normalise": n, "model_input": 0, "engine": 0}
    assert materializations(result, "agrifm_embedding_grid") == []
    assert len(materializations(result, "normalized_tensors")) == n
