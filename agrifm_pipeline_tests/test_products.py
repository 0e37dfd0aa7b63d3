"""The int8 products, their COGs and their STAC items (issue 30).

* the channel scheme's codes dequantise to within half a step of the float32 grid, the
  no-data value marks the cells of chips that were not encoded, and the scheme, formula
  and no-data value are in the product's own attributes;
* :func:`read_embeddings` gives the same floats from the float32 grid, the int8 Zarr (a
  dataset or a path) and the COG;
* the COG opens in rasterio with CRS, transform, internal tiles, overviews, band scales
  and offsets; and in the system's GDAL (``gdalinfo``, Debian 12's is 3.6) where it is
  installed, whose ``-unscale`` gives the same floats;
* in a pipeline run the int8 grid is made with the tile-year, the region's int8 mosaic and
  COG by the mosaic job; the STAC items carry what a consumer needs, and pass pystac's
  validation against the core schemas it ships.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pystac
import pystac.validation
import pytest
import rasterio
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr
from affine import Affine

from agrifm_pipeline.catalog import EMB_SCHEMA, multihash_sha256
from agrifm_pipeline.defs.partitions import region_year_key
from agrifm_pipeline.defs.sensors import region_files_sensor, region_mosaic_sensor
from agrifm_pipeline.errors import SettingsError
from agrifm_pipeline.settings import canonical_mosaic_products
from agrifm_pipeline.storage import ZarrStore
from agrifm_pipeline.tileyear import (
    NODATA,
    cog_bytes,
    dequantise,
    quantise,
    quantised_dataset,
    read_embeddings,
)
from agrifm_pipeline.tileyear.cog import BLOCK, COG_NODATA

from .pipeline_helpers import TILES, make_pipeline, write_region

GDALINFO = shutil.which("gdalinfo")


def _grid(d: int = 16, h: int = 12, w: int = 10, seed: int = 0, nan_cells: int = 4) -> xr.Dataset:
    """A georeferenced float32 grid like the pipeline's: a large shared part per band,
    small differences between cells, and a corner of cells without an embedding."""
    rng = np.random.default_rng(seed)
    common = rng.normal(0, 1, size=(d, 1, 1))
    values = (common + 0.03 * rng.normal(size=(d, h, w))).astype(np.float32)
    values[:, :nan_cells, :nan_cells] = np.nan
    transform = Affine(320.0, 0, 573440.0, 0, -320.0, 5626880.0)
    da = xr.DataArray(
        values,
        dims=("band", "y", "x"),
        coords={
            "band": np.arange(d),
            "y": 5626880.0 - 320.0 * (np.arange(h) + 0.5),
            "x": 573440.0 + 320.0 * (np.arange(w) + 0.5),
        },
        name="embedding",
    )
    da = da.rio.write_crs("EPSG:32631").rio.write_transform(transform)
    ds = da.to_dataset()
    ds["valid_fraction"] = xr.DataArray(np.ones((h, w), np.float32), dims=("y", "x"))
    return ds


def test_channel_codes_are_within_half_a_step_and_nodata_is_reserved() -> None:
    ds = _grid()
    x = ds["embedding"].values
    made = quantise(x)
    assert made.q.dtype == np.int8 and made.scheme == "channel"
    assert (made.q[:, :4, :4] == NODATA).all() and (made.q[:, 4:, :] != NODATA).all()
    assert np.abs(made.q[made.q != NODATA]).max() <= 127
    back = made.dequantise()
    assert np.isnan(back[:, :4, :4]).all()
    err = np.abs(back - x)[:, 4:, :]
    half = made.scale.astype(np.float64)[:, None, None] / 2  # type: ignore[union-attr]
    assert (err <= half * (1 + 1e-5) + 1e-7).all()
    # the step is an eighth of each band's spread between cells (or the peak's 1/127)
    cells = x.reshape(16, -1)[:, np.isfinite(x.reshape(16, -1)).all(0)].astype(np.float64)
    dev = cells - made.offset[:, None]  # type: ignore[index]
    want = np.maximum(dev.std(axis=1) / 8, np.abs(dev).max(axis=1) / 127)
    np.testing.assert_allclose(made.scale, want, rtol=1e-5)
    # what tells cells apart survives: the centred vectors agree to < 1e-2 in angle
    ref = (x[:, 4:, :] - x[:, 4:, :].mean(axis=(1, 2), keepdims=True)).reshape(16, -1)
    got = (back[:, 4:, :] - x[:, 4:, :].mean(axis=(1, 2), keepdims=True)).reshape(16, -1)
    cos = (ref * got).sum(0) / np.linalg.norm(ref, axis=0) / np.linalg.norm(got, axis=0)
    assert cos.min() > 0.99


def test_edge_grids_quantise() -> None:
    empty = np.full((4, 3, 3), np.nan, np.float32)  # no chip encoded
    assert (quantise(empty).q == NODATA).all()
    constant = np.ones((4, 3, 3), np.float32)  # one value everywhere: exact
    assert np.array_equal(quantise(constant).dequantise(), constant)
    for scheme in ("pixel", "alphaearth"):
        x = _grid()["embedding"].values
        made = quantise(x, scheme)
        back = dequantise(made.q, scheme, made.scale, made.offset)
        assert np.isnan(back[:, 0, 0]).all() and np.isfinite(back[:, 5, 5]).all()
        ref = x[:, 5, 5] / (np.linalg.norm(x[:, 5, 5]) if scheme == "alphaearth" else 1)
        assert (
            np.dot(ref, back[:, 5, 5]) / np.linalg.norm(ref) / np.linalg.norm(back[:, 5, 5]) > 0.999
        )


def test_the_product_describes_itself_and_reads_back_from_every_form(tmp_path: Path) -> None:
    ds = _grid()
    q = quantised_dataset(ds)
    for attrs in (q.attrs, q["embedding"].attrs):
        assert attrs["quantisation"] == "channel" and attrs["nodata"] == NODATA
        assert "offset[band] + scale[band] * q" in attrs["dequantisation"]
    assert q["embedding"].dtype == np.int8 and q["scale"].dims == ("band",)
    assert "valid_fraction" in q and q.rio.crs.to_epsg() == 32631
    expected = read_embeddings(q).values
    np.testing.assert_array_equal(np.isnan(expected), np.isnan(ds["embedding"].values))
    # the float32 grid reads as it is
    np.testing.assert_array_equal(read_embeddings(ds).values, ds["embedding"].values)
    # written as the pipeline writes a partition, read by path with xarray alone
    v = ZarrStore(str(tmp_path), "product").write(2019, "t", q, {"run_id": "r"})
    np.testing.assert_array_equal(read_embeddings(v.path).values, expected)
    raw = xr.open_zarr(v.path, decode_coords="all")  # what a reader without our code sees
    assert raw["embedding"].dtype == np.int8 and raw["embedding"].attrs["nodata"] == NODATA
    # the COG: the same floats from its band scales and offsets
    cog = tmp_path / "grid.tif"
    cog.write_bytes(cog_bytes(q, {"checkpoint_sha256": "ab" * 32}))
    from_cog = read_embeddings(cog)
    np.testing.assert_allclose(from_cog.values, expected, rtol=0, atol=1e-5)
    assert from_cog.rio.crs.to_epsg() == 32631


def test_cog_layout_in_rasterio_and_gdal(tmp_path: Path) -> None:
    """A grid larger than a block: internal tiles, overviews, scales, offsets, CRS."""
    ds = _grid(d=8, h=150, w=140, nan_cells=10)
    q = quantised_dataset(ds)
    path = tmp_path / "mosaic.tif"
    path.write_bytes(cog_bytes(q, {"asset": "test"}))
    with rasterio.open(path) as src:
        assert src.driver == "GTiff" and src.count == 8 and src.dtypes[0] == "uint8"
        assert src.crs.to_epsg() == 32631 and src.transform == ds.rio.transform()
        assert src.block_shapes[0] == (BLOCK, BLOCK) and src.nodata == COG_NODATA
        assert src.overviews(1) == [2, 4]  # 150 -> 75 -> 38 cells: until within one block
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.descriptions[0] == "A0000"
        assert "scale_band * u" in src.tags()["AGRIFM_DEQUANTISATION"]
        raw = src.read(3)
        value = raw.astype(np.float64) * src.scales[2] + src.offsets[2]
    expected = read_embeddings(q).values[2]
    ok = raw != COG_NODATA
    np.testing.assert_allclose(value[ok], expected[ok], atol=1e-5)
    assert (~ok == np.isnan(expected)).all()


@pytest.mark.skipif(GDALINFO is None, reason="gdalinfo not installed (apt-get install gdal-bin)")
def test_cog_opens_in_the_system_gdal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The system's GDAL (Debian 12: 3.6), not rasterio's: the layout as printed, and
    ``gdal_translate -unscale`` gives the floats (GDAL 3.6 has no signed byte: hence uint8)."""
    q = quantised_dataset(_grid(d=4, h=80, w=70, nan_cells=3))
    path = tmp_path / "g.tif"
    path.write_bytes(cog_bytes(q))
    version = subprocess.run([GDALINFO, "--version"], capture_output=True, text=True).stdout
    info = subprocess.run([GDALINFO, str(path)], capture_output=True, text=True, check=True)
    with capsys.disabled():
        print(f"\n[system GDAL used: {version.strip()}]")
    out = info.stdout
    for needed in ("LAYOUT=COG", "COMPRESSION=ZSTD", f"Block={BLOCK}x{BLOCK}", "Type=Byte",
                   "NoData Value=0", "Offset: ", "Overviews: 35x40", 'ID["EPSG",32631]',
                   "Pixel Size = (320.000000000000000,-320.000000000000000)",
                   "AGRIFM_QUANTISATION=channel", "Description = A0000"):  # fmt: skip
        assert needed in out, needed
    unscaled = tmp_path / "f.tif"
    subprocess.run(
        [shutil.which("gdal_translate") or "gdal_translate", "-q", "-unscale", "-ot", "Float32",
         "-b", "2", str(path), str(unscaled)],
        check=True,
    )  # fmt: skip
    with rasterio.open(unscaled) as src:
        got = src.read(1)
    expected = read_embeddings(q).values[1]
    ok = np.isfinite(expected)
    np.testing.assert_allclose(got[ok], expected[ok], atol=1e-5)


def test_mosaic_products_setting() -> None:
    assert canonical_mosaic_products(None, {}) == ("float32", "int8", "cog")
    assert canonical_mosaic_products("cog, INT8") == ("int8", "cog")
    assert canonical_mosaic_products(None, {"AGRIFM_PIPELINE_MOSAIC_PRODUCTS": "int8"}) == ("int8",)
    for bad in ("", "int4", ["float32", "png"]):
        with pytest.raises(SettingsError, match="float32, int8, cog"):
            canonical_mosaic_products(bad)


def _item(root: Path, asset: str, year: int, tile: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        (root / "stac" / asset / str(year) / f"{tile}.json").read_text()
    )
    return doc


def _core_valid(doc: dict[str, Any]) -> None:
    """pystac's validation against the STAC core schemas it ships (no network: the
    extension schemas are not fetched, so they are not validated here)."""
    pystac.validation.validate_dict(doc, extensions=[])


def test_products_in_a_pipeline_run_and_their_stac_items(tmp_path: Path) -> None:
    pipe = make_pipeline(tmp_path)
    assert pipe.materialise(TILES, [2019]).success
    storage, root = pipe.storage, Path(pipe.storage.root)
    # the int8 grid: made with the tile-year, from the grid version it names
    int8 = storage.store("agrifm_embedding_int8")
    grid = storage.store("agrifm_embedding_grid")
    for tile in TILES:
        q = int8.open(2019, tile, verify=True)
        g = grid.open(2019, tile)
        lineage = int8.lineage(2019, tile)
        assert lineage["inputs"]["agrifm_embedding_grid"]["version"] == grid.current(2019, tile).id  # type: ignore[union-attr]
        assert lineage["quantisation"]["quantisation"] == "channel"
        got, want = read_embeddings(q).values, g["embedding"].values
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        step = q["scale"].values[:, None, None]
        assert (np.nan_to_num(np.abs(got - want)) <= step / 2 * (1 + 1e-5) + 1e-7).all()
    # its STAC item: the model and checkpoint, dimension, quantisation, frames, checksums
    item = _item(root, "agrifm_embedding_int8", 2019, TILES[1])
    _core_valid(item)
    p = item["properties"]
    sha = p["agrifm:checkpoint_sha256"]
    assert len(sha) == 64 and p["emb:runtime_parameters"]["checkpoint_sha256"] == sha
    assert p["agrifm:dimensions"] == 128 and p["data_type"] == "int8"
    assert p["emb:quantization"] == {
        "method": "channel (agrifm-pipeline)",
        "original_dtype": "float32",
        "quantized_dtype": "int8",
    }
    assert "offset[band] + scale[band] * q" in p["agrifm:dequantisation"]
    assert p["agrifm:nodata"] == NODATA and p["agrifm:years"] == [2019]
    assert len(p["agrifm:frames"]) == 8 and p["agrifm:frames"][0][0] == "2019-01-01"
    assert p["gsd"] == 320.0 and p["agrifm:version"] == int8.current(2019, TILES[1]).id  # type: ignore[union-attr]
    assert EMB_SCHEMA in item["stac_extensions"] and "embeddings" in item["assets"]
    manifest = item["assets"]["manifest"]
    v = int8.current(2019, TILES[1])
    assert v is not None and manifest["file:checksum"] == multihash_sha256(v.manifest_sha256)
    links = {link["rel"]: link["href"] for link in item["links"]}
    model_path = (root / "stac" / "agrifm_embedding_int8" / "2019" / links["emb:model"]).resolve()
    model = json.loads(model_path.read_text())
    _core_valid(model)
    assert model["properties"]["mlm:name"] == "AgriFM S2 encoder"
    assert model["assets"]["weights"]["file:checksum"] == multihash_sha256(sha)
    assert (root / "stac" / "agrifm_embedding_int8" / "2019" / links["emb:source-data"]).exists()
    collection = json.loads(
        (root / "stac" / "agrifm_embedding_int8" / "collection.json").read_text()
    )
    _core_valid(collection)
    assert collection["emb:dimensions"] == 128 and collection["emb:type"] == "pixel"
    assert {"emb:model", "emb:source-data"} <= {link["rel"] for link in collection["links"]}
    # the float32 grid's item says it is not quantised
    assert (
        "emb:quantization" not in _item(root, "agrifm_embedding_grid", 2019, TILES[0])["properties"]
    )

    # a region over both tiles: the mosaic sensor asks for every product; the job makes them
    regions = Path(storage.regions_dir)
    write_region(regions / "field_a.geojson", 573800, 5621900, 575800, 5622900)
    ctx = dg.build_sensor_context(instance=pipe.instance, resources=pipe.resources)
    assert isinstance(region_files_sensor(ctx), dg.SensorResult)
    pipe.instance.add_dynamic_partitions("regions", ["field_a"])
    key = str(region_year_key("field_a", 2019))
    asked = region_mosaic_sensor(
        dg.build_sensor_context(instance=pipe.instance, resources=pipe.resources)
    )
    assert isinstance(asked, dg.SensorResult)
    (req,) = [r for r in asked.run_requests if r.partition_key == key]
    assert {k.to_user_string() for k in req.asset_selection or []} == {
        "region_mosaic", "region_mosaic_int8", "region_mosaic_cog"
    }  # fmt: skip
    job = pipe.defs.resolve_job_def("mosaic_regions")
    assert job.execute_in_process(instance=pipe.instance, partition_key=key).success
    mosaic = storage.store("region_mosaic").open(2019, "field_a")
    from_int8 = read_embeddings(storage.store("region_mosaic_int8").open(2019, "field_a"))
    cog_item = _item(root, "region_mosaic_cog", 2019, "field_a")
    _core_valid(cog_item)
    cog = cog_item["assets"]["data"]
    assert cog["href"].endswith("/utm_32631.tif") and cog["file:checksum"].startswith("1220")
    assert cog["file:size"] == Path(cog["href"]).stat().st_size
    assert cog_item["properties"]["emb:quantization"]["quantized_dtype"] == "uint8"
    assert cog_item["properties"]["agrifm:nodata"] == COG_NODATA
    from_cog = read_embeddings(cog["href"])
    np.testing.assert_allclose(from_cog.values, from_int8.values, atol=1e-5)
    assert from_cog.shape == mosaic["embedding"].shape
    with rasterio.open(cog["href"]) as src:
        assert src.crs.to_epsg() == 32631 and src.transform == mosaic.rio.transform()
    # made from the current grids: nothing asked again
    again = region_mosaic_sensor(
        dg.build_sensor_context(instance=pipe.instance, resources=pipe.resources)
    )
    assert key not in {r.partition_key for r in getattr(again, "run_requests", [])}
