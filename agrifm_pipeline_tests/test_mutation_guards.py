"""Tests written against the realistic bugs of ``bench/mutate.py`` that used to survive.

Each test pins one behaviour with an independent expectation (hand-computed
values, the published statistics, a tile's own chip footprints, the official
reference outputs at a tolerance that sees the upstream quirks), so that a
plausible slip — chips placed transposed, a swapped band statistic, a
fingerprint that forgets a setting, an antialiased downsample — fails here.
``bench/mutate.py`` lists which mutation each test catches.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine

from agrifm_pipeline import lineage
from agrifm_pipeline.checkpoint import sha256_file
from agrifm_pipeline.frames import range_windows
from agrifm_pipeline.model import load_encoder
from agrifm_pipeline.model.config import AGRIFM_S2_MEAN, AGRIFM_S2_STD
from agrifm_pipeline.preprocess import normalize, preprocess_chips, preprocess_input
from agrifm_pipeline.providers.base import CloudMask
from agrifm_pipeline.providers.compositing import Scene, clear_mask, composite_windows
from agrifm_pipeline.specs import SensorSpec
from agrifm_pipeline.tiles import Tile
from agrifm_pipeline.tileyear import (
    TileYearSettings,
    cell_coverage,
    chip_coverage,
    chip_table,
    embedding_grid,
    normalise_tile,
    tile_chips,
)
from agrifm_pipeline_tests.fixtures.reference import tiny_case, tiny_cases, tiny_checkpoint

# --- a small tile: 3 x 3 chips of 16 px at 10 m, far from the zone's origin ---------------

CFG = TileYearSettings(chip_px=16, chips_per_side=3, image_size=16, n_frames=2)
TILE = Tile(32631, 480, 1201, 11712)  # x 576480..576960, y 5621760..5622240
PER = CFG.chips_per_side


def _chip_features(h: int = 2, d: int = 3) -> np.ndarray:
    """(chips, d, h, h): 1000 * channel + 100 * chip + 10 * row + col, every value distinct."""
    chip, ch, y, x = np.meshgrid(
        np.arange(PER * PER), np.arange(d), np.arange(h), np.arange(h), indexing="ij"
    )
    return (1000 * ch + 100 * chip + 10 * y + x).astype(np.float32)


def test_embedding_grid_puts_chip_i_at_row_i_div_n_and_column_i_mod_n() -> None:
    feats = _chip_features()
    grid = embedding_grid(torch.from_numpy(feats), TILE, CFG)
    values = grid.values
    assert values.shape == (3, PER * 2, PER * 2)
    for i in range(PER * PER):
        r, c = divmod(i, PER)
        np.testing.assert_array_equal(
            values[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2], feats[i], err_msg=f"chip {i}"
        )


def test_embedding_grid_cells_lie_inside_their_chips_footprint() -> None:
    """Coordinates, transform and CRS from the tile's bounds; each chip's cells sit inside
    the footprint ``Tile.chip_geoboxes`` gives that chip (an independent computation)."""
    grid = embedding_grid(_chip_features(h=2), TILE, CFG)
    cell = CFG.chip_px * CFG.scale_m / 2  # 80 m
    x0, y0, x1, y1 = TILE.bounds
    assert grid.rio.crs.to_epsg() == 32631
    assert tuple(grid.rio.transform()) == tuple(Affine(cell, 0.0, x0, 0.0, -cell, y1))
    np.testing.assert_allclose(grid["x"].values, x0 + cell * (np.arange(6) + 0.5))
    np.testing.assert_allclose(grid["y"].values, y1 - cell * (np.arange(6) + 0.5))
    assert grid.rio.bounds() == pytest.approx((x0, y0, x1, y1))
    chips = TILE.chip_geoboxes(CFG.chip_px, CFG.scale_m)
    for i, gbox in enumerate(chips):
        r, c = divmod(i, PER)
        left, bottom, right, top = gbox.extent.boundingbox
        xs = grid["x"].values[2 * c : 2 * c + 2]
        ys = grid["y"].values[2 * r : 2 * r + 2]
        assert (left < xs).all() and (xs < right).all(), f"chip {i} columns"
        assert (bottom < ys).all() and (ys < top).all(), f"chip {i} rows"
        # The cell whose value names chip i (100 * i) is at those coordinates.
        sel = grid.sel(x=xs[0], y=ys[0]).values
        assert sel[0] == 100 * i


def test_chip_table_footprints_are_the_tiles_chips_from_the_top_left() -> None:
    feats = _chip_features()
    grid = embedding_grid(feats, TILE, CFG)
    table = chip_table(grid, TILE, 2019, CFG)
    chips = TILE.chip_geoboxes(CFG.chip_px, CFG.scale_m)
    assert list(table["chip"]) == list(range(PER * PER))
    for i, gbox in enumerate(chips):
        row = table.iloc[i]
        left, bottom, right, top = gbox.extent.boundingbox
        got = (row["utm_minx"], row["utm_miny"], row["utm_maxx"], row["utm_maxy"])
        assert got == pytest.approx((left, bottom, right, top)), f"chip {i}"
        assert (row["chip_row"], row["chip_col"]) == divmod(i, PER)
        np.testing.assert_allclose(row["mean"], feats[i].mean(axis=(1, 2)))
        np.testing.assert_allclose(row["max"], feats[i].max(axis=(1, 2)))
    # The WGS84 geometry is the UTM footprint reprojected: its centroid maps back inside.
    back = table.geometry.to_crs(TILE.crs).centroid
    for i, gbox in enumerate(chips):
        left, bottom, right, top = gbox.extent.boundingbox
        assert left < back.iloc[i].x < right and bottom < back.iloc[i].y < top


def test_tile_chips_and_coverage_read_chips_row_major_from_the_top_left() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(1, 10000, size=(2, 10, 48, 48), dtype=np.uint16)
    values[:, :, :16, 16:32] = 0  # chip 1 (top row, middle column) is all fill
    values[1, :, 32:, :16] = 0  # chip 6 (bottom row, left) has data in one frame of two
    chips = tile_chips(values, 16)
    assert chips.shape == (3, 3, 2, 10, 16, 16)
    for i in range(9):
        r, c = divmod(i, 3)
        block = values[:, :, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
        np.testing.assert_array_equal(chips[r, c], block)
    valid = (values != 0).any(axis=1).sum(axis=0).astype(np.uint8)
    cov = chip_coverage(valid, 2, 16)
    np.testing.assert_allclose(cov, [1, 0, 1, 1, 1, 1, 0.5, 1, 1])
    cells = cell_coverage(valid, 2, CFG, 2)  # 2 x 2 cells per chip
    assert cells.shape == (6, 6)
    np.testing.assert_allclose(cells[0:2, 2:4], 0)  # chip 1
    np.testing.assert_allclose(cells[4:6, 0:2], 0.5)  # chip 6
    # Normalising the tile gives chip i's own normalised pixels, in the same order.
    tensor, _ = normalise_tile(values, CFG)
    for i in (1, 3, 5, 6):
        r, c = divmod(i, 3)
        own = preprocess_input(
            values[:, :, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16],
            n_frames=2,
            image_size=16,
            norm_mode=CFG.norm_mode,
        )
        torch.testing.assert_close(tensor[i], own.tensor, rtol=0, atol=1e-6)


# --- normalisation: every band's published statistics, on both paths ------------------------

# AgriFM's S2 pre-training statistics (configs/cropland_mapping.py upstream), in DN: the
# expectation is written out here, not imported, so a swapped or mistyped value fails.
PUBLISHED_MEAN = (4179.192015478227, 4065.9106675194444, 3957.274910960156, 5207.452475253116,
                  4327.12234687, 4873.16102239, 5049.1637925, 5111.07806856, 3056.86349163,
                  2490.9675032)  # fmt: skip
PUBLISHED_STD = (4041.5212325268735, 3691.003119315892, 3629.331318356375, 2973.5178530908756,
                 3569.73343885, 3085.9151435, 2937.56005119, 2806.04462314, 1808.30013156,
                 1694.20220774)  # fmt: skip


def test_band_statistics_are_the_published_ones() -> None:
    np.testing.assert_array_equal(AGRIFM_S2_MEAN, PUBLISHED_MEAN)
    np.testing.assert_array_equal(AGRIFM_S2_STD, PUBLISHED_STD)


def _band_ramp(dtype: type) -> np.ndarray:
    """(1, 2, 10, 16, 16) chips whose band b holds 500 * (b + 1) + pixel index: every band
    distinct, and values from 500 to 5255."""
    base = (500 * (np.arange(10) + 1))[:, None, None] + np.arange(256).reshape(16, 16)
    return np.broadcast_to(base, (1, 2, 10, 16, 16)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
def test_agrifm_stats_on_every_band_and_every_path(dtype: type) -> None:
    """The integer chip path (in place), the float chip path and the single-input path all
    give (DN - mean_b) / std_b for each band b."""
    chips = _band_ramp(dtype)
    raw = chips.astype(np.float64)
    mean = np.array(PUBLISHED_MEAN)[:, None, None]
    std = np.array(PUBLISHED_STD)[:, None, None]
    expected = (raw - mean) / std
    got = preprocess_chips(chips, n_frames=2, image_size=16, norm_mode="agrifm_stats").tensor
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
    single = preprocess_input(chips[0], n_frames=2, image_size=16, norm_mode="agrifm_stats")
    np.testing.assert_allclose(single.tensor.numpy(), expected[0], rtol=1e-6, atol=1e-6)
    outofplace = normalize(raw[0].astype(np.float32), "agrifm_stats")
    np.testing.assert_allclose(outofplace, expected[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_unit_scale_on_every_path_is_dn_over_ten_thousand_clipped(dtype: type) -> None:
    chips = _band_ramp(dtype).copy()
    chips[0, 0, 0, 0, 0] = 12000  # above the clip
    expected = np.clip(chips.astype(np.float64), 0, 10000) / 10000
    got = preprocess_chips(chips, n_frames=2, image_size=16, norm_mode="unit_scale").tensor
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)
    single = preprocess_input(chips[0], n_frames=2, image_size=16, norm_mode="unit_scale")
    np.testing.assert_allclose(single.tensor.numpy(), expected[0], rtol=1e-6, atol=1e-7)
    tile_cfg = dataclasses.replace(CFG, norm_mode="unit_scale", image_size=16)
    tile = np.zeros((2, 10, 48, 48), dtype=dtype)
    tile[:, :, :16, :16] = chips[0]
    tensor, _ = normalise_tile(tile, tile_cfg)
    np.testing.assert_allclose(tensor[0].numpy(), expected[0], rtol=1e-6, atol=1e-7)


# --- resize: downsampling is plain bilinear (no antialias), as upstream ---------------------


def test_downsampling_by_two_is_the_two_by_two_mean() -> None:
    """Bilinear, align_corners=False, no antialias: halving samples between each pixel pair,
    i.e. the mean of each 2 x 2 block (an antialiased resize would blur wider)."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 10000, size=(1, 10, 32, 32)).astype(np.float32)
    out = preprocess_input(x, n_frames=1, image_size=16, norm_mode="none").tensor.numpy()
    blocks = x.reshape(1, 10, 16, 2, 16, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(out, blocks, rtol=1e-6, atol=1e-3)


def test_downsampling_by_four_reads_only_the_middle_pixels() -> None:
    """At a quarter, output pixel j samples input 4j + 1.5: the mean of pixels 4j+1, 4j+2
    along each axis — pixels 4j and 4j+3 do not count at all."""
    x = np.zeros((1, 10, 64, 64), dtype=np.float32)
    x[..., 1:3, 1:3] = 4000.0  # the middle of the top-left 4 x 4 block
    x[..., 4:8:3, 4:8:3] = 9000.0  # the corners of the next block: not sampled
    out = preprocess_input(x, n_frames=1, image_size=16, norm_mode="none").tensor.numpy()
    assert out[0, 0, 0, 0] == pytest.approx(4000.0)
    assert out[0, 0, 1, 1] == pytest.approx(0.0)
    chips = preprocess_chips(
        x[None].astype(np.uint16), n_frames=1, image_size=16, norm_mode="none"
    ).tensor.numpy()
    np.testing.assert_allclose(chips[0], out, atol=1e-3)


# --- fingerprints: each setting moves exactly its stages --------------------------------------

FP_ARGS = {"provider": {"name": "local", "root": "/x"}, "checkpoint_sha256": "ab" * 32}


def _fps(cfg: TileYearSettings) -> tuple[str, str, str]:
    f = cfg.fingerprints(precision="float32", **FP_ARGS)  # type: ignore[arg-type]
    return (f.acquisition.value, f.normalisation.value, f.embedding.value)


@pytest.mark.parametrize(
    ("change", "stages"),
    [
        ({"cloudy_pct": 31.0}, (0, 1, 2)),
        ({"n_frames": 4}, (0, 1, 2)),
        ({"composite": "mosaic"}, (0, 1, 2)),
        ({"fill_value": 1.0}, (0, 1, 2)),
        ({"cloud_mask": "none"}, (0, 1, 2)),
        ({"scl_classes": (0, 3)}, (0, 1, 2)),
        ({"chip_px": 32}, (0, 1, 2)),
        ({"image_size": 112}, (1, 2)),
        ({"norm_mode": "unit_scale"}, (1, 2)),
        ({"min_chip_coverage": 0.5}, (2,)),
    ],
)
def test_each_setting_changes_exactly_its_stages(change: dict, stages: tuple[int, ...]) -> None:
    base = TileYearSettings()
    before, after = _fps(base), _fps(dataclasses.replace(base, **change))
    moved = tuple(i for i in range(3) if before[i] != after[i])
    assert moved == stages, f"{change}: stages {moved} moved, expected {stages}"


@pytest.mark.parametrize(
    ("stage", "moved"),
    [("acquisition", (0, 1, 2)), ("normalisation", (1, 2)), ("embedding", (2,))],
)
def test_a_stage_code_version_bump_changes_that_stage_and_below(
    monkeypatch: pytest.MonkeyPatch, stage: str, moved: tuple[int, ...]
) -> None:
    before = _fps(TileYearSettings())
    monkeypatch.setitem(lineage.CODE_VERSIONS, stage, lineage.CODE_VERSIONS[stage] + "-next")
    after = _fps(TileYearSettings())
    assert tuple(i for i in range(3) if before[i] != after[i]) == moved


def test_precision_checkpoint_and_provider_move_only_their_stages() -> None:
    cfg = TileYearSettings()
    a = cfg.fingerprints(precision="float32", **FP_ARGS)  # type: ignore[arg-type]
    b = cfg.fingerprints(precision="bfloat16", **FP_ARGS)  # type: ignore[arg-type]
    c = cfg.fingerprints(
        precision="float32", provider=FP_ARGS["provider"], checkpoint_sha256="cd" * 32
    )
    d = cfg.fingerprints(
        precision="float32",
        provider={"name": "local", "root": "/y"},
        checkpoint_sha256=FP_ARGS["checkpoint_sha256"],  # type: ignore[arg-type]
    )
    for other in (b, c):
        assert other.acquisition.value == a.acquisition.value
        assert other.normalisation.value == a.normalisation.value
        assert other.embedding.value != a.embedding.value
    assert d.acquisition.value != a.acquisition.value


# --- the checkpoint hash cache ---------------------------------------------------------------


def test_hash_cache_sees_a_same_size_replacement(tmp_path: Path) -> None:
    """A replaced file of the same size (another checkpoint of the same architecture) gets
    its own hash: the cache is keyed on size and mtime, and a replacement moves the mtime."""
    path = tmp_path / "weights.pth"
    path.write_bytes(b"a" * 4096)
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    first = sha256_file(path)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest()
    assert path.with_name("weights.pth.sha256").exists()
    path.write_bytes(b"b" * 4096)
    os.utime(path, ns=(1_700_000_001_000_000_000, 1_700_000_001_000_000_000))
    assert sha256_file(path) == hashlib.sha256(b"b" * 4096).hexdigest()


# --- compositing: no-data masking whatever the mask settings; back-fill honours the filter --


def _scene(day: int, value: int, cloudy: float, scl: np.ndarray, band0: int | None = None) -> Scene:
    data = np.full((10, *scl.shape), value, np.uint16)
    if band0 is not None:
        data[0] = band0
    return Scene(f"s{day}", dt.date(2020, 1, day), cloudy, lambda: (data, scl))


@pytest.mark.parametrize(
    "mask", [CloudMask(), CloudMask(mode="none"), CloudMask(scl_classes=(3,))], ids=str
)
def test_no_data_is_never_an_observation(mask: CloudMask) -> None:
    """SCL 0 (no data) and a pixel any band lacks are masked with every mask setting."""
    scl = np.full((2, 2), 4, np.uint8)
    scl[0, 0] = 0  # no data in the scene classification
    data = np.full((10, 2, 2), 700, np.uint16)
    data[3, 1, 1] = 0  # band 3 lacks this pixel
    ok = clear_mask(data, scl, mask)
    np.testing.assert_array_equal(ok, [[False, True], [True, False]])
    # In a composite, the other scene's values show through at those pixels.
    wins = range_windows("2020-01-01", "2020-01-05", 1)
    other = _scene(2, 300, 0.0, np.full((2, 2), 4, np.uint8))
    first = Scene("s1", dt.date(2020, 1, 1), 0.0, lambda: (data, scl))
    out, _ = composite_windows([first, other], wins, SensorSpec(composite="mosaic"), mask)
    assert out[0, 0, 0, 0] == 300 and out[0, 0, 1, 1] == 300
    assert out[0, 0, 0, 1] == 300  # newest clear observation elsewhere


def test_backfill_composite_uses_only_scenes_that_pass_the_filter() -> None:
    """An empty window takes the whole-range composite of the *passing* scenes; a scene the
    cloudy filter rejected does not enter it through the back-fill."""
    scl = np.full((2, 2), 4, np.uint8)
    wins = range_windows("2020-01-01", "2020-01-09", 4)  # 2-day windows
    scenes = [_scene(1, 100, 0.0, scl), _scene(4, 900, 80.0, scl), _scene(6, 300, 10.0, scl)]
    out, recs = composite_windows(scenes, wins, SensorSpec(cloudy_pct=30), CloudMask())
    assert [r.n_scenes for r in recs] == [1, 0, 1, 0]
    assert recs[1].backfill_source == "whole_range"
    assert out[1, 0, 0, 0] == 200  # median of 100 and 300; 900 was filtered out
    assert out[3, 0, 0, 0] == 200


# --- the encoder: official outputs at a tolerance that sees the upstream quirks --------------

# fp32 against the official float64 run: the generator saw up to 2.7e-6; the odd-frame merge
# (averaging with a zero frame) and the LayerNorm eps (1e-5) each move outputs by more than
# 1e-5 where they apply.
TIGHT = 1e-5


@pytest.mark.parametrize("variant", ["p444", "p422"])
def test_tiny_reference_outputs_to_1e5(variant: str) -> None:
    model = load_encoder(tiny_checkpoint(variant), cpu_matmul="blas")
    with torch.inference_mode():
        for ref in tiny_cases(variant):
            got = model(torch.from_numpy(ref.x)).numpy()
            np.testing.assert_allclose(
                got, ref["encoder_features_f64"], atol=TIGHT, rtol=TIGHT, err_msg=ref.name
            )


def test_stage_maps_to_1e5_on_an_odd_frame_count() -> None:
    """T = 48 with patch 4: 12 -> 6 -> 3 frames, so the last merging meets an odd frame."""
    model = load_encoder(tiny_checkpoint("p444"), cpu_matmul="blas")
    ref = tiny_case("p444", "t48_24x24")
    with torch.inference_mode():
        _, features = model.forward_intermediates(torch.from_numpy(ref.x))
    for k, stage in enumerate(features):
        np.testing.assert_allclose(
            stage.numpy(), ref[f"features_list_{k}"], atol=TIGHT, rtol=TIGHT, err_msg=f"stage {k}"
        )


# --- storage: the pointer's history -----------------------------------------------------------


def test_pointer_history_keeps_the_most_recent_versions(tmp_path: Path) -> None:
    """After more commits than the history holds, it lists the latest ones before the
    current version, oldest first, and each names a version that can still be opened."""
    from agrifm_pipeline.storage import HISTORY_LEN, ZarrStore

    store = ZarrStore(tmp_path, "table")
    made = [
        store.put_objects(2019, "t", {"x.txt": str(i).encode()}, {"n": i}).id
        for i in range(HISTORY_LEN + 3)
    ]
    doc = store.pointer(2019, "t")
    assert doc is not None and doc["version"] == made[-1]
    assert [h["version"] for h in doc["history"]] == made[-HISTORY_LEN - 1 : -1]
    assert store.lineage(2019, "t", made[-2]) == {"n": HISTORY_LEN + 1}


# --- both compositing providers: SCL 0 is no data, whatever the mask ---------------------------


def _scenes_with_a_no_data_block(root: Path, sample_dir: Path) -> tuple[str, str]:
    """Two sample scenes; the newer one's SCL says 'no data' (0) over rows and columns
    10-19 although its reflectance is there."""
    import json

    import rasterio

    older, newer = "2019-04-21", "2019-05-01"
    (root / "masks").mkdir(parents=True)
    for date in (older, newer):
        (root / f"{date}.tif").symlink_to(sample_dir / f"{date}.tif")
        with rasterio.open(sample_dir / "masks" / f"{date}.tif") as src:
            profile, masks = src.profile, src.read()
        if date == newer:
            masks[1, 10:20, 10:20] = 0
        with rasterio.open(root / "masks" / f"{date}.tif", "w", **profile) as dst:
            dst.write(masks)
    entries = json.loads((sample_dir / "manifest.json").read_text())["dates"]
    kept = [e for e in entries if e["date"] in (older, newer)]
    (root / "manifest.json").write_text(json.dumps({"dates": kept}))
    return older, newer


@pytest.mark.parametrize("mask", [CloudMask(mode="none"), CloudMask(scl_classes=(3,))], ids=str)
def test_scl_no_data_is_masked_by_local_and_earth_engine_alike(
    sample_dir: Path, tmp_path: Path, mask: CloudMask
) -> None:
    import google.oauth2.credentials
    import rasterio
    from odc.geo.geobox import GeoBox

    from agrifm_pipeline.providers.gee import EarthEngineProvider
    from agrifm_pipeline.providers.local import LocalProvider

    from .ee_standin import catalog_from_directory, ee_standin

    root = tmp_path / "scenes"
    older, _ = _scenes_with_a_no_data_block(root, sample_dir)
    area = GeoBox.from_bbox((574680.0, 5621800.0, 575320.0, 5622440.0), "EPSG:32631", resolution=10)
    windows = range_windows("2019-04-01", "2019-06-01", 1)
    sensor = SensorSpec(composite="mosaic", cloudy_pct=100)
    local = LocalProvider(root).fetch(area, windows, sensor, mask).data.values
    with rasterio.open(root / f"{older}.tif") as src:
        old = src.read()
    # Where the newer scene has no data, the mosaic shows the older scene.
    np.testing.assert_array_equal(local[0][:, 10:20, 10:20], old[:, 10:20, 10:20])
    with ee_standin(catalog=catalog_from_directory(root)) as s:
        gee = EarthEngineProvider(
            project=s.project,
            credentials=google.oauth2.credentials.Credentials(token="test-token"),
            endpoint=s.url,
            sleep=lambda _: None,
            slots_dir=tmp_path / "slots",
        ).fetch(area, windows, sensor, mask)
    np.testing.assert_array_equal(gee.data.values, local)


def test_a_version_rewritten_with_a_matching_manifest_is_refused(tmp_path: Path) -> None:
    """The pointer binds the manifest by its sha256: an object replaced together with its
    manifest entry (consistent on its own) is still refused."""
    import json

    from agrifm_pipeline.storage import MANIFEST, CorruptionError, ZarrStore

    store = ZarrStore(tmp_path, "table")
    v = store.put_objects(2019, "t", {"x.txt": b"first"}, {"n": 1})
    manifest = Path(v.path) / MANIFEST
    pointer = store.pointer(2019, "t")
    assert pointer is not None
    assert pointer["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    doc = json.loads(manifest.read_text())
    doc["objects"]["x.txt"] = {"sha256": hashlib.sha256(b"other").hexdigest(), "size": 5}
    manifest.write_text(json.dumps(doc))
    (Path(v.path) / "x.txt").write_bytes(b"other")
    with pytest.raises(CorruptionError, match="checksum the pointer recorded"):
        store.read_objects(store.resolve(2019, "t"))
