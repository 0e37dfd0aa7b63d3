"""The asset checks at their edges, judged through the function the steps call.

:mod:`test_check_guards` gives each check one clearly bad dataset written by hand.
Here the datasets come from the functions that make them where that matters (a
normalised tile with a NaN made by :func:`~agrifm_pipeline.tileyear.normalized_dataset`,
so a summary that forgets to count is caught, not only a judge that forgets to
look), and each threshold is met exactly: a value *at* a threshold is on the side
the check's description promises.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
import xarray as xr

from agrifm_pipeline.defs.checks import (
    MAX_CONSTANT_CHANNEL_SHARE,
    evaluate_partition,
)
from agrifm_pipeline.defs.partitions import tile_year_key
from agrifm_pipeline.defs.resources import TileYearConfig, ZarrStorage
from agrifm_pipeline.tileyear import normalized_dataset

YEAR = 2019
TILE = "32631_1280m_E0449_N4392"
KEY = str(tile_year_key(TILE, YEAR))
PER, CHIP, IMAGE, FRAMES = 2, 16, 16, 2
FRAMES_KEY = dg.AssetKey("s2_frame_stack")
NORMALIZED = dg.AssetKey("normalized_tensors")
EMBEDDING = dg.AssetKey("agrifm_embedding_grid")


def _tile_year(**kw: float) -> TileYearConfig:
    return TileYearConfig(chip_px=CHIP, chips_per_side=PER, image_size=IMAGE, n_frames=FRAMES, **kw)


@pytest.fixture
def storage(tmp_path: Path) -> ZarrStorage:
    return ZarrStorage(root=str(tmp_path / "store"), regions_dir=str(tmp_path / "regions"))


def _judge(
    storage: ZarrStorage, asset: dg.AssetKey, ds: xr.Dataset, tile_year: TileYearConfig
) -> dict[str, dg.AssetCheckEvaluation]:
    store = storage.store(asset.path[-1])
    store.write(YEAR, TILE, ds, {})
    return {e.check_name: e for e in evaluate_partition(asset, store, KEY, tile_year)}


# --- normalised tensors: the non-finite count is the tensor's own ---------------------------


def _tensor() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(PER * PER, FRAMES, 10, IMAGE, IMAGE, generator=gen)


@pytest.mark.parametrize("keep_tensors", [False, True], ids=["stats_only", "tensors_kept"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_a_non_finite_normalised_tensor_fails_its_check(
    storage: ZarrStorage, bad: float, keep_tensors: bool
) -> None:
    """Three non-finite values in two chips: the stored summary counts exactly three and the
    check fails, whether or not the tensors themselves are kept."""
    tensor = _tensor()
    tensor[0, 0, 0, 0, 0] = bad
    tensor[3, 1, 9, 15, 15] = bad
    tensor[3, 0, 4, 7, 2] = bad
    ds = normalized_dataset(tensor, _tile_year().resolve(), keep_tensors=keep_tensors)
    assert ds.attrs["n_nonfinite"] == 3
    got = _judge(storage, NORMALIZED, ds, _tile_year())["normalized_tensors_finite"]
    assert not got.passed, dict(got.metadata)
    assert got.metadata["nonfinite_values"].value == 3
    assert got.metadata["tensors_kept"].value is keep_tensors
    assert got.partition == KEY


@pytest.mark.parametrize("keep_tensors", [False, True], ids=["stats_only", "tensors_kept"])
def test_a_finite_normalised_tensor_passes_with_a_zero_count(
    storage: ZarrStorage, keep_tensors: bool
) -> None:
    ds = normalized_dataset(_tensor(), _tile_year().resolve(), keep_tensors=keep_tensors)
    got = _judge(storage, NORMALIZED, ds, _tile_year())["normalized_tensors_finite"]
    assert got.passed and got.metadata["nonfinite_values"].value == 0


def test_a_normalised_partition_without_its_summary_fails(storage: ZarrStorage) -> None:
    """No ``n_nonfinite`` in the attrs (written by something else): not assumed finite."""
    ds = normalized_dataset(_tensor(), _tile_year().resolve(), keep_tensors=False)
    del ds.attrs["n_nonfinite"]
    got = _judge(storage, NORMALIZED, ds, _tile_year())["normalized_tensors_finite"]
    assert not got.passed and got.metadata["nonfinite_values"].value == -1


def test_kept_tensors_of_the_wrong_type_or_size_fail(storage: ZarrStorage) -> None:
    """When the tensors are kept, their own dtype and shape are judged, not only the stats'."""
    ds = normalized_dataset(_tensor(), _tile_year().resolve(), keep_tensors=True)
    as_double = ds.copy()
    as_double["tensors"] = ds["tensors"].astype(np.float64)
    got = _judge(storage, NORMALIZED, as_double, _tile_year())["normalized_tensors_finite"]
    assert not got.passed
    smaller = normalized_dataset(
        _tensor()[..., :8, :8].contiguous(), _tile_year().resolve(), keep_tensors=True
    )
    got = _judge(storage, NORMALIZED, smaller, _tile_year())["normalized_tensors_finite"]
    assert not got.passed and got.metadata["shape"].value[-2:] == [8, 8]


# --- the clear fraction: at the threshold passes -----------------------------------------------


def _frames(clear: list[float]) -> xr.Dataset:
    side = CHIP * PER
    values = np.random.default_rng(0).integers(1, 9000, (len(clear), 10, side, side))
    return xr.Dataset(
        {
            "frames": (("time", "band", "y", "x"), values.astype(np.uint16)),
            "clear_fraction": (("time",), np.asarray(clear, np.float32)),
        }
    )


@pytest.mark.parametrize(
    ("clear", "threshold"),
    [
        ([0.25, 0.25], 0.25),
        ([0.5, 0.0], 0.25),
        ([1.0, 0.0], 0.5),
        ([0.0, 0.0], 0.0),
        # Not exact in binary: stored as float32, 0.7 is 0.69999999 and must still pass.
        ([0.7, 0.7], 0.7),
        ([0.9, 0.9], 0.9),
    ],
)
def test_a_tile_exactly_at_the_clear_threshold_passes(
    storage: ZarrStorage, clear: list[float], threshold: float
) -> None:
    """'Mean clear fraction at least min_clear_fraction': equal is enough, and no 'why'
    is given (values and thresholds exact in binary, so equality is exact)."""
    tile_year = _tile_year(min_clear_fraction=threshold)
    got = _judge(storage, FRAMES_KEY, _frames(clear), tile_year)["frame_stack_clear_fraction"]
    assert got.passed, dict(got.metadata)
    assert got.metadata["mean_clear_fraction"].value == pytest.approx(threshold)
    assert "why" not in got.metadata


def test_a_dataset_a_check_cannot_read_is_a_failed_check_not_a_crash(
    storage: ZarrStorage,
) -> None:
    """A stored frame stack without its clear fractions (written by an older version, or
    by hand): every check of the asset is still evaluated, the unreadable one failed with
    the error named."""
    ds = _frames([0.5, 0.5]).drop_vars("clear_fraction")
    got = _judge(storage, FRAMES_KEY, ds, _tile_year())
    assert got["frame_stack_shape_and_dtype"].passed
    failed = got["frame_stack_clear_fraction"]
    assert not failed.passed and "KeyError" in failed.metadata["error"].value


def test_a_tile_just_below_the_clear_threshold_fails(storage: ZarrStorage) -> None:
    tile_year = _tile_year(min_clear_fraction=0.25)
    got = _judge(storage, FRAMES_KEY, _frames([0.25, 0.2490234375]), tile_year)
    assert not got["frame_stack_clear_fraction"].passed
    assert "why" in got["frame_stack_clear_fraction"].metadata


# --- the embedding: the chips left out, and the degeneracy thresholds ------------------------


def _grid(values: np.ndarray, valid: list[float] | None = None) -> xr.Dataset:
    ds = xr.Dataset({"embedding": (("band", "y", "x"), values.astype(np.float32))})
    if valid is not None:
        ds.attrs.update(chip_valid_fraction=valid, min_chip_coverage=0.5)
    return ds


def _random_grid(d: int = 8, h: int = 2) -> np.ndarray:
    return np.random.default_rng(5).normal(size=(d, PER * h, PER * h))


def test_a_chip_left_out_for_coverage_is_nan_and_does_not_make_the_grid_degenerate(
    storage: ZarrStorage,
) -> None:
    """Chip 3 (bottom right) below min_chip_coverage: NaN by design. Both embedding checks
    pass: its NaN is neither an encoded chip's NaN nor a collapsed chip."""
    values = _random_grid()
    values[:, 2:4, 2:4] = np.nan
    got = _judge(storage, EMBEDDING, _grid(values, [1.0, 1.0, 1.0, 0.25]), _tile_year())
    assert got["embedding_finite"].passed, dict(got["embedding_finite"].metadata)
    assert got["embedding_finite"].metadata["chips_encoded"].value == 3
    assert got["embedding_non_degenerate"].passed, dict(got["embedding_non_degenerate"].metadata)
    assert got["embedding_non_degenerate"].metadata["chips"].value == 3


def test_a_grid_with_no_chip_encoded_passes_both_embedding_checks(storage: ZarrStorage) -> None:
    values = np.full((8, 4, 4), np.nan)
    got = _judge(storage, EMBEDDING, _grid(values, [0.0] * 4), _tile_year())
    assert got["embedding_finite"].passed and got["embedding_non_degenerate"].passed
    assert got["embedding_non_degenerate"].metadata["chips"].value == 0


def test_constant_channels_at_the_allowed_share_pass_and_one_more_fails(
    storage: ZarrStorage,
) -> None:
    d = 8
    at = int(d * MAX_CONSTANT_CHANNEL_SHARE)  # 4 of 8: exactly the share allowed
    values = _random_grid(d)
    values[:at] = 0.25
    got = _judge(storage, EMBEDDING, _grid(values), _tile_year())["embedding_non_degenerate"]
    assert got.passed and got.metadata["constant_channel_share"].value == 0.5
    values[at] = 0.25
    got = _judge(storage, EMBEDDING, _grid(values), _tile_year())["embedding_non_degenerate"]
    assert not got.passed and got.metadata["constant_channel_share"].value == 0.625


def test_a_chip_whose_variance_is_at_the_floor_fails(
    storage: ZarrStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'Every chip's variance above a floor': a chip exactly at the floor is collapsed, one
    just above is not (a floor of 2**-28, so that a chip of +-2**-14 is exactly at it)."""
    from agrifm_pipeline.defs import checks

    monkeypatch.setattr(checks, "MIN_CHIP_VARIANCE", 2.0**-28)
    for a, ok in ((2.0**-14, False), (2.0**-13, True)):
        values = _random_grid(d=2, h=2)
        values[:, 0:2, 0:2] = a * np.array([[[1, -1], [1, -1]], [[-1, 1], [-1, 1]]])
        got = _judge(storage, EMBEDDING, _grid(values), _tile_year())["embedding_non_degenerate"]
        assert got.metadata["min_chip_variance"].value == a * a
        assert got.passed is ok, (a, dict(got.metadata))


def test_the_check_judges_the_current_version_after_a_recommit(storage: ZarrStorage) -> None:
    """A partition re-made (bad, then good): the evaluation names and judges the newest."""
    store = storage.store("s2_frame_stack")
    tile_year = _tile_year()
    store.write(YEAR, TILE, _frames([0.0, 0.0]), {})
    good = store.write(YEAR, TILE, _frames([1.0, 1.0]), {})
    got = {e.check_name: e for e in evaluate_partition(FRAMES_KEY, store, KEY, tile_year)}
    assert got["frame_stack_clear_fraction"].passed
    assert {e.metadata["version"].value for e in got.values()} == {good.id}
