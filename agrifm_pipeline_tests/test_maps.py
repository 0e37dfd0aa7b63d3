"""Similarity and few-shot maps on the synthetic source, where the truth is known.

One small synthetic region is materialised once for the module (2 x 2 tiles of 8 x 8
chips of 32 px at 10 m, the tiny checkpoint at its native scale: one 320 m cell per
chip, fields of 1.2 km on average, so a field holds a few cells); its fields and crop
types come from the provider itself (``SyntheticProvider.truth``).

The margins the maps must beat, stated once:

* similarity: from a point inside a field, that field's cells rank above the other
  fields' cells with an AUC of at least :data:`MIN_FIELD_AUC` (0.5 is chance), and the
  other fields of its crop above the fields of other crops on average;
* classification: balanced accuracy, cross-validated with whole fields held out, at
  least :data:`MIN_MARGIN` above chance (1 / number of classes) for logistic
  regression, and :data:`MIN_MARGIN_KNN` for k-NN.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import dagster as dg
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from odc.geo.geobox import GeoBox
from pyproj import Transformer

from agrifm_pipeline import stages
from agrifm_pipeline.cli import main
from agrifm_pipeline.definitions import build_defs
from agrifm_pipeline.defs.audit import audit_rows
from agrifm_pipeline.defs.partitions import region_year_key, tile_year_key
from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
from agrifm_pipeline.defs.resources import S2Source
from agrifm_pipeline.defs.sensors import map_remake_sensor, register_regions
from agrifm_pipeline.defs.staleness import current_fingerprints, stage_stores
from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.mapping import (
    Samples,
    cross_validate,
    load_embeddings,
    parse_query,
    read_labels,
    sample,
    similarity,
)
from agrifm_pipeline.providers.synthetic import CROP_NAMES, SyntheticProvider

from .pipeline_helpers import make_resources

YEAR = 2020
REGION = "synth"
FIELD_M = 1200.0
SEED = 0
MIN_FIELD_AUC = 0.85
MIN_MARGIN = 0.4  # logistic: balanced accuracy >= chance + 0.4 (chance is 0.25)
MIN_MARGIN_KNN = 0.3


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic region's grids and mosaics, stored; its truth at each cell's centre."""
    root = tmp_path_factory.mktemp("maps")
    resources = make_resources(root, chip_px=32, chips_per_side=8, image_size=32)
    resources["s2"] = S2Source(backend="synthetic", synthetic_seed=SEED, synthetic_field_m=FIELD_M)
    storage = resources["storage"]
    regions = Path(storage.regions_dir)
    regions.mkdir(parents=True)
    # two by two tiles of 2560 m (E0225..E0226, N2196..N2197 of zone 31N)
    gpd.GeoDataFrame(
        geometry=[shapely.box(576100, 5621860, 581020, 5626780)], crs="EPSG:32631"
    ).to_file(regions / f"{REGION}.geojson", driver="GeoJSON")
    defs = build_defs(resources)
    instance = dg.DagsterInstance.ephemeral()
    _, tiles, regs = register_regions(instance, resources["tile_year"], storage)
    assert len(tiles) == 4 and regs == [REGION]
    instance.add_dynamic_partitions("tiles", tiles)
    instance.add_dynamic_partitions("regions", regs)
    order = instance.get_dynamic_partitions("tiles")
    embedded = defs.resolve_job_def("embed_tile_years").execute_in_process(
        instance=instance,
        tags={
            RANGE_START: str(tile_year_key(order[0], YEAR)),
            RANGE_END: str(tile_year_key(order[-1], YEAR)),
        },
        asset_selection=[
            dg.AssetKey(s.asset) for s in (stages.FRAMES, stages.TENSORS, stages.GRID)
        ],
    )
    assert embedded.success
    mosaics = defs.resolve_job_def("mosaic_regions").execute_in_process(
        instance=instance, partition_key=str(region_year_key(REGION, YEAR))
    )
    assert mosaics.success
    emb = load_embeddings(storage.store(stages.MOSAIC.asset), YEAR, REGION)
    (grid,) = emb.grids
    h, w = grid.data.shape[-2:]
    t = grid.transform
    x0, y1 = t @ (0, 0)
    x1, y0 = t @ (w, h)
    area = GeoBox.from_bbox((x0, y0, x1, y1), str(grid.crs), resolution=10)
    provider = SyntheticProvider(seed=SEED, field_size_m=FIELD_M)
    truth = provider.truth(area)
    px = round(t.a / 10)  # pixels per cell
    labels = provider.write_field_labels(area, root / "fields.geojson")
    return {
        "root": root,
        "defs": defs,
        "instance": instance,
        "storage": storage,
        "emb": emb,
        "tiles": order,
        # the truth at each cell's centre
        "field": truth.field[px // 2 :: px, px // 2 :: px][:h, :w],
        "crop": truth.crop[px // 2 :: px, px // 2 :: px][:h, :w],
        "labels": labels,
        "resources": resources,
    }


def _lonlat(region: dict[str, Any], row: int, col: int) -> tuple[float, float]:
    grid = region["emb"].grids[0]
    x, y = grid.transform @ (col + 0.5, row + 0.5)
    lon, lat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(x, y)
    return float(lon), float(lat)


def _largest_field(region: dict[str, Any]) -> tuple[int, int, int]:
    """The field with the most cells, and a cell in its middle."""
    field = region["field"]
    ids, counts = np.unique(field[field >= 0], return_counts=True)
    best = int(ids[counts.argmax()])
    cells = np.argwhere(field == best)
    row, col = cells[len(cells) // 2]
    return best, int(row), int(col)


def test_synthetic_fields_are_one_layout_for_every_grid_and_labelled() -> None:
    """A field is the same field on any grid of the CRS; the polygons carry its crop."""
    provider = SyntheticProvider(seed=SEED, field_size_m=FIELD_M)
    big = GeoBox.from_bbox((576000, 5621760, 581120, 5626880), "EPSG:32631", resolution=10)
    part = GeoBox.from_bbox((577280, 5623040, 578560, 5624320), "EPSG:32631", resolution=10)
    a, b = provider.truth(big), provider.truth(part)
    r0, c0 = (5626880 - 5624320) // 10, (577280 - 576000) // 10
    np.testing.assert_array_equal(b.field, a.field[r0 : r0 + 128, c0 : c0 + 128])
    np.testing.assert_array_equal(b.crop, a.crop[r0 : r0 + 128, c0 : c0 + 128])
    assert set(np.unique(a.crop)) == {-1, *range(len(CROP_NAMES))}  # every crop, and tracks
    assert ((a.field < 0) == (a.crop < 0)).all() and 0.005 < (a.field < 0).mean() < 0.05
    polygons = provider.field_polygons(part)
    assert set(polygons["field_id"]) == set(np.unique(b.field[b.field >= 0]))
    for rec in polygons.itertuples():
        assert set(np.unique(b.crop[b.field == rec.field_id])) == {rec.crop_id}
        assert CROP_NAMES[rec.crop_id] == rec.crop


def test_synthetic_crops_differ_in_colour_and_phenology() -> None:
    """The year's median in true colour tells grassland (green) from bare-soil crops, and
    the crops' NDVI curves peak at different times: the fields show in the preview."""
    from agrifm_pipeline.frames import frame_windows
    from agrifm_pipeline.providers.base import CloudMask
    from agrifm_pipeline.specs import SensorSpec

    provider = SyntheticProvider(seed=SEED, cloud_cover=0.0)  # fields of 400 m: many
    area = GeoBox.from_bbox((576000, 5621760, 578560, 5624320), "EPSG:32631", resolution=20)
    stack = provider.fetch(area, frame_windows(YEAR, 8), SensorSpec(), CloudMask())
    crop = provider.truth(area).crop
    v = stack.data.values.astype(float)  # (T, band, y, x) in AgriFM's band order
    ndvi = (v[:, 6] - v[:, 2]) / (v[:, 6] + v[:, 2])
    median = np.median(v, axis=0)
    greenness, peaks = {}, {}
    for i, name in enumerate(CROP_NAMES):
        sel = crop == i
        if sel.any():
            greenness[name] = float((median[1][sel] / median[2][sel]).mean())  # B3 / B4
            peaks[name] = int(ndvi[:, sel].mean(axis=1).argmax())
    assert greenness["grassland"] > 1.0 > max(greenness["maize"], greenness["sugar_beet"])
    assert peaks["winter_cereal"] < peaks["maize"]  # spring against summer


def test_similarity_from_a_point_ranks_its_field_first(region: dict[str, Any]) -> None:
    field, crop = region["field"], region["crop"]
    best, row, col = _largest_field(region)
    lon, lat = _lonlat(region, row, col)
    found = similarity(region["emb"], parse_query(at=f"{lon},{lat}"))
    ((_, sim, cells),) = found.grids
    assert cells.sum() == 1 and cells[row, col] and sim[row, col] == pytest.approx(1.0, abs=1e-5)
    same = sim[field == best]
    other = sim[(field >= 0) & (field != best)]
    auc = float((same[:, None] > other[None, :]).mean())
    assert auc >= MIN_FIELD_AUC, f"field AUC {auc:.3f}"
    assert same.mean() > other.mean() + 0.3
    k = crop[row, col]
    same_crop = sim[(crop == k) & (field != best)]
    other_crop = sim[(crop >= 0) & (crop != k)]
    assert same_crop.mean() > other_crop.mean() + 0.1
    # a polygon (the field's cells) ranks it first too, with the plain cosine as well
    cell = region["emb"].grids[0].transform.a
    x, y = region["emb"].grids[0].transform @ (col + 0.5, row + 0.5)
    to_ll = Transformer.from_crs(region["emb"].grids[0].crs, "EPSG:4326", always_xy=True)
    box = shapely.box(*to_ll.transform_bounds(x - cell, y - cell, x + cell, y + cell))
    for metric in ("standardised", "cosine"):
        poly = similarity(region["emb"], parse_query(polygon=box.wkt), metric)
        ((_, psim, pcells),) = poly.grids
        assert 1 <= pcells.sum() <= 9
        ps, po = psim[field == best], psim[(field >= 0) & (field != best)]
        assert float((ps[:, None] > po[None, :]).mean()) >= MIN_FIELD_AUC, metric


def test_a_query_outside_the_product_names_its_extent(region: dict[str, Any]) -> None:
    with pytest.raises(InputContractError, match=r"falls outside .* it covers lon"):
        similarity(region["emb"], parse_query(at="10.0,45.0"))
    with pytest.raises(InputContractError, match="exactly one of"):
        parse_query()
    with pytest.raises(InputContractError, match="LON,LAT"):
        parse_query(at="50.8")


def test_classifier_recovers_the_synthetic_crops(region: dict[str, Any]) -> None:
    labels = read_labels(region["labels"], "crop")
    samples = sample(region["emb"], labels)
    assert set(labels.classes) == set(CROP_NAMES)
    # every sampled cell carries the crop the truth has at its centre
    truth = {n: i for i, n in enumerate(CROP_NAMES)}
    assert all(v["fields"] >= 2 for v in samples.per_class().values()), samples.per_class()
    for model, margin in (("logistic", MIN_MARGIN), ("knn", MIN_MARGIN_KNN)):
        report = cross_validate(samples, model)
        chance = report["chance_balanced_accuracy"]
        assert chance == pytest.approx(1 / len(CROP_NAMES))
        assert report["balanced_accuracy"] >= chance + margin, (model, report)
        assert report["grouped_by"] == "field" and report["folds"] >= 2
        assert sum(map(sum, report["confusion"])) == samples.y.size
    crops = {labels.classes[i] for i in np.unique(samples.y)}
    assert crops <= set(truth)


def test_cross_validation_never_trains_on_a_test_field() -> None:
    """Fields whose cells share a vector of their own but whose classes are drawn at
    random: a classifier that saw cells of the test field would score near 100 %; held
    out by field, it can only guess."""
    rng = np.random.default_rng(0)
    n_fields, per_field, dim = 40, 12, 16
    groups = np.repeat([f"f{i}" for i in range(n_fields)], per_field)
    y = np.repeat(rng.integers(0, 2, size=n_fields), per_field)
    x = np.repeat(rng.normal(size=(n_fields, dim)), per_field, axis=0)
    x += rng.normal(scale=0.01, size=x.shape)
    report = cross_validate(Samples(x, y, groups, ("a", "b")), "knn", k=1)
    assert report["accuracy"] < 0.75, report["accuracy"]


def _run(*argv: str) -> dict[str, Any]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(argv)) == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def test_cli_similar_writes_a_versioned_cog_and_png(region: dict[str, Any], tmp_path: Path) -> None:
    root = str(region["storage"].root)
    _, row, col = _largest_field(region)
    lon, lat = _lonlat(region, row, col)
    args = ("similar", "--store", root, "--region", REGION, "--year", str(YEAR), "--json")
    first = _run(*args, "--at", f"{lon},{lat}", "--out", str(tmp_path / "out"))
    second = _run(*args, "--at", f"{lon},{lat}")
    assert first["version"] != second["version"]  # each map a new version
    files = first["files"]
    assert set(files) == {"similarity.tif", "similarity.png", "query.geojson"}
    with rasterio.open(files["similarity.tif"]) as src:
        assert src.crs.to_epsg() == 32631 and src.count == 1 and src.dtypes[0] == "float32"
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        band = src.read(1)
        assert band[row, col] == pytest.approx(1.0, abs=1e-5)
    assert Path(files["similarity.png"]).read_bytes()[:4] == b"\x89PNG"
    assert sorted(Path(p).name for p in first["copied"]) == sorted(files)
    # the lineage names the embedding version it was made from (and the mosaic's grids)
    store = region["storage"].files(stages.SIMILARITY.asset)
    lineage = store.lineage(YEAR, REGION)
    mosaic = region["emb"].version
    assert lineage["inputs"][stages.MOSAIC.asset]["version"] == mosaic.id
    assert set(lineage["inputs"][stages.GRID.asset]["versions"]) == set(region["tiles"])
    assert lineage["query"]["kind"] == "point" and lineage["embedding"]["version"] == mosaic.id
    item = Path(root) / "stac" / stages.SIMILARITY.asset / str(YEAR) / f"{REGION}.json"
    assert json.loads(item.read_text())["properties"]["agrifm:version"] == second["version"]


def test_cli_classify_on_the_int8_mosaic_and_a_tile(region: dict[str, Any]) -> None:
    root = str(region["storage"].root)
    labels = str(region["labels"])
    common = ("classify", "--store", root, "--year", str(YEAR), "--labels", labels, "--json")
    out = _run(*common, "--region", REGION, "--product", stages.MOSAIC_INT8.asset)
    report = out["report"]
    assert report["balanced_accuracy"] >= report["chance_balanced_accuracy"] + MIN_MARGIN
    assert out["read"].startswith(stages.MOSAIC_INT8.asset)
    files = out["files"]
    assert {"classes.tif", "confidence.tif", "classes.png", "report.json"} <= set(files)
    with rasterio.open(files["classes.tif"]) as src:
        assert src.nodata == 255 and src.colormap(1)[0][:3] != (0, 0, 0)
        names = [src.tags()[f"CLASS_{i}"] for i in range(4)]
        classes = src.read(1)
    assert set(names) == set(CROP_NAMES)
    field, crop = region["field"], region["crop"]
    inside = (field >= 0) & (classes != 255)
    mapped = np.array([CROP_NAMES.index(names[c]) for c in classes[inside]])
    assert (mapped == crop[inside]).mean() > 0.8  # fitted on every field: the map is right
    tile = region["tiles"][0]
    one = _run(*common, "--tile", tile, "--model", "knn")
    assert one["partition"] == f"{tile}|{YEAR}"
    assert one["read"].startswith(stages.GRID.asset)


def test_the_ui_assets_materialise_with_their_config(region: dict[str, Any]) -> None:
    defs, instance = region["defs"], region["instance"]
    _, row, col = _largest_field(region)
    lon, lat = _lonlat(region, row, col)
    job = defs.resolve_implicit_global_asset_job_def()
    key = str(region_year_key(REGION, YEAR))
    result = job.execute_in_process(
        instance=instance,
        partition_key=key,
        asset_selection=[dg.AssetKey(stages.SIMILARITY.asset), dg.AssetKey(stages.CLASSES.asset)],
        run_config={
            "ops": {
                stages.SIMILARITY.asset: {"config": {"at": f"{lon},{lat}"}},
                stages.CLASSES.asset: {
                    "config": {"labels": str(region["labels"]), "label_property": "crop"}
                },
            }
        },
    )
    assert result.success
    mats = {
        m.asset_key.to_user_string(): m.metadata for m in result.get_asset_materialization_events()
        for m in [m.materialization]
    }  # fmt: skip
    mosaic = region["emb"].version.id
    for asset in (stages.SIMILARITY.asset, stages.CLASSES.asset):
        assert mats[asset]["embedding_version"].value == mosaic
        store = region["storage"].files(asset)
        assert store.current(YEAR, REGION).id == mats[asset]["version"].value
    assert mats[stages.CLASSES.asset]["balanced_accuracy"].value >= 0.25 + MIN_MARGIN
    # without its config the class map says what to give
    bad = job.execute_in_process(
        instance=instance,
        partition_key=key,
        asset_selection=[dg.AssetKey(stages.CLASSES.asset)],
        raise_on_error=False,
    )
    assert not bad.success


def test_every_region_product_reads_as_the_same_vectors(region: dict[str, Any]) -> None:
    """The float32 mosaic, its int8 Zarr and its COG give one grid of vectors (to the
    int8 step), on the same cells, each naming the version it read."""
    storage = region["storage"]
    ref = region["emb"].grids[0]
    for row in (stages.MOSAIC_INT8, stages.MOSAIC_COG):
        emb = load_embeddings(storage.stage_store(row.asset), YEAR, REGION)
        (grid,) = emb.grids
        assert emb.version.asset == row.asset and grid.transform == ref.transform
        a, b = ref.values(), grid.values()
        assert a.shape == b.shape and (np.isnan(a) == np.isnan(b)).all()
        cos = (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
        assert np.nanmin(cos) > 0.999, row.asset
    with pytest.raises(InputContractError, match="no partition"):
        load_embeddings(storage.stage_store(stages.MOSAIC.asset), YEAR - 1, REGION)


def _map_audit(region: dict[str, Any]) -> dict[str, Any]:
    """The audit's rows of the region's mosaic and maps, by asset."""
    res = region["resources"]
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    rows = audit_rows(region["instance"], stage_stores(region["storage"]), current, unknown=unknown)
    wanted = (stages.MOSAIC.asset, *(s.asset for s in stages.MAPS))
    return {r.asset: r for r in rows if r.asset in wanted and (r.tile, r.year) == (REGION, YEAR)}


def _remake_requests(region: dict[str, Any], cursor: str | None = None) -> dg.SensorResult:
    ctx = dg.build_sensor_context(
        instance=region["instance"], resources=region["resources"], cursor=cursor
    )
    result = map_remake_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    return result


def test_maps_are_audited_and_remade_when_their_mosaic_changes(
    region: dict[str, Any], tmp_path: Path
) -> None:
    """A map is current while the mosaic version it read is the current one; a new mosaic
    makes it stale (the audit names both versions) and the sensor requests it again with
    the config its lineage recorded, unless its labels file changed since; once re-made
    it is current again. (Last in the module: it leaves a new mosaic version behind.)"""
    defs, instance, storage = region["defs"], region["instance"], region["storage"]
    key = str(region_year_key(REGION, YEAR))
    _, row, col = _largest_field(region)
    lon, lat = _lonlat(region, row, col)
    labels = tmp_path / "labels.geojson"
    labels.write_bytes(Path(region["labels"]).read_bytes())
    similar = {"at": f"{lon},{lat}", "polygon": "", "product": stages.MOSAIC.asset,
               "metric": "cosine"}  # fmt: skip
    classes = {"labels": str(labels), "label_property": "crop", "group_by": "", "model": "knn",
               "k": 3, "folds": 3, "product": stages.MOSAIC.asset}  # fmt: skip
    job = defs.resolve_implicit_global_asset_job_def()
    made = job.execute_in_process(
        instance=instance,
        partition_key=key,
        asset_selection=[dg.AssetKey(s.asset) for s in stages.MAPS],
        run_config={"ops": {stages.SIMILARITY.asset: {"config": similar},
                            stages.CLASSES.asset: {"config": classes}}},
    )  # fmt: skip
    assert made.success
    first = _map_audit(region)
    assert {a: r.status for a, r in first.items()} == dict.fromkeys(first, "current")
    assert set(first) == {stages.MOSAIC.asset, stages.SIMILARITY.asset, stages.CLASSES.asset}
    skipped = _remake_requests(region)
    assert not skipped.run_requests and "every map is made from" in str(skipped.skip_reason)

    # A new mosaic version (the mosaic made again): both maps stale, naming the versions.
    old = first[stages.MOSAIC.asset].version
    again = defs.resolve_job_def("mosaic_regions").execute_in_process(
        instance=instance, partition_key=key, asset_selection=[dg.AssetKey(stages.MOSAIC.asset)]
    )
    assert again.success
    stale = _map_audit(region)
    new = stale[stages.MOSAIC.asset].version
    assert new != old and stale[stages.MOSAIC.asset].status == "current"
    for asset in (stages.SIMILARITY.asset, stages.CLASSES.asset):
        assert stale[asset].status == "stale", stale[asset]
        assert stale[asset].why == (
            f"made from {stages.MOSAIC.asset} version {old}; the current one is {new}"
        )

    # Labels changed since: only the similarity map is requested; the class map is not.
    labels.write_bytes(labels.read_bytes() + b"\n")
    one = _remake_requests(region)
    (req,) = one.run_requests or []
    assert req.asset_selection == [dg.AssetKey(stages.SIMILARITY.asset)]
    assert req.partition_key == key
    assert req.run_config == {"ops": {stages.SIMILARITY.asset: {"config": similar}}}
    assert one.cursor is not None and stages.CLASSES.asset in one.cursor  # reported once
    # The labels as they were: both requested, each with the config its lineage recorded.
    labels.write_bytes(labels.read_bytes()[:-1])
    both = _remake_requests(region, one.cursor)
    requested = list(both.run_requests or [])
    by_asset = {(r.asset_selection or [])[0].to_user_string(): r for r in requested}
    assert set(by_asset) == {stages.SIMILARITY.asset, stages.CLASSES.asset}
    assert by_asset[stages.CLASSES.asset].run_config == {
        "ops": {stages.CLASSES.asset: {"config": classes}}
    }
    for r in requested:
        ran = job.execute_in_process(
            instance=instance,
            partition_key=r.partition_key,
            asset_selection=r.asset_selection,
            run_config=r.run_config,
        )
        assert ran.success
    after = _map_audit(region)
    assert {a: r.status for a, r in after.items()} == dict.fromkeys(after, "current")
    for asset in (stages.SIMILARITY.asset, stages.CLASSES.asset):
        assert after[asset].version != stale[asset].version
        lineage = storage.files(asset).lineage(YEAR, REGION)
        assert lineage["inputs"][stages.MOSAIC.asset]["version"] == new
    assert not _remake_requests(region, both.cursor).run_requests
    region["emb"] = load_embeddings(storage.store(stages.MOSAIC.asset), YEAR, REGION)
