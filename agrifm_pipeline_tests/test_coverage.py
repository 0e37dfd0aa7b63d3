"""Coverage-aware embeddings: chips without enough data are not encoded, and say so."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from agrifm_pipeline import inference
from agrifm_pipeline.errors import SettingsError
from agrifm_pipeline.tileyear import (
    FILL_RGB,
    TileYearSettings,
    cell_coverage,
    chip_coverage,
    covered_chips,
    features_with_gaps,
    preview_png,
    valid_frames,
)

from .pipeline_helpers import TILES, TINY, make_pipeline

# Tile E0449 holds the sample in its left column of chips only (60 of 64 px wide);
# its right column is all fill.
TILE = TILES[1]
YEAR = 2019


def test_valid_frames_and_chip_coverage() -> None:
    values = np.zeros((4, 10, 32, 32), dtype=np.uint16)
    values[:, 3, :16, :16] = 500  # one band with data is data
    values[:2, :, 16:, :16] = 700  # half the frames in the bottom-left chip
    valid = valid_frames(values, 0.0)
    assert valid.dtype == np.uint8
    assert valid[0, 0] == 4 and valid[20, 0] == 2 and valid[0, 20] == 0
    cfg = TileYearSettings(chip_px=16, chips_per_side=2, n_frames=4, image_size=32)
    cov = chip_coverage(valid, 4, 16)
    np.testing.assert_allclose(cov, [1.0, 0.0, 0.5, 0.0])
    assert covered_chips(cov, cfg).tolist() == [True, False, True, False]
    every = TileYearSettings(**{**cfg.as_record(), "min_chip_coverage": 0.0})
    assert covered_chips(cov, every).all()  # 0: every chip, all-fill ones too
    cells = cell_coverage(valid, 4, cfg, 2)
    assert cells.shape == (4, 4)
    np.testing.assert_allclose(cells[:2, :2], 1.0)
    np.testing.assert_allclose(cells[2:, :2], 0.5)
    np.testing.assert_allclose(cells[:, 2:], 0.0)


def test_min_chip_coverage_is_validated_and_fingerprinted() -> None:
    with pytest.raises(SettingsError, match="min_chip_coverage"):
        TileYearSettings(min_chip_coverage=1.5)
    a = TileYearSettings().fingerprints(provider={}, checkpoint_sha256="x", precision="float32")
    b = TileYearSettings(min_chip_coverage=0.5).fingerprints(
        provider={}, checkpoint_sha256="x", precision="float32"
    )
    assert a.normalisation.value == b.normalisation.value
    assert a.embedding.value != b.embedding.value


def test_features_with_gaps_puts_nan_where_chips_were_left_out() -> None:
    feats = torch.ones(2, 3, 2, 2)
    out = features_with_gaps(feats, np.array([False, True, False, True]), (3, 2, 2))
    assert torch.isnan(out[[0, 2]]).all() and (out[[1, 3]] == 1).all()
    empty = features_with_gaps(torch.empty((0,)), np.zeros(4, dtype=bool), (3, 2, 2))
    assert empty.shape == (4, 3, 2, 2) and torch.isnan(empty).all()


def test_an_empty_group_costs_no_encoder_time() -> None:
    engine = inference.EmbeddingEngine.create(
        str(TINY), options=inference.InferenceOptions(device="cpu", batch_size=2)
    )
    calls = []
    original = engine.embed

    def counting(chips: torch.Tensor) -> torch.Tensor:
        calls.append(chips.shape[0])
        return original(chips)

    engine.embed = counting  # type: ignore[method-assign]
    groups = [("a", torch.randn(1, 4, 10, 32, 32)), ("b", torch.empty(0, 4, 10, 32, 32))]
    groups.append(("c", torch.randn(2, 4, 10, 32, 32)))
    got = list(engine.embed_stream(iter(groups)))
    assert [k for k, _ in got] == ["a", "b", "c"]
    assert got[1][1].numel() == 0 and sum(calls) == 3
    d, h, w = got[0][1].shape[1:]
    assert engine.feature_shape(4, 32) == (d, h, w)


def test_preview_hatches_fill_and_states_coverage() -> None:
    frames = np.zeros((3, 3, 64, 64), dtype=np.uint16)
    frames[:, :, :, :32] = np.random.default_rng(0).integers(100, 3000, (3, 3, 64, 32))
    grid = np.random.default_rng(1).normal(size=(8, 4, 4)).astype(np.float32)
    grid[:, :, 2:] = np.nan
    attrs = {"valid_fraction": 0.5, "chip_valid_fraction": [1, 0], "n_chips": 2}
    attrs |= {"n_chips_encoded": 1, "min_chip_coverage": 0.05}
    png = preview_png(frames, grid, ["B4", "B3", "B2"], size=64, coverage=attrs)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape == (64 + 34, 2 * 64 + 8, 3)
    right_half_left_panel = img[:64, 40:64].reshape(-1, 3)
    right_half_pca = img[:64, 72 + 40 : 72 + 64].reshape(-1, 3)
    for panel in (right_half_left_panel, right_half_pca):
        # fill is neutral grey (hatched), never a colour or black
        assert (panel[:, 0] == panel[:, 1]).all() and (panel[:, 1] == panel[:, 2]).all()
        assert (panel == FILL_RGB).all(axis=1).mean() > 0.5
    assert not (img[:64, :24] == FILL_RGB).all(axis=-1).all()
    assert (img[64:] < 128).any()  # a caption was drawn


def test_pipeline_leaves_uncovered_chips_out(tmp_path: Path) -> None:
    pipe = make_pipeline(tmp_path)
    inference.clear_engine_cache()
    encoded: list[int] = []
    original = inference.EmbeddingEngine.embed

    def counting(self, chips):  # type: ignore[no-untyped-def]
        encoded.append(int(chips.shape[0]))
        return original(self, chips)

    inference.EmbeddingEngine.embed = counting  # type: ignore[method-assign]
    try:
        result = pipe.materialise([TILE], [YEAR])
    finally:
        inference.EmbeddingEngine.embed = original  # type: ignore[method-assign]
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    storage = pipe.storage

    frames = storage.store("s2_frame_stack").open(YEAR, TILE)
    assert frames["frames"].attrs["nodata"] == 0
    assert frames["frames"].rio.nodata == 0

    ds = storage.store("agrifm_embedding_grid").open(YEAR, TILE)
    cov = np.asarray(ds.attrs["chip_valid_fraction"])
    keep = cov >= ds.attrs["min_chip_coverage"]
    assert keep.tolist() == [True, False, True, False]  # the left column holds the sample
    assert sum(encoded) == int(keep.sum()) == ds.attrs["n_chips_encoded"]
    emb = ds["embedding"].values
    half = emb.shape[-1] // 2
    assert np.isnan(emb[:, :, half:]).all() and np.isfinite(emb[:, :, :half]).all()
    vf = ds["valid_fraction"]
    assert vf.dims == ("y", "x") and float(vf[:, half:].max()) == 0.0
    # the cells' coverage averages to the chips' (equal-area cells)
    np.testing.assert_allclose(float(vf[:, :half].mean()), cov[[0, 2]].mean(), rtol=1e-5)

    table = pq.read_table(
        io.BytesIO(storage.files("chip_embeddings").read(YEAR, TILE, "chips.parquet"))
    )
    df = table.to_pandas()
    assert df["encoded"].tolist() == keep.tolist()
    np.testing.assert_allclose(df["valid_fraction"], cov)
    assert df.loc[~df["encoded"], "status"].str.contains("min_chip_coverage").all()
    assert np.isnan(np.stack(df.loc[~df["encoded"], "mean"])).all()

    png = storage.files("embedding_preview").read(YEAR, TILE, "preview.png")
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    pca_right = img[:320, 328 + 170 :].reshape(-1, 3)  # the PCA's right half: not encoded
    assert ((pca_right == FILL_RGB).all(axis=1) | (pca_right == (170, 170, 170)).all(axis=1)).all()
