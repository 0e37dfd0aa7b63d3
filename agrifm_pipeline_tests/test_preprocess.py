"""The input contract and preprocessing, row by row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agrifm_pipeline.errors import InputContractError, SettingsError
from agrifm_pipeline.model.config import AGRIFM_S2_MEAN, AGRIFM_S2_STD
from agrifm_pipeline.preprocess import (
    coerce_frames,
    normalize,
    preprocess_chips,
    preprocess_input,
    replace_nonfinite,
    resize_frames,
    square_pad,
)


def _ramp(t: int, h: int = 4, w: int = 4) -> np.ndarray:
    """Frame i holds value 100 * (i + 1) + band index, so frames are tellable apart."""
    x = np.zeros((t, 10, h, w), dtype=np.uint16)
    for i in range(t):
        for c in range(10):
            x[i, c] = 100 * (i + 1) + c
    return x


def test_chw_is_repeated_to_t() -> None:
    frame = _ramp(1)[0]
    out, rec = coerce_frames(frame, 6)
    assert out.shape == (6, 10, 4, 4) and out.dtype == np.float32
    assert all(np.array_equal(out[i], frame) for i in range(6))
    assert rec == {
        "input_mode": "chw_repeated",
        "input_original_frames": 1,
        "input_frames": 6,
        "input_repeated_to_t": True,
        "input_hw": [4, 4],
    }


def test_tchw_padded_with_last_frame() -> None:
    x = _ramp(3)
    out, rec = coerce_frames(x, 5)
    assert (
        np.array_equal(out[:3], x) and np.array_equal(out[3], x[2]) and np.array_equal(out[4], x[2])
    )
    assert (
        rec["input_mode"] == "tchw_padded"
        and rec["input_original_frames"] == 3
        and rec["input_frames"] == 5
    )


def test_tchw_truncated_and_exact() -> None:
    x = _ramp(9)
    out, rec = coerce_frames(x, 8)
    assert np.array_equal(out, x[:8]) and rec["input_mode"] == "tchw_truncated"
    out, rec = coerce_frames(x[:8], 8)
    assert np.array_equal(out, x[:8]) and rec["input_mode"] == "tchw_exact"
    assert rec["input_repeated_to_t"] is False


@pytest.mark.parametrize(
    "shape",
    [
        (10, 4),
        (1, 1, 10, 4, 4),
        (3, 4, 4),
        (4, 3, 4, 4),
        (0, 10, 4, 4),
        (2, 10, 0, 4),
        (10, 4, 0),
        (10,),
    ],
)
def test_other_shapes_raise_naming_the_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputContractError) as err:
        coerce_frames(np.zeros(shape, dtype=np.float32), 8)
    assert str(shape) in str(err.value)
    assert "(10, H, W)" in str(err.value) and "(T, 10, H, W)" in str(err.value)


def test_non_numeric_input_is_rejected() -> None:
    with pytest.raises(InputContractError, match="dtype"):
        coerce_frames(np.full((10, 4, 4), "a"), 8)


def test_nonfinite_replaced_and_counted_then_clipped() -> None:
    x = np.full((2, 10, 4, 4), 500.0, dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    x[0, 1, 0, 0] = np.inf
    x[1, 2, 0, 0] = -np.inf
    x[1, 3, 1, 1] = -20.0
    x[1, 4, 2, 2] = 12000.0
    p = preprocess_input(x, n_frames=2, image_size=16, norm_mode="none", fill_value=7.0)
    rec = p.record
    assert rec["nonfinite_pixels"] == 3 and rec["clipped_low"] == 1 and rec["clipped_high"] == 1
    raw, _ = resize_frames(torch.tensor(x), 16)  # only to get the shape
    assert p.tensor.shape == raw.shape
    # Values before the resize: check through a 16x16 input so the resize is the identity.
    y = np.full((2, 10, 16, 16), 500.0, dtype=np.float32)
    y[0, 0, 0, 0], y[1, 3, 1, 1], y[1, 4, 2, 2] = np.nan, -20.0, 12000.0
    out = preprocess_input(y, n_frames=2, image_size=16, norm_mode="none", fill_value=7.0).tensor
    assert out[0, 0, 0, 0] == 7.0 and out[1, 3, 1, 1] == 0.0 and out[1, 4, 2, 2] == 10000.0
    assert np.isnan(y[0, 0, 0, 0]), "the caller's array must not be modified"


def test_replace_nonfinite_numpy() -> None:
    a = np.array([1.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    out, n = replace_nonfinite(a, 0.0)
    assert n == 3 and out.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_agrifm_stats_by_hand() -> None:
    x = np.zeros((1, 10, 1, 1), dtype=np.float32)
    x[0, :, 0, 0] = 1000.0
    out = normalize(x, "agrifm_stats")
    expected = [(1000.0 - m) / s for m, s in zip(AGRIFM_S2_MEAN, AGRIFM_S2_STD, strict=True)]
    np.testing.assert_allclose(out[0, :, 0, 0], expected, rtol=1e-6)
    assert out[0, 0, 0, 0] == pytest.approx(
        (1000 - 4179.192015478227) / 4041.5212325268735, rel=1e-6
    )


def test_unit_scale_and_none() -> None:
    x = np.array([0.0, 2500.0, 10000.0], dtype=np.float32).reshape(1, 3, 1) * np.ones(
        (10, 3, 1), np.float32
    )
    np.testing.assert_allclose(normalize(x, "unit_scale")[0, :, 0], [0.0, 0.25, 1.0])
    np.testing.assert_array_equal(normalize(x, "none"), x)


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [("zscore", "agrifm_stats"), ("STATS", "agrifm_stats"), ("unit", "unit_scale"),
     ("Reflectance", "unit_scale"), ("raw", "none"), ("off", "none")],
)  # fmt: skip
def test_aliases(alias: str, canonical: str) -> None:
    x = _ramp(2, 16, 16)
    a = preprocess_input(x, n_frames=2, image_size=16, norm_mode=alias)
    b = preprocess_input(x, n_frames=2, image_size=16, norm_mode=canonical)
    assert a.record["norm_mode"] == canonical
    assert torch.equal(a.tensor, b.tensor)


def test_unknown_mode_lists_the_accepted_ones() -> None:
    with pytest.raises(SettingsError) as err:
        preprocess_input(_ramp(1), n_frames=1, image_size=16, norm_mode="zscorez")
    msg = str(err.value)
    assert "'zscorez'" in msg and "agrifm_stats" in msg and "unit_scale" in msg and "none" in msg


def test_resize_matches_torch_bilinear() -> None:
    x = torch.rand(3, 10, 20, 20)
    out, rec = resize_frames(x, 32)
    ref = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    assert (
        torch.allclose(out, ref, atol=1e-6) and rec["square_pad"] is None and rec["resized"] is True
    )


def test_resize_is_identity_at_target_size() -> None:
    x = torch.rand(2, 10, 224, 224)
    out, rec = resize_frames(x, 224)
    assert torch.equal(out, x) and rec["resized"] is False


def test_non_square_is_centre_padded_by_reflection() -> None:
    plane = torch.arange(4 * 7, dtype=torch.float32).reshape(1, 1, 4, 7)
    pad = square_pad(4, 7)
    assert pad == {"axis": "y", "before": 1, "after": 2, "mode": "reflect"}
    out, rec = resize_frames(plane, 16)
    padded = F.pad(plane, (0, 0, 1, 2), mode="reflect")
    assert padded.shape[-2:] == (7, 7)
    # Reflection, not edge: the row above the first is the second row.
    assert torch.equal(padded[0, 0, 0], plane[0, 0, 1])
    ref = F.interpolate(padded, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(out, ref) and rec["square_pad"] == pad


def test_edge_mode_when_pad_is_as_large_as_the_side() -> None:
    plane = torch.arange(2 * 8, dtype=torch.float32).reshape(1, 1, 8, 2)
    pad = square_pad(8, 2)
    assert pad == {"axis": "x", "before": 3, "after": 3, "mode": "replicate"}
    out, _ = resize_frames(plane, 16)
    padded = F.pad(plane, (3, 3, 0, 0), mode="replicate")
    assert torch.equal(padded[0, 0, :, 0], plane[0, 0, :, 0])
    assert torch.allclose(
        out, F.interpolate(padded, size=(16, 16), mode="bilinear", align_corners=False)
    )


def _peer_center_pad(x: np.ndarray) -> np.ndarray:
    """rs-embed's ``tools/shape.py::center_pad_to_square`` (pad_mode='reflect'), restated:
    pad the last two axes to the long side, ``pad // 2`` before and the rest after;
    reflect only if the whole pad on each axis is smaller than that axis, else edge."""
    h, w = x.shape[-2:]
    side = max(h, w)
    pad_h, pad_w = side - h, side - w
    widths = [(0, 0)] * (x.ndim - 2) + [
        (pad_h // 2, pad_h - pad_h // 2),
        (pad_w // 2, pad_w - pad_w // 2),
    ]
    mode = "reflect" if pad_h < h and pad_w < w else "edge"
    return np.pad(x, widths, mode=mode)


@pytest.mark.parametrize(
    ("h", "w"),
    [(30, 70), (70, 30), (31, 70), (40, 80), (41, 80), (4, 7), (8, 2), (64, 96), (96, 64)],
)
def test_square_pad_follows_the_peer(h: int, w: int) -> None:
    """Aspect ratios between 2 and about 3 (30 x 70: pad 40 >= 30) are edge-padded, as the peer does."""
    x = np.random.default_rng(h * 1000 + w).random((2, 3, h, w), dtype=np.float32)
    out, rec = resize_frames(torch.from_numpy(x.copy()), 32)
    ref = F.interpolate(
        torch.from_numpy(_peer_center_pad(x)).reshape(-1, 1, max(h, w), max(h, w)),
        size=(32, 32),
        mode="bilinear",
        align_corners=False,
    ).reshape(2, 3, 32, 32)
    assert torch.allclose(out, ref, atol=1e-6), rec["square_pad"]


def test_thirty_by_seventy_is_edge_padded() -> None:
    """By hand: 30 rows padded to 70 need 40 rows (20 above, 20 below), more than
    the 30 there are, so every added row repeats the nearest edge row."""
    pad = square_pad(30, 70)
    assert pad == {"axis": "y", "before": 20, "after": 20, "mode": "replicate"}
    plane = torch.arange(30, dtype=torch.float32).reshape(1, 1, 30, 1).expand(1, 1, 30, 70)
    out, rec = resize_frames(plane, 70)  # 70 is the padded side: no resize, the pad alone
    assert rec["resized"] is False and out.shape[-2:] == (70, 70)
    rows = out[0, 0, :, 0]
    assert torch.equal(rows[:20], torch.zeros(20))  # first row (0) repeated, not rows 20..1
    assert torch.equal(rows[20:50], torch.arange(30, dtype=torch.float32))
    assert torch.equal(rows[50:], torch.full((20,), 29.0))


def test_image_size_below_minimum_is_rejected() -> None:
    with pytest.raises(SettingsError, match="image_size=15"):
        preprocess_input(_ramp(1), n_frames=1, image_size=15, norm_mode="none")


def test_full_record() -> None:
    p = preprocess_input(_ramp(3, 20, 30), n_frames=8, image_size=32, norm_mode="agrifm_stats")
    assert p.tensor.shape == (8, 10, 32, 32) and p.tensor.dtype == torch.float32
    rec = p.record
    for key in ("input_mode", "input_frames", "input_original_frames", "nonfinite_pixels", "input_hw",
                "resized_hw", "square_pad", "norm_mode", "image_size"):  # fmt: skip
        assert key in rec, key
    assert rec["input_hw"] == [20, 30] and rec["square_pad"]["axis"] == "y"


def test_chips_equal_per_chip_preprocessing() -> None:
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 12000, size=(3, 4, 10, 24, 24)).astype(np.uint16)
    batch = preprocess_chips(chips, n_frames=4, image_size=32, norm_mode="agrifm_stats")
    assert batch.tensor.shape == (3, 4, 10, 32, 32)
    for i in range(3):
        one = preprocess_input(chips[i], n_frames=4, image_size=32, norm_mode="agrifm_stats")
        assert torch.allclose(batch.tensor[i], one.tensor, atol=1e-6)
    assert batch.record["clipped_high"] == int((chips > 10000).sum())
    with pytest.raises(InputContractError, match=r"\(N, 4, 10, H, W\)"):
        preprocess_chips(chips[:, :3], n_frames=4, image_size=32, norm_mode="none")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_integer_chips_take_the_fast_path_with_identical_results(dtype) -> None:
    from agrifm_pipeline.preprocess import preprocess_chips

    rng = np.random.default_rng(3)
    raw = rng.integers(-50 if dtype == np.int32 else 0, 12000, size=(3, 4, 10, 20, 20)).astype(
        dtype
    )
    for mode in ("agrifm_stats", "unit_scale", "none"):
        fast = preprocess_chips(raw, n_frames=4, image_size=16, norm_mode=mode)
        slow = preprocess_chips(raw.astype(np.float64), n_frames=4, image_size=16, norm_mode=mode)
        assert torch.equal(fast.tensor, slow.tensor)
        for key in ("clipped_low", "clipped_high", "nonfinite_pixels", "resized_hw"):
            assert fast.record[key] == slow.record[key], key
    assert fast.record["clipped_high"] > 0 and (
        dtype == np.uint16 or fast.record["clipped_low"] > 0
    )


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_a_tiles_chip_block_is_read_through_its_strides(dtype) -> None:
    """A (rows, cols, T, C, S, S) view of a tile gives the chips row-major, exactly as
    the same chips given contiguously; uint32 (no torch type) takes numpy's conversion."""
    from agrifm_pipeline.tileyear import tile_chips

    rng = np.random.default_rng(5)
    tile = rng.integers(0, 12000, size=(4, 10, 48, 72)).astype(dtype)
    view = tile_chips(tile, 24)
    assert view.shape == (2, 3, 4, 10, 24, 24) and np.shares_memory(view, tile)
    chips = np.stack([tile[:, :, r * 24 : (r + 1) * 24, c * 24 : (c + 1) * 24]
                      for r in range(2) for c in range(3)])  # fmt: skip
    a = preprocess_chips(view, n_frames=4, image_size=24, norm_mode="agrifm_stats")
    b = preprocess_chips(chips, n_frames=4, image_size=24, norm_mode="agrifm_stats")
    assert a.tensor.shape == (6, 4, 10, 24, 24) and a.tensor.is_contiguous()
    assert torch.equal(a.tensor, b.tensor) and a.record == b.record
    assert a.record["n_chips"] == 6 and a.record["clipped_high"] == int((tile > 10000).sum())
    with pytest.raises(InputContractError, match=r"\(rows, cols, 4, 10, H, W\)"):
        preprocess_chips(view[None], n_frames=4, image_size=24, norm_mode="none")


def test_chip_statistics_match_numpy() -> None:
    from agrifm_pipeline.tileyear import chip_statistics

    x = torch.randn(3, 2, 10, 16, 16) * 2 + 1
    x[1, 1, 4] = 7.0  # a constant plane: std exactly 0
    got = chip_statistics(x).numpy()
    ref = x.double().flatten(3).numpy()
    np.testing.assert_allclose(got[..., 0], ref.mean(-1), atol=1e-6)
    np.testing.assert_allclose(got[..., 1], ref.std(-1), atol=1e-5)
    np.testing.assert_array_equal(got[..., 2], x.flatten(3).amin(-1).numpy())
    np.testing.assert_array_equal(got[..., 3], x.flatten(3).amax(-1).numpy())
    assert got[1, 1, 4, 1] == 0.0


def test_preview_pca_matches_the_exact_components() -> None:
    from agrifm_pipeline.tileyear import pca3

    rng = np.random.default_rng(0)
    d, h, w = 64, 12, 10
    structure = rng.normal(size=(4, h * w))
    loadings = rng.normal(size=(d, 4)) * [8.0, 5.0, 3.0, 1.0]
    grid = (loadings @ structure + 0.1 * rng.normal(size=(d, h * w))).reshape(d, h, w)
    x = grid.reshape(d, -1).T - grid.reshape(d, -1).T.mean(0)
    _, vecs = np.linalg.eigh(x.T @ x)
    exact = x @ vecs[:, ::-1][:, :3]
    got = pca3(grid.astype(np.float32)).reshape(-1, 3)
    for i in range(3):
        assert abs(np.corrcoef(exact[:, i], got[:, i])[0, 1]) > 0.9999
    state = torch.get_rng_state()
    np.testing.assert_array_equal(pca3(grid), pca3(grid))  # repeatable
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG untouched
    assert pca3(grid[:, :1, :1]).shape == (1, 1, 3)
    assert pca3(grid[:2]).shape == (h, w, 3)  # fewer channels than components: padded


def test_band_frames_reads_named_bands_in_order() -> None:
    import xarray as xr

    from agrifm_pipeline.tileyear import band_frames

    bands = ["B2", "B3", "B4", "B5", "B8"]
    data = np.arange(2 * 5 * 3 * 3, dtype=np.uint16).reshape(2, 5, 3, 3)
    frames = xr.DataArray(data, dims=("time", "band", "y", "x"), coords={"band": bands})
    got = band_frames(frames, ["B4", "B3", "B2"])
    np.testing.assert_array_equal(got, frames.sel(band=["B4", "B3", "B2"]).values)
    np.testing.assert_array_equal(band_frames(frames, ["B8", "B2"]), data[:, [4, 0]])
    with pytest.raises(InputContractError, match="B11"):
        band_frames(frames, ["B4", "B11"])


@pytest.mark.parametrize(
    ("frames", "dtype"),
    [
        *[(1, np.uint16), (2, np.uint16), (7, np.uint16), (8, np.uint16), (33, np.int16)],
        *[(65, np.uint16), (8, np.float32)],  # the sort: more frames than the network, floats
    ],
)
def test_preview_median_frame_is_numpys_median(frames: int, dtype: type) -> None:
    from agrifm_pipeline.tileyear.products import _median_frame

    rng = np.random.default_rng(frames)
    raw = rng.integers(0, 12000, size=(frames, 3, 9, 11)).astype(dtype)
    raw[:, 0, 0, 0] = 0  # no data everywhere in one pixel
    raw[: frames // 2, 1, 2, 3] = 11999  # ties
    strided = raw[:, :, ::2, ::3]
    got = _median_frame(strided)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.median(strided.astype(np.float32), axis=0))
